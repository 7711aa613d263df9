"""A trainer and a server that share nothing but an S3 bucket (a local moto server on loopback),
as they would on different hosts: hot reload from the bucket, and exactly-once learning through
kill -9s at the object store's commit point."""

import signal
import subprocess
import sys

import httpx

from streamlearn.dev.broker import free_port
from streamlearn.snapshots import open_store

from ..conftest import wait_for
from .conftest import committed, read_topic, track
from .test_delivery import PacedProducer, caught_up, offsets_done, source_of, stream, train_process


def served(base: str) -> dict:
    try:
        response = httpx.get(f"{base}/v1/models/default", timeout=2)
    except httpx.HTTPError:
        return {}
    return response.json() if response.status_code == 200 else {}


def test_trainer_and_server_share_snapshots_through_s3_exactly_once(bootstrap, make_topic, s3_url):
    topic, n = make_topic(), 900
    values, invalid = stream(n, invalid_every=13)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "streamlearn", "serve", "--snapshot-dir", s3_url, "--port", str(port),
               "--reload-interval-s", "0.2", "--log-level", "warning"]  # fmt: skip
    server = track(subprocess.Popen(command))
    producer = PacedProducer(bootstrap, topic, values, per_second=60)  # arriving through the crashes
    producer.start()

    # Crash after the weights are uploaded but before meta.json publishes them, then right after.
    for crash in ("snapshot.before_publish:2", "snapshot.after_publish:2"):
        process = train_process(bootstrap, topic, s3_url, crash)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()  # the stream ended before the crash point: a kill -9 all the same
            process.wait()
        assert process.returncode == -signal.SIGKILL, process.stderr.read()

    producer.join(60)
    assert not producer.failures
    store = open_store(s3_url)
    metrics_port = free_port()
    final = train_process(bootstrap, topic, s3_url, metrics_port=metrics_port)
    wait_for(lambda: caught_up(metrics_port), 120, what="the final run to catch up")
    snapshot = wait_for(lambda: offsets_done(store, topic, {0: n}), 60, what="the final snapshot")
    final.send_signal(signal.SIGTERM)
    assert final.wait(60) == 0, final.stderr.read()

    assert snapshot.meta.records_trained == n - len(invalid)
    assert committed(bootstrap, f"g-{topic}", topic) == [n]
    sources = [source_of(letter) for letter in read_topic(bootstrap, f"{topic}.dlq")]
    assert sorted(offset for _, _, offset in sources) == sorted(invalid)

    # The server, which only knows the bucket, serves the trainer's newest snapshot.
    newest = store.latest_version("default")
    model = wait_for(lambda: served(base).get("version") == newest and served(base), 30, what="reload")
    assert model["records_trained"] == n - len(invalid)
    response = httpx.post(f"{base}/v1/models/default:predict", json={"instances": [[0.1, 0.2, 0.3]]})
    assert response.status_code == 200 and str(response.json()["model_version"]) == str(newest)
    server.terminate()
    assert server.wait(30) == 0
