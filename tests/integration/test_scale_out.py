"""Scale-out: one model learned by two ranks under torchrun (gloo), against the embedded broker.

The ranks are real `torchrun -m streamlearn train` processes. What is checked: the ranks hold
the same weights at every snapshot and match one process fed the same global batches; a rank
with silent partitions neither hangs nor poisons the other; kill -9 of a rank (at random
moments, and at the named points around an aligned snapshot) never loses or repeats a record or
a dead letter, and under --deterministic ends with the weights of an uninterrupted run;
stopping at two ranks and going on with three continues the exact accounting.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from streamlearn import kafka
from streamlearn.config import TrainSettings
from streamlearn.decoding import RecordDecoder
from streamlearn.metrics import TrainerMetrics
from streamlearn.records import LabelSpec, feature_kinds
from streamlearn.snapshots import open_store
from streamlearn.train.learner import Learner
from streamlearn.train.lockstep import digest
from streamlearn.train.telemetry import Telemetry

from .conftest import publish, read_topic, track

TORCHRUN = Path(sys.executable).with_name("torchrun")
BATCH = 64
MODEL = "scaled"
# Two ranks split each step's gradient sum where one process sums it whole: float32 rounding
# differs in the last bits, and Adam carries such differences on; this bounds them.
RTOL, ATOL = 1e-4, 1e-5


def dataset(partitions: int, per_partition: int, seed: int, invalid_every: int = 0) -> list[list[bytes]]:
    """Binary records of a fixed hyperplane, per partition; every `invalid_every`-th is not JSON."""
    rng = np.random.default_rng(seed)
    plane = rng.normal(size=6)
    values: list[list[bytes]] = []
    for p in range(partitions):
        x = rng.uniform(-1, 1, size=(per_partition, 6))
        labels = (x @ plane > 0).astype(int)
        rows = [
            json.dumps({"features": row.round(5).tolist(), "label": int(y)}).encode()
            for row, y in zip(x, labels, strict=True)
        ]
        if invalid_every:
            rows = [b"{not json" if (i + p) % invalid_every == 0 else row for i, row in enumerate(rows)]
        values.append(rows)
    return values


def produce(bootstrap: str, topic: str, values: list[list[bytes]]) -> None:
    for partition, rows in enumerate(values):
        publish(bootstrap, topic, rows, partition=partition)


def launch(bootstrap: str, topic: str, snapshots: Path, world: int, log: Path, *extra: str,
           restarts: int = 0, env: dict[str, str] | None = None) -> subprocess.Popen:  # fmt: skip
    command = [
        str(TORCHRUN), "--standalone", f"--nproc-per-node={world}", f"--max-restarts={restarts}",
        "--monitor-interval=0.2", "-m", "streamlearn", "train",
        "--bootstrap", bootstrap, "--topic", topic, "--group", f"group-{topic}", "--task", "binary",
        "--model-name", MODEL, "--snapshot-dir", str(snapshots), "--snapshot-interval-s", "0.3",
        "--keep-snapshots", "10000", "--batch-size", str(BATCH), "--metrics-port", "0",
        "--collective-timeout-s", "15", "--dlq-topic", f"{topic}-dlq", *extra,
    ]  # fmt: skip
    handle = open(log, "ab")  # noqa: SIM115 - the process writes it until it ends
    return track(
        subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    )


def newest_meta(snapshots: Path):
    store = open_store(snapshots)
    version = store.latest_version(MODEL) if snapshots.is_dir() else None
    return None if version is None else store.meta(MODEL, version)


def wait_learned(snapshots: Path, records: int, process: subprocess.Popen, log: Path, timeout_s: float = 120):
    """Poll until a snapshot holds `records` records (the test fails if the group exits first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        meta = newest_meta(snapshots)
        if meta is not None and meta.records_trained >= records:
            return meta
        if process.poll() is not None:
            pytest.fail(f"torchrun exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    pytest.fail(f"{records} records not learned within {timeout_s}s:\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)  # torchrun passes it to every rank: each checkpoints and leaves
    process.wait(60)


def ranks_of(process: subprocess.Popen) -> list[int]:
    """The worker processes torchrun runs now."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def model_tensors(snapshots: Path, version: int) -> dict[str, torch.Tensor]:
    tensors = open_store(snapshots).load(MODEL, version).tensors
    return {k: t for k, t in tensors.items() if k.startswith("model.")}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = False) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=RTOL, atol=ATOL, msg=name)


def dead_letters(bootstrap: str, topic: str) -> list[tuple[int, int]]:
    from streamlearn.train.dlq import source_of

    return sorted((src[1], src[2]) for m in read_topic(bootstrap, f"{topic}-dlq") if (src := source_of(m)))


def invalid_positions(values: list[list[bytes]]) -> list[tuple[int, int]]:
    return sorted((p, i) for p, rows in enumerate(values) for i, v in enumerate(rows) if v == b"{not json")


@pytest.fixture(scope="module")
def uninterrupted(bootstrap: str, tmp_path_factory) -> Iterator[tuple[Path, list[list[bytes]]]]:
    """Two ranks, --deterministic, learning a 4-partition topic to its end without interruption."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    values = dataset(4, 48 * BATCH, seed=1, invalid_every=97)  # enough for five kills before the end
    topic = f"scale-{os.urandom(4).hex()}"
    kafka.ensure_topic(bootstrap, {}, topic, partitions=4)
    produce(bootstrap, topic, values)
    valid = sum(len(rows) for rows in values) - len(invalid_positions(values))
    process = launch(bootstrap, topic, tmp / "snapshots", 2, tmp / "log", "--deterministic")
    wait_learned(tmp / "snapshots", valid, process, tmp / "log")
    stop(process)
    yield tmp / "snapshots", values


def test_ranks_agree_and_match_one_process_fed_the_same_global_batches(uninterrupted) -> None:
    snapshots, values = uninterrupted
    store = open_store(snapshots)
    settings = TrainSettings(
        bootstrap="127.0.0.1:1", topic="t", task="binary", deterministic=True, batch_size=BATCH
    )
    labels = LabelSpec.create(settings.task, settings.classes, settings.num_classes)
    decoder = RecordDecoder(labels, None, settings.max_record_bytes, feature_kinds(settings))
    learner = Learner(
        settings, labels, torch.device("cpu"), Telemetry(TrainerMetrics(CollectorRegistry()), False)
    )
    # Round k: the k-th BATCH records of rank 0's partitions (0, 2), then of rank 1's (1, 3).
    rounds = [
        [v for p in (0, 2, 1, 3) for v in values[p][k * BATCH : (k + 1) * BATCH]]
        for k in range(len(values[0]) // BATCH)
    ]
    by_records = {}
    for version in store.versions(MODEL):
        meta = store.meta(MODEL, version)
        assert meta.world == {"size": 2, "digest": meta.world["digest"]}
        if meta.records_trained:
            by_records[meta.records_trained] = version
    compared = 0
    for values_of_round in rounds:
        batch = decoder.decode(values_of_round)
        assert decoder.features is not None
        learner.learn(batch, decoder.features)
        version = by_records.pop(learner.records_learned, None)
        if version is None:
            continue
        written = model_tensors(snapshots, version)
        # the digest rank 0 checked every rank's weights against is that of the weights written
        assert store.meta(MODEL, version).world["digest"] == digest({k[6:]: t for k, t in written.items()})
        assert learner.trainer is not None
        ours, _ = learner.trainer.state()
        assert_same(written, {k: t for k, t in ours.items() if k.startswith("model.")})
        compared += 1
    assert compared >= 3 and not by_records  # every snapshot was at a round boundary, and compared


def test_a_rank_whose_partitions_are_silent_neither_hangs_nor_poisons_the_other(
    bootstrap: str, tmp_path: Path
) -> None:
    topic = f"scale-{os.urandom(4).hex()}"
    kafka.ensure_topic(bootstrap, {}, topic, partitions=4)
    values = dataset(4, 8 * BATCH, seed=2)
    process = launch(bootstrap, topic, tmp_path / "snapshots", 2, tmp_path / "log")
    # rank 1 owns partitions 1 and 3: they stay empty while rank 0's are published, twice over
    publish(bootstrap, topic, values[0], partition=0)
    wait_learned(tmp_path / "snapshots", len(values[0]), process, tmp_path / "log")
    publish(bootstrap, topic, values[2], partition=2)
    meta = wait_learned(tmp_path / "snapshots", 2 * len(values[0]), process, tmp_path / "log")
    stop(process)
    assert meta.offsets[topic] == {0: len(values[0]), 2: len(values[2])}
    assert meta.training is not None and np.isfinite(meta.training["prequential"]["loss_sum"])
    weights = model_tensors(tmp_path / "snapshots", meta.version)
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert meta.training["prequential"]["correct"] / meta.records_trained > 0.8  # it learned


def test_kill_9_of_random_ranks_loses_and_repeats_nothing_and_ends_as_the_uninterrupted_run(
    bootstrap: str, tmp_path: Path, uninterrupted
) -> None:
    reference, values = uninterrupted
    topic = f"scale-{os.urandom(4).hex()}"
    kafka.ensure_topic(bootstrap, {}, topic, partitions=4)
    produce(bootstrap, topic, values)
    invalid = invalid_positions(values)
    valid = sum(len(rows) for rows in values) - len(invalid)
    snapshots, log = tmp_path / "snapshots", tmp_path / "log"
    process = launch(bootstrap, topic, snapshots, 2, log, "--deterministic", restarts=10)
    rng = random.Random(7)
    learned = wait_learned(snapshots, 1, process, log).records_trained
    recoveries = []
    for _ in range(5):
        if learned >= valid - 4 * BATCH:
            break  # too close to the end for a kill to interrupt anything
        time.sleep(rng.uniform(0.0, 0.8))
        os.kill(rng.choice(ranks_of(process)), signal.SIGKILL)
        killed_at, killed_at_ms = time.monotonic(), time.time() * 1000
        learned = wait_learned(snapshots, learned + 1, process, log, timeout_s=60).records_trained
        while (meta := newest_meta(snapshots)) is None or meta.created_at_ms <= killed_at_ms + 500:
            assert time.monotonic() - killed_at < 60, "no snapshot begun after the kill"  # by the new group
            time.sleep(0.05)
        learned = meta.records_trained
        recoveries.append(time.monotonic() - killed_at)
    meta = wait_learned(snapshots, valid, process, log)
    stop(process)
    print(f"seconds from each kill to a new snapshot: {[round(r, 1) for r in recoveries]}")
    assert len(recoveries) == 5, (recoveries, learned)
    assert max(recoveries) < 30, recoveries  # learning again (a new snapshot) within 30 s
    assert meta.records_trained == valid  # nothing learned twice, nothing skipped
    assert dead_letters(bootstrap, topic) == invalid  # each invalid record dead-lettered once
    final = newest_meta(reference)
    assert final is not None and final.records_trained == valid
    assert_same(model_tensors(snapshots, meta.version), model_tensors(reference, final.version), exact=True)


def test_crashes_around_an_aligned_snapshot_lose_and_repeat_nothing(
    bootstrap: str, tmp_path: Path, uninterrupted
) -> None:
    """Three crashes in one run, one per start of the group: rank 1 after the offsets are gathered,
    before the snapshot is published; rank 0, then rank 1, after it is published, before committing."""
    reference, values = uninterrupted
    topic = f"scale-{os.urandom(4).hex()}"
    kafka.ensure_topic(bootstrap, {}, topic, partitions=4)
    produce(bootstrap, topic, values)
    invalid = invalid_positions(values)
    valid = sum(len(rows) for rows in values) - len(invalid)
    env = {
        "STREAMLEARN_CRASH_AT": "lockstep.gathered:2,lockstep.published:2,lockstep.published:2",
        "STREAMLEARN_CRASH_RANK": "1,0,1",
    }
    snapshots, log = tmp_path / "snapshots", tmp_path / "log"
    # snapshots often, so that each run reaches its crash long before the end of the records
    process = launch(
        bootstrap,
        topic,
        snapshots,
        2,
        log,
        "--deterministic",
        "--snapshot-interval-s",
        "0.05",
        restarts=3,
        env=env,
    )
    meta = wait_learned(snapshots, valid, process, log)
    stop(process)
    assert log.read_text().count("lockstep over gloo") == 8  # three crashes, each restarting both ranks
    assert meta.records_trained == valid
    assert dead_letters(bootstrap, topic) == invalid
    final = newest_meta(reference)
    assert final is not None
    assert_same(model_tensors(snapshots, meta.version), model_tensors(reference, final.version), exact=True)


def test_stopping_at_two_ranks_and_going_on_with_three_keeps_exact_accounting(
    bootstrap: str, tmp_path: Path
) -> None:
    topic = f"scale-{os.urandom(4).hex()}"
    kafka.ensure_topic(bootstrap, {}, topic, partitions=6)
    first, second = dataset(6, 300, seed=3, invalid_every=50), dataset(6, 200, seed=4, invalid_every=40)
    produce(bootstrap, topic, first)
    snapshots, log = tmp_path / "snapshots", tmp_path / "log"
    learned_first = sum(len(r) for r in first) - len(invalid_positions(first))
    process = launch(bootstrap, topic, snapshots, 2, log)
    wait_learned(snapshots, learned_first, process, log)
    stop(process)
    produce(bootstrap, topic, second)
    total_valid = learned_first + sum(len(r) for r in second) - len(invalid_positions(second))
    process = launch(bootstrap, topic, snapshots, 3, log)
    meta = wait_learned(snapshots, total_valid, process, log)
    stop(process)
    assert meta.records_trained == total_valid
    assert meta.world is not None and meta.world["size"] == 3
    assert meta.offsets[topic] == {p: 500 for p in range(6)}
    second_invalid = [(p, 300 + i) for p, i in invalid_positions(second)]
    assert dead_letters(bootstrap, topic) == sorted(invalid_positions(first) + second_invalid)


def test_fewer_partitions_than_ranks_is_refused_in_one_line(bootstrap: str, tmp_path: Path) -> None:
    topic = f"scale-{os.urandom(4).hex()}"
    kafka.ensure_topic(bootstrap, {}, topic, partitions=1)
    process = launch(bootstrap, topic, tmp_path / "snapshots", 2, tmp_path / "log")
    assert process.wait(60) != 0
    errors = [line for line in (tmp_path / "log").read_text().splitlines() if "error:" in line]
    assert errors and all(
        line.endswith(f"--topic {topic} has 1 partitions, fewer than the 2 ranks: every rank must own one "
                      "(add partitions, or run fewer ranks)")
        for line in errors
    ), errors  # fmt: skip
