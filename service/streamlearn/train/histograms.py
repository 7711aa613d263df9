"""The binned distributions feature drift compares: a reference frozen after warm-up and a
recent window faded over about `window` records, per numeric feature (PSI and binned KS) and per
categorical feature (PSI over the frequent categories, and the share never seen before)."""

import numpy as np

EPS = 1e-4  # floor for bin proportions in the PSI

COMPARE_BUDGET = 4_000_000  # values x edges compared at once when binning a batch


class _Windows:
    """The lifecycle both histograms share: records gathered in a warm-up until a reference is
    frozen from them, then binned in chunks of window / 4 into a faded recent window; restarted
    after a detection; saved and restored as arrays."""

    ARRAYS: tuple[str, ...] = ("reference", "recent")  # what is None until frozen, and saved

    def __init__(self, window: int) -> None:
        self.window = window
        self.reference: np.ndarray | None = None  # [rows, bins] proportions
        self.recent: np.ndarray | None = None  # [rows, bins] faded counts
        self.warmup: list[np.ndarray] = []
        self.pending: list[np.ndarray] = []  # records not binned yet

    def _warm(self, x: np.ndarray) -> None:
        """Gather records until there are `window` of them, then freeze the reference from them."""
        self.warmup.append(x)
        if sum(len(b) for b in self.warmup) >= self.window:
            self.freeze(np.concatenate(self.warmup))

    def _chunk(self, x: np.ndarray) -> np.ndarray | None:
        """The pending records once they are window / 4 or more (then none are pending)."""
        self.pending.append(x)
        if sum(len(b) for b in self.pending) < self.window // 4:
            return None
        chunk = np.concatenate(self.pending) if len(self.pending) > 1 else x
        self.pending = []
        return chunk

    def _fade(self, counts: np.ndarray, records: int) -> None:
        """Add a chunk's counts to the recent window, fading it over about `window` records."""
        keep = (1 - 1 / self.window) ** records
        self.recent = counts if self.recent is None else keep * self.recent + counts

    def _frozen(self, reference: np.ndarray) -> None:
        self.reference, self.recent = reference, None
        self.warmup, self.pending = [], []

    def _filled(self) -> bool:
        """Both windows hold enough records to compare."""
        return not (
            self.reference is None or self.recent is None or self.recent.sum(axis=1).min() < self.window / 4
        )

    def freeze(self, sample: np.ndarray) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        """Build a new reference from the records that come next."""
        for name in self.ARRAYS:
            setattr(self, name, None)
        self.warmup, self.pending = [], []

    def state(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for name in self.ARRAYS:
            if (value := getattr(self, name)) is not None:
                arrays[name] = value
        for name in ("warmup", "pending"):
            if parts := getattr(self, name):
                arrays[name] = np.concatenate(parts)
        return arrays

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        for name in self.ARRAYS:
            setattr(self, name, arrays.get(name))
        for name in ("warmup", "pending"):
            setattr(self, name, [arrays[name]] if name in arrays else [])


class Histograms(_Windows):
    """Per-feature binned distributions: a frozen reference and a faded recent window.

    Records are binned in chunks of at least window / 4 (a few micro-batches): a feature's
    distribution moves over thousands of records, and binning per micro-batch cost more than
    the training step of a small model.
    """

    ARRAYS = ("edges", "reference", "recent")

    def __init__(self, n_bins: int = 10, window: int = 2000) -> None:
        super().__init__(window)
        self.n_bins = n_bins
        self.edges: np.ndarray | None = None  # [d, n_bins - 1] inner bin edges from reference quantiles

    def update(self, x: np.ndarray) -> None:
        if self.edges is None:
            self._warm(x)
            return
        if (chunk := self._chunk(x)) is not None:
            self._fade(self._counts(chunk), len(chunk))

    def freeze(self, sample: np.ndarray) -> None:
        """Take `sample` as the reference distribution."""
        quantiles = np.linspace(0, 1, self.n_bins + 1)[1:-1]
        self.edges = np.quantile(sample, quantiles, axis=0).T  # [d, n_bins - 1]
        counts = self._counts(sample)
        self._frozen(counts / counts.sum(axis=1, keepdims=True))

    def _counts(self, x: np.ndarray) -> np.ndarray:
        """[d, n_bins] counts of each feature's values per bin: one comparison over the batch."""
        edges = self.edges
        assert edges is not None
        n, d = x.shape
        counts = np.empty((d, self.n_bins))
        step = max(1, COMPARE_BUDGET // max(n * edges.shape[1], 1))  # features per chunk
        for start in range(0, d, step):  # one chunk for any usual width; bounded memory for wide ones
            part = edges[start : start + step]
            bins = (x[:, start : start + step, None] >= part[None]).sum(axis=2)  # [n, chunk]
            flat = bins + np.arange(len(part)) * self.n_bins  # bin index per feature, made unique
            counts[start : start + step] = np.bincount(
                flat.ravel(), minlength=len(part) * self.n_bins
            ).reshape(len(part), self.n_bins)
        return counts

    def scores(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-feature PSI and binned KS statistic, once both windows have enough data."""
        if not self._filled():
            return None
        assert self.reference is not None and self.recent is not None
        cached = getattr(self, "_scored", None)
        if cached is not None and cached[0] is self.recent:  # nothing binned since
            return cached[1]
        recent = self.recent / self.recent.sum(axis=1, keepdims=True)
        p, q = np.clip(self.reference, EPS, None), np.clip(recent, EPS, None)
        psi = ((q - p) * np.log(q / p)).sum(axis=1)
        ks = np.abs(np.cumsum(self.reference, axis=1) - np.cumsum(recent, axis=1)).max(axis=1)
        self._scored = (self.recent, (psi, ks))
        return psi, ks


class CategoryHistograms(_Windows):
    """Per categorical feature: its distribution over the reference window's most frequent
    categories plus one "other" bin (frozen and faded like Histograms), and the share of
    categories never seen before, faded over about `window` records.

    Categories are their table rows (records.py hashes them), so two that share a row count as
    one, and "never seen" means a row no record of the stream had used.
    """

    ARRAYS = ("rows", "reference", "recent")  # reference, recent: [features, top + 1]

    def __init__(self, slot_feature: np.ndarray, buckets: int, top: int = 20, window: int = 2000) -> None:
        super().__init__(window)
        self.slot_feature = slot_feature  # [slots] feature index of each slot
        self.n_features = int(slot_feature.max()) + 1 if len(slot_feature) else 0
        self.top = top
        self.seen = np.zeros((buckets + 7) // 8, np.uint8)  # a bit per row: used by some record
        self.rows: np.ndarray | None = None  # [features, top] the reference's frequent rows (-1: none)
        self.unseen = np.zeros((self.n_features, 2))  # faded (never-seen categories, categories)

    def update(self, ids: np.ndarray) -> None:
        if (chunk := self._chunk(ids)) is None:
            return
        self._count_unseen(chunk)
        if self.rows is None:
            self._warm(chunk)
            return
        self._fade(self._counts(chunk), len(chunk))

    def _count_unseen(self, ids: np.ndarray) -> None:
        used = ids >= 0
        rows = np.where(used, ids, 0)
        before = (self.seen[rows >> 3] >> (rows & 7).astype(np.uint8)) & 1
        new = used & (before == 0)
        features = np.broadcast_to(self.slot_feature, ids.shape)
        counts = np.stack([
            np.bincount(features[new], minlength=self.n_features),
            np.bincount(features[used], minlength=self.n_features),
        ], axis=1).astype(np.float64)  # fmt: skip
        np.bitwise_or.at(self.seen, rows[used] >> 3, (1 << (rows[used] & 7)).astype(np.uint8))
        keep = (1 - 1 / self.window) ** len(ids)
        self.unseen = keep * self.unseen + counts

    def freeze(self, ids: np.ndarray) -> None:
        """Take these records' categories as the reference: their most frequent rows, and the rest."""
        self.rows = np.full((self.n_features, self.top), -1, np.int64)
        for f in range(self.n_features):
            values = ids[:, self.slot_feature == f].ravel()
            values = values[values >= 0]
            if len(values):
                unique, counts = np.unique(values, return_counts=True)
                frequent = unique[np.argsort(-counts, kind="stable")[: self.top]]
                self.rows[f, : len(frequent)] = frequent
        counts = self._counts(ids)
        self._frozen(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1))

    def _counts(self, ids: np.ndarray) -> np.ndarray:
        """[features, top + 1] counts of each feature's categories per bin (the last: other)."""
        assert self.rows is not None
        counts = np.zeros((self.n_features, self.top + 1))
        for f in range(self.n_features):
            values = ids[:, self.slot_feature == f].ravel()
            values = values[values >= 0]
            rows = self.rows[f]
            match = values[:, None] == rows[None, :]  # [values, top]
            counts[f, : self.top] = match.sum(axis=0)
            counts[f, self.top] = len(values) - match.any(axis=1).sum()
        return counts

    def scores(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per feature: PSI between the windows (None until both are filled), and the unseen share."""
        if not self._filled():
            return None
        assert self.reference is not None and self.recent is not None
        recent = self.recent / np.maximum(self.recent.sum(axis=1, keepdims=True), 1e-12)
        p, q = np.clip(self.reference, EPS, None), np.clip(recent, EPS, None)
        return ((q - p) * np.log(q / p)).sum(axis=1), self.unseen_share()

    def unseen_share(self) -> np.ndarray:
        return self.unseen[:, 0] / np.maximum(self.unseen[:, 1], 1e-12)

    def state(self) -> dict[str, np.ndarray]:
        return {"seen": self.seen, "unseen": self.unseen, **super().state()}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.seen, self.unseen = arrays["seen"].copy(), arrays["unseen"].copy()
        super().load_state(arrays)
