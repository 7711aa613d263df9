"""The commands as users run them: produce, train (stopped by SIGTERM) and up --demo."""

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx

from streamlearn.dev.broker import ensure_port_free, free_port
from streamlearn.snapshots import LocalSnapshotStore

from ..conftest import wait_for
from ..test_lifeline import children_of, running
from .conftest import FAST_GROUP, committed, track

FAST_ENV = {
    **os.environ,
    **{f"STREAMLEARN_KAFKA_{k.upper().replace('.', '_')}": v for k, v in FAST_GROUP.items()},
}


def streamlearn(*args: str, **kwargs) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlearn", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=FAST_ENV,
        **kwargs,
    )
    return track(process)


def test_produce_then_train_until_sigterm(bootstrap, make_topic, tmp_path):
    topic = make_topic()
    producer = streamlearn("produce", "--bootstrap", bootstrap, "--topic", topic, "--stream", "friedman",
                           "--count", "3000", "--rate", "0", "--invalid-every", "100")  # fmt: skip
    out, err = producer.communicate(timeout=60)
    assert producer.returncode == 0, err
    assert "published 3000 records" in out

    metrics_port = free_port()
    trainer = streamlearn(
        "train", "--bootstrap", bootstrap, "--topic", topic, "--task", "regression", "--group", f"g-{topic}",
        "--snapshot-dir", str(tmp_path), "--metrics-port", str(metrics_port),
    )  # fmt: skip
    store = LocalSnapshotStore(tmp_path)
    wait_for(
        lambda: (s := store.load_latest("default")) and s.meta.offsets.get(topic, {}).get(0) == 3000,
        60,
        what="all 3000 offsets processed",
    )
    page = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    assert 'streamlearn_records_invalid_total{reason="bad_json"}' in page
    trainer.send_signal(signal.SIGTERM)
    _, err = trainer.communicate(timeout=30)
    assert trainer.returncode == 0, err
    final = store.load_latest("default")
    assert final.meta.records_trained == 3000 - 30  # every 100th record was invalid
    assert committed(bootstrap, f"g-{topic}", topic) == [3000]


def test_up_demo_runs_everything_and_the_served_model_improves(tmp_path):
    ports = {"--broker-port": free_port(), "--port": free_port(), "--metrics-port": free_port()}
    args = [item for flag, port in ports.items() for item in (flag, str(port))]
    up = streamlearn("up", "--demo", "--duration-s", "25", "--rate", "400", *args, cwd=tmp_path)
    server = f"http://127.0.0.1:{ports['--port']}"

    def served_version():
        try:
            return httpx.get(f"{server}/v1/models/default", timeout=1).json().get("version")
        except (httpx.HTTPError, ValueError):
            return None

    first = wait_for(served_version, 40, what="a served snapshot")
    wait_for(lambda: (served_version() or 0) > first, 20, what="a newer snapshot served")
    out, err = up.communicate(timeout=60)
    assert up.returncode == 0, err
    assert f"POST {server}/v1/models/default:predict" in out and f"{server}/docs" in out
    progress = [line for line in out.replace("\r", "\n").splitlines() if line.startswith("trained")]
    accuracies = [float(line.split("accuracy ")[1].split()[0]) for line in progress if "accuracy" in line]
    assert accuracies and accuracies[-1] > 0.8, progress[-3:]
    snapshot = LocalSnapshotStore(tmp_path / "snapshots").load_latest("default")
    assert snapshot is not None and snapshot.meta.records_trained > 1000

    # A second demo in the same directory: a fresh in-memory broker, the model's weights kept.
    ports = {"--broker-port": free_port(), "--port": free_port(), "--metrics-port": free_port()}
    args = [item for flag, port in ports.items() for item in (flag, str(port))]
    again = streamlearn("up", "--demo", "--duration-s", "15", "--rate", "400", *args, cwd=tmp_path)
    _, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    second = LocalSnapshotStore(tmp_path / "snapshots").load_latest("default")
    assert second.meta.records_trained > snapshot.meta.records_trained + 1000  # it learned again


@contextlib.contextmanager
def orphans_killed(pids: list[int]) -> Iterator[None]:
    """Kill whatever of `pids` still runs when the test ends (what a failure would leave behind)."""
    try:
        yield
    finally:
        for pid in pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_broker_killed_with_sigkill_takes_its_broker_process_with_it():
    port = free_port()
    broker = streamlearn("broker", "--broker-port", str(port))
    assert "listening" in broker.stdout.readline()
    (child,) = children_of(broker.pid)
    with orphans_killed([child]):
        broker.kill()
        broker.wait()
        wait_for(lambda: not running(child), 10, what="the broker process to die with `streamlearn broker`")
    ensure_port_free("127.0.0.1", port, "the next broker")


def test_up_killed_with_sigkill_takes_every_child_with_it(tmp_path):
    ports = {"--broker-port": free_port(), "--port": free_port(), "--metrics-port": free_port()}
    args = [item for flag, port in ports.items() for item in (flag, str(port))]
    up = streamlearn("up", "--demo", "--rate", "50", *args, cwd=tmp_path)
    # The broker answers before the others start: once all four run, it holds its port.
    children = wait_for(lambda: len(found := children_of(up.pid)) == 4 and found, 60, what="4 children")
    with orphans_killed(children):
        up.kill()
        up.wait()
        wait_for(lambda: not any(running(pid) for pid in children), 10, what="every child to die with `up`")
    for flag, port in ports.items():
        ensure_port_free("127.0.0.1", port, flag)  # the next `up` can start
