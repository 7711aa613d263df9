"""SnapshotStore: atomic versions, integrity checks, retention."""

import os

import pytest
import torch

from streamlearn.errors import SnapshotError
from streamlearn.snapshots import META, WEIGHTS, BackgroundWriter, SnapshotStore


def tensors(value: float = 1.0) -> dict[str, torch.Tensor]:
    return {"model.w": torch.full((3, 2), value), "model.b": torch.zeros(2)}


def test_versions_are_monotonic_and_self_describing(tmp_path):
    store = SnapshotStore(tmp_path)
    first = store.save("m", tensors(1.0), {"records_trained": 10})
    second = store.save("m", tensors(2.0), {"records_trained": 20})
    assert (first.version, second.version) == (1, 2)
    loaded = store.load("m", 2)
    assert loaded.meta["records_trained"] == 20 and loaded.meta["model_name"] == "m"
    assert torch.equal(loaded.tensors["model.w"], torch.full((3, 2), 2.0))
    assert store.models() == ["m"] and store.versions("m") == [1, 2]


def test_only_the_newest_k_are_kept(tmp_path):
    store = SnapshotStore(tmp_path, keep=3)
    for i in range(7):
        store.save("m", tensors(i), {})
    assert store.versions("m") == [5, 6, 7]
    assert store.save("m", tensors(), {}).version == 8


def test_a_corrupt_newest_snapshot_is_skipped_for_the_previous_one(tmp_path):
    store = SnapshotStore(tmp_path)
    store.save("m", tensors(1.0), {})
    store.save("m", tensors(2.0), {})
    weights = tmp_path / "m" / f"{2:012d}" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated
    with pytest.raises(SnapshotError, match="checksum"):
        store.load("m", 2)
    latest = store.load_latest("m")
    assert latest is not None and latest.version == 1


def test_unreadable_metadata_is_skipped(tmp_path):
    store = SnapshotStore(tmp_path)
    store.save("m", tensors(1.0), {})
    store.save("m", tensors(2.0), {})
    (tmp_path / "m" / f"{2:012d}" / META).write_text("{not json")
    assert store.load_latest("m").version == 1


def test_readers_never_see_unfinished_temporary_directories(tmp_path):
    store = SnapshotStore(tmp_path)
    store.save("m", tensors(), {})
    (tmp_path / "m" / ".tmp-2-abc").mkdir()
    assert store.versions("m") == [1] and store.models() == ["m"]


def test_stale_temporary_directories_are_cleaned_on_prune(tmp_path):
    store = SnapshotStore(tmp_path)
    store.save("m", tensors(), {})
    stale = tmp_path / "m" / ".tmp-9-dead"
    stale.mkdir()
    os.utime(stale, (0, 0))
    store.save("m", tensors(), {})
    assert not stale.exists()


def test_an_unwritable_root_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SnapshotError, match="not writable"):
        SnapshotStore(blocker / "snapshots").ensure_writable()


def test_background_writer_saves_off_the_calling_thread(tmp_path):
    writer = BackgroundWriter(SnapshotStore(tmp_path))
    future = writer.submit("m", tensors(3.0), {"records_trained": 1})
    snapshot = future.result(timeout=10)
    writer.close()
    assert snapshot.version == 1 and SnapshotStore(tmp_path).load("m", 1).meta["records_trained"] == 1
