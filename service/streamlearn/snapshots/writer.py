"""BackgroundWriter: snapshots are written off the consumer loop, one at a time, in order."""

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from torch import Tensor

from streamlearn.snapshots.meta import SnapshotContent
from streamlearn.snapshots.store import Snapshot, SnapshotStore

log = logging.getLogger(__name__)


class BackgroundWriter:
    """Writes snapshots on one background thread, so the consumer loop never waits on storage.

    `on_published` is called on that thread with each snapshot as soon as it is published.
    """

    def __init__(self, store: SnapshotStore) -> None:
        self.store = store
        self.on_published: Callable[[Snapshot], None] | None = None
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
            snapshot = self.store.save(model_name, tensors, content.model_copy(update=extra))
            if self.on_published is not None:
                try:
                    self.on_published(snapshot)
                except Exception:  # telling others is best effort: the snapshot is durable
                    log.exception("announcing %s v%d failed", model_name, snapshot.version)
            return snapshot

        return self._pool.submit(save)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
