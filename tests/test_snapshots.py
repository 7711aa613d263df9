"""Snapshot stores: one contract (atomic versions, integrity checks, retention) for every backend.

Each contract test runs against a directory and against S3 (a local moto server on loopback).
"""

import os
import threading

import fsspec
import orjson
import pytest
import torch

from streamlearn.errors import SnapshotError, SnapshotStoreUnavailable
from streamlearn.snapshots import (
    META,
    BackgroundWriter,
    LocalSnapshotStore,
    SnapshotContent,
    SnapshotStore,
    open_store,
)
from streamlearn.snapshots import objects as object_backend
from streamlearn.snapshots import store as store_module
from streamlearn.snapshots.objects import ObjectSnapshotStore


def tensors(value: float = 1.0) -> dict[str, torch.Tensor]:
    return {"model.w": torch.full((3, 2), value), "model.b": torch.zeros(2)}


@pytest.fixture(params=["directory", "s3"])
def location(request, tmp_path) -> str:
    """Where a store lives: a directory, or a new bucket on the local S3 server."""
    if request.param == "directory":
        return str(tmp_path / "snapshots")
    return request.getfixturevalue("s3_url")


def raw(store: SnapshotStore) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem under a store and its root, to tamper with files as a fault would."""
    if isinstance(store, ObjectSnapshotStore):
        return store.fs, store.root
    assert isinstance(store, LocalSnapshotStore)
    return fsspec.filesystem("file"), str(store.root)


def file_of(store: SnapshotStore, version: int, name: str) -> str:
    return f"{raw(store)[1]}/m/{version:012d}/{name}"


def test_open_store_picks_the_backend_from_the_location(tmp_path, s3_url):
    assert isinstance(open_store(tmp_path), LocalSnapshotStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalSnapshotStore)
    assert open_store(f"file://{tmp_path}").location == str(tmp_path)
    assert isinstance(open_store(s3_url), ObjectSnapshotStore)


def test_an_unknown_url_scheme_is_a_clear_error():
    with pytest.raises(SnapshotError, match="bogus"):
        open_store("bogus://bucket/prefix")


def test_versions_are_monotonic_and_self_describing(location):
    store = open_store(location)
    first = store.save("m", tensors(1.0), SnapshotContent(records_trained=10))
    second = store.save("m", tensors(2.0), SnapshotContent(records_trained=20))
    assert (first.version, second.version) == (1, 2)
    loaded = store.load("m", 2)
    assert loaded.meta.records_trained == 20 and loaded.meta.model_name == "m"
    assert torch.equal(loaded.tensors["model.w"], torch.full((3, 2), 2.0))
    assert store.models() == ["m"] and store.versions("m") == [1, 2]


def test_an_empty_store_has_no_models_and_no_versions(location):
    store = open_store(location)
    assert store.models() == [] and store.versions("m") == [] and store.load_latest("m") is None


def test_only_the_newest_k_are_kept(location, monkeypatch):
    monkeypatch.setattr(store_module, "STALE_CLAIM_S", -1.0)  # every claim is old: all but the newest go
    store = open_store(location, keep=3)
    for i in range(7):
        store.save("m", tensors(i), SnapshotContent())
    assert store.versions("m") == [5, 6, 7]
    assert store.save("m", tensors(), SnapshotContent()).version == 8
    fs, root = raw(store)
    assert sorted(path.rsplit("/", 1)[-1] for path in fs.ls(f"{root}/m", detail=False)) == [
        ".claimed-000000000008",
        *(f"{v:012d}" for v in (6, 7, 8)),
    ]


def test_a_corrupt_newest_snapshot_is_skipped_for_the_previous_one(location):
    store = open_store(location)
    store.save("m", tensors(1.0), SnapshotContent())
    newest = store.save("m", tensors(2.0), SnapshotContent())
    fs, _ = raw(store)
    weights = file_of(store, 2, newest.meta.weights_file)
    fs.pipe_file(weights, fs.cat_file(weights)[:-7])  # truncated
    with pytest.raises(SnapshotError, match="checksum"):
        store.load("m", 2)
    latest = store.load_latest("m")
    assert latest is not None and latest.version == 1


def test_unreadable_metadata_is_skipped(location):
    store = open_store(location)
    store.save("m", tensors(1.0), SnapshotContent())
    store.save("m", tensors(2.0), SnapshotContent())
    raw(store)[0].pipe_file(file_of(store, 2, META), b"{not json")
    assert store.load_latest("m").version == 1


def test_metadata_naming_weights_outside_its_version_is_refused(location):
    store = open_store(location)
    store.save("m", tensors(1.0), SnapshotContent())
    fs, _ = raw(store)
    meta = fs.cat_file(file_of(store, 1, META)).decode()
    escaped = meta.replace('"weights_file": "', '"weights_file": "../../')
    fs.pipe_file(file_of(store, 1, META), escaped.encode())
    with pytest.raises(SnapshotError, match="no valid safetensors file"):
        store.load("m", 1)


def test_the_training_state_is_a_file_of_its_own_that_serving_never_reads(location):
    store = open_store(location)
    saved = {
        **tensors(1.0),
        "optim.0.exp_avg": torch.ones(3),
        "drift.seen": torch.zeros(2, dtype=torch.uint8),
    }
    snapshot = store.save("m", saved, SnapshotContent())
    assert snapshot.meta.training_file is not None and snapshot.meta.training_bytes > 0
    assert set(store.load("m", 1).tensors) == set(saved)
    assert set(store.load("m", 1, training=False).tensors) == set(tensors(1.0))
    fs, _ = raw(store)
    fs.pipe_file(file_of(store, 1, snapshot.meta.training_file), b"corrupt")
    assert set(store.load("m", 1, training=False).tensors) == set(tensors(1.0))  # serving goes on
    with pytest.raises(SnapshotError, match="training state checksum mismatch"):
        store.load("m", 1)


def test_readers_never_see_an_unpublished_version(location):
    store = open_store(location)
    store.save("m", tensors(), SnapshotContent())
    fs, root = raw(store)
    if isinstance(store, LocalSnapshotStore):
        fs.makedirs(f"{root}/m/.tmp-2-abc")
    else:  # weights written, meta.json not yet: the writer crashed before publishing
        fs.pipe_file(f"{root}/m/{2:012d}/weights-abc.safetensors", b"partial")
    assert store.versions("m") == [1] and store.models() == ["m"]
    assert (
        store.save("m", tensors(), SnapshotContent()).version == 2
    )  # an unpublished version is free to take


def test_concurrent_writers_never_share_a_version(location):
    stores = [open_store(location, keep=100), open_store(location, keep=100)]
    saved: list[int] = []

    def write(store: SnapshotStore, value: float) -> None:
        for _ in range(8):
            saved.append(store.save("m", tensors(value), SnapshotContent(writer=value)).version)

    threads = [threading.Thread(target=write, args=(store, i)) for i, store in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(saved) == list(range(1, 17))
    for version in saved:  # each version is whole: one writer's weights under its own meta.json
        snapshot = stores[0].load("m", version)
        assert torch.equal(snapshot.tensors["model.w"], tensors(snapshot.meta.writer)["model.w"])


def delete_versions(store: SnapshotStore, *versions: int) -> None:
    """Delete published versions whole, as an operator would (rm -r, aws s3 rm --recursive)."""
    fs, root = raw(store)
    for version in versions:
        fs.rm(f"{root}/m/{version:012d}", recursive=True)


@pytest.mark.parametrize("deleted", ["newest", "all"])
def test_a_deleted_version_number_is_never_reused(location, deleted):
    store = open_store(location)
    for i in range(3):
        store.save("m", tensors(i), SnapshotContent())
    delete_versions(store, *([3] if deleted == "newest" else [1, 2, 3]))
    assert store.versions("m") == ([1, 2] if deleted == "newest" else [])
    restarted = open_store(location)  # a restarted trainer knows only what the store holds
    assert restarted.save("m", tensors(9.0), SnapshotContent()).version == 4
    assert restarted.versions("m") == ([1, 2, 4] if deleted == "newest" else [4])


def test_version_numbers_outlive_pruning_and_deletion(location):
    store = open_store(location, keep=2)
    for i in range(5):
        store.save("m", tensors(i), SnapshotContent())
    assert store.versions("m") == [4, 5]
    delete_versions(store, 5)
    assert store.save("m", tensors(), SnapshotContent()).version == 6
    delete_versions(store, 4, 6)
    assert open_store(location, keep=2).save("m", tensors(), SnapshotContent()).version == 7
    assert store.versions("m") == [7]


def test_a_writer_that_dies_between_claim_and_publish_leaves_a_gap(location, monkeypatch):
    store = open_store(location)
    store.save("m", tensors(1.0), SnapshotContent())

    def die(*args: object) -> bool:
        raise OSError("the writer died before publishing")

    monkeypatch.setattr(store, "_publish", die)
    with pytest.raises(OSError):
        store.save("m", tensors(2.0), SnapshotContent())
    assert store.versions("m") == [1]
    assert open_store(location).save("m", tensors(3.0), SnapshotContent()).version == 3


def test_old_claims_are_pruned_but_never_the_newest():
    from streamlearn.snapshots.store import stale_claims

    ages = {1: 61.0, 2: 5.0, 3: 3600.0, 4: None, 5: 3600.0}
    assert sorted(stale_claims(ages)) == [1, 3]  # 5 holds the count; 2 may be a writer deciding


def test_background_writer_saves_off_the_calling_thread(location):
    writer = BackgroundWriter(open_store(location))
    future = writer.submit(
        "m", tensors(3.0), SnapshotContent(records_trained=1), prepare=lambda: {"extra": 2}
    )
    snapshot = future.result(timeout=10)
    writer.close()
    loaded = open_store(location).load("m", 1)
    assert snapshot.version == 1 and loaded.meta.records_trained == 1 and loaded.meta.extra == 2


# -- directory backend --------------------------------------------------------------------------


def test_stale_temporary_directories_are_cleaned_on_prune(tmp_path):
    store = LocalSnapshotStore(tmp_path)
    store.save("m", tensors(), SnapshotContent())
    stale = tmp_path / "m" / ".tmp-9-dead"
    stale.mkdir()
    os.utime(stale, (0, 0))
    store.save("m", tensors(), SnapshotContent())
    assert not stale.exists()


def test_an_unwritable_root_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SnapshotError, match="not writable"):
        LocalSnapshotStore(blocker / "snapshots").ensure_writable()


# -- object-store backend -----------------------------------------------------------------------


def test_unpublished_weights_are_pruned_once_stale(s3_url, monkeypatch):
    store = open_store(s3_url)
    store.save("m", tensors(), SnapshotContent())
    orphan = f"{store.root}/m/{7:012d}/weights-crashed.safetensors"
    store.fs.pipe_file(orphan, b"left by a crashed writer")
    store.prune("m")
    assert store.fs.exists(orphan)  # it may be a write in progress
    monkeypatch.setattr(object_backend, "STALE_UNPUBLISHED_S", -1.0)
    store.prune("m")
    assert not store.fs.exists(orphan) and store.versions("m") == [1]


def test_a_missing_bucket_is_a_clear_error(s3_endpoint):
    with pytest.raises(SnapshotError, match=r"not writable.*does not exist"):
        open_store("s3://no-such-bucket-here/snapshots").ensure_writable()


def test_an_unreachable_store_is_an_outage_not_an_empty_store(s3_url, monkeypatch):
    open_store(s3_url).save("m", tensors(), SnapshotContent())
    from streamlearn.dev.broker import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # fail fast; the default retries take ~8 s
    store = open_store(s3_url)
    # A trainer must not mistake an outage for "no snapshot yet" and start over from scratch.
    with pytest.raises(SnapshotStoreUnavailable, match="failed"):
        store.load_latest("m")
    with pytest.raises(SnapshotStoreUnavailable):
        store.models()


def test_metadata_of_another_format_is_refused_naming_the_format(tmp_path):
    store = LocalSnapshotStore(tmp_path)
    store.save("m", tensors(), SnapshotContent())
    meta = (tmp_path / "m" / f"{1:012d}" / META).read_text()
    (tmp_path / "m" / f"{1:012d}" / META).write_text(
        meta.replace("streamlearn-snapshot/1", "streamlearn-snapshot/9")
    )
    with pytest.raises(
        SnapshotError, match="format 'streamlearn-snapshot/9' is not 'streamlearn-snapshot/1'"
    ):
        store.load("m", 1)


def test_a_snapshot_written_before_the_typed_contract_still_loads(tmp_path):
    """meta.json as the first releases wrote it: string partitions, the model spec twice."""
    store = LocalSnapshotStore(tmp_path)
    written = store.save("m", tensors(), SnapshotContent())
    path = tmp_path / "m" / f"{1:012d}" / META
    old = {
        **{k: v for k, v in orjson.loads(path.read_bytes()).items() if k not in ("offsets", "dlq")},
        "records_trained": 7,
        "offsets": {"events": {"0": 5, "3": 9}},
        "dlq": {"topic": "events.dlq", "marks": {"0": 2}},
        "task": "binary",
        "classes": ["0", "1"],
        "features": {"n_features": 3, "names": []},
        "architecture": {"arch": "mlp", "hidden": [8]},
    }
    path.write_bytes(orjson.dumps(old))

    loaded = store.load("m", 1).meta

    assert loaded.records_trained == 7 and loaded.offsets == {"events": {0: 5, 3: 9}}
    assert loaded.dlq is not None and loaded.dlq.marks == {0: 2}
    assert loaded.weights_sha256 == written.meta.weights_sha256
