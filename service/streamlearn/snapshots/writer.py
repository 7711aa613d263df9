"""BackgroundWriter: snapshots are written off the consumer loop, one at a time, in order."""

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from torch import Tensor

from streamlearn.snapshots.meta import SnapshotContent
from streamlearn.snapshots.store import Snapshot, SnapshotStore


class BackgroundWriter:
    """Writes snapshots on one background thread, so the consumer loop never waits on storage."""

    def __init__(self, store: SnapshotStore) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-writer")

    def submit(
        self,
        model_name: str,
        tensors: dict[str, Tensor],
        content: SnapshotContent,
        prepare: Callable[[], dict[str, Any]] | None = None,
    ) -> "Future[Snapshot]":
        """Save on the writer thread; `prepare` runs there first and adds to the metadata (or raises)."""

        def save() -> Snapshot:
            extra = prepare() if prepare is not None else {}
            return self.store.save(model_name, tensors, content.model_copy(update=extra))

        return self._pool.submit(save)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
