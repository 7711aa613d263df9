"""Categorical features through Kafka: exactly once across a crash, and served by name (issue 17)."""

import itertools
import os
import signal
import subprocess
import sys

import orjson
import torch

from streamlearn.dev.streams import records
from streamlearn.snapshots import LocalSnapshotStore

from ..conftest import wait_for
from .conftest import publish, track
from .test_delivery import offsets_done

FLAGS = {  # the payments stream, small enough to learn in seconds
    "task": "binary", "deterministic": True, "batch_size": 50, "hidden": "16", "hash_buckets": 4096,
    "embedding_dim": 4, "multi_categorical": "tags", "min_count": 2, "dlq_topic": "",
}  # fmt: skip


def payments(n: int) -> list[bytes | None]:
    values: list[bytes | None] = [orjson.dumps(r) for r in itertools.islice(records("payments", seed=5), n)]
    values[77] = b'{"features": {"amount": 3.0, "hour": 1, "merchant": 12}, "label": true}'  # wrong kind
    return values


def test_a_crash_neither_loses_nor_repeats_a_record_with_categorical_features(
    bootstrap, make_topic, start_trainer, tmp_path
):
    topic, n = make_topic(), 3000
    publish(bootstrap, topic, payments(n))
    crashing = LocalSnapshotStore(tmp_path / "crashing")
    args = [
        sys.executable, "-m", "streamlearn", "train", "--bootstrap", bootstrap, "--topic", topic,
        "--group", f"g-{topic}", "--session-timeout-ms", "3000", "--snapshot-dir", str(crashing.root),
        "--snapshot-interval-s", "0.2", "--log-level", "warning",
    ]  # fmt: skip
    for name, setting in FLAGS.items():
        args += ["--" + name.replace("_", "-")] + ([] if setting is True else [str(setting)])
    crash = track(
        subprocess.Popen(args, env={**os.environ, "STREAMLEARN_CRASH_AT": "snapshot.after_publish:2"})
    )
    assert crash.wait(60) == -signal.SIGKILL
    assert 0 < crashing.load_latest("default").meta.records_trained < n - 1

    resumed = start_trainer(topic, group=f"g-{topic}", snapshot_dir=crashing.root, **FLAGS)
    done = wait_for(lambda: offsets_done(crashing, topic, {0: n}), 60, what="the resumed run")
    resumed.stop()
    reference_store = LocalSnapshotStore(tmp_path / "reference")
    reference = start_trainer(topic, group=f"ref-{topic}", snapshot_dir=reference_store.root, **FLAGS)
    expected = wait_for(lambda: offsets_done(reference_store, topic, {0: n}), 60, what="the reference run")
    reference.stop()

    assert done.meta.records_trained == expected.meta.records_trained == n - 1
    assert done.meta.model["features"]["categorical"] == ["country", "device", "merchant"]
    final = crashing.load_latest("default").tensors
    compared = [name for name in expected.tensors if name.startswith(("model.", "optim."))]
    assert "model.categories.table.weight" in compared and "model.categories.counts" in compared
    for name in compared:
        assert torch.equal(expected.tensors[name], final[name]), name
