"""Drift detection, cheap enough to run on every micro-batch.

- Concept drift on the prequential error stream (0/1 errors for classification, the loss scaled
  by its running mean for regression): ADWIN (Bifet & Gavalda, 2007) over micro-batch summaries,
  and Page-Hinkley (Page, 1954), both vectorised over the batch.
- Feature drift: per feature, the population stability index (PSI) and a binned
  Kolmogorov-Smirnov statistic between a reference window (frozen after warm-up, and again after
  each detection) and a recent window (exponentially faded, about `window` records).
- Label drift: the same two statistics over class priors, or a shift of the label mean measured
  in reference standard deviations for regression.
"""

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamlearn.snapshots.tensors import unprefixed
from streamlearn.train.histograms import EPS, CategoryHistograms, Histograms


@dataclass
class Adwin:
    """ADWIN over micro-batch summaries: drops the older part of the window when the means of the
    two parts differ by more than the Hoeffding-style bound for confidence `delta`. It adapts to a
    change either way, but reports only a rise (more errors): a model getting better is no drift."""

    delta: float = 0.002
    max_summaries: int = 64
    min_records: int = 64
    summaries: deque[tuple[float, float, float]] = field(default_factory=deque)  # (n, sum, sum of squares)

    def update(self, values: np.ndarray) -> bool:
        """Add a batch of values; True when a change was detected (the window then shrinks)."""
        if len(values) == 0:
            return False
        self.summaries.append((float(len(values)), float(values.sum()), float((values**2).sum())))
        if len(self.summaries) > self.max_summaries:
            self._merge_oldest()
        return self._cut()

    def _merge_oldest(self) -> None:
        # Merge the two adjacent summaries whose combined size is smallest (older ones grow first).
        sizes = [self.summaries[i][0] + self.summaries[i + 1][0] for i in range(len(self.summaries) - 1)]
        i = int(np.argmin(sizes))
        a, b = self.summaries[i], self.summaries[i + 1]
        self.summaries[i] = (a[0] + b[0], a[1] + b[1], a[2] + b[2])
        del self.summaries[i + 1]

    def _cut(self) -> bool:
        totals = np.array(self.summaries)
        n, total, squares = totals.sum(axis=0)
        if n < self.min_records or len(totals) < 2:
            return False
        variance = max(squares / n - (total / n) ** 2, 0.0)
        log_term = math.log(2 * math.log(n) / self.delta)
        head = np.cumsum(totals[:-1], axis=0)  # the older part W0 at each boundary
        n0, s0 = head[:, 0], head[:, 1]
        n1, s1 = n - n0, total - s0
        m = 1 / (1 / n0 + 1 / n1)
        bound = np.sqrt(2 / m * variance * log_term) + 2 / (3 * m) * log_term
        gap = s1 / n1 - s0 / n0
        cut = np.nonzero(np.abs(gap) > bound)[0]
        if len(cut) == 0:
            return False
        last = int(cut[-1])
        for _ in range(last + 1):  # drop the older part up to the latest significant boundary
            self.summaries.popleft()
        return bool(gap[last] > 0)

    def reset(self) -> None:
        self.summaries.clear()


@dataclass
class PageHinkley:
    """Page-Hinkley test for an increase of the mean: the cumulative deviation from the running
    mean (minus `delta`, faded by `alpha` per record) rising more than `threshold` above its minimum."""

    delta: float = 0.05
    threshold: float = 50.0
    alpha: float = 1.0
    min_records: int = 30
    count: int = 0
    total: float = 0.0
    cumulative: float = 0.0
    minimum: float = 0.0
    last_statistic: float = 0.0

    def update(self, values: np.ndarray) -> bool:
        if len(values) == 0:
            return False
        counts = self.count + np.arange(1, len(values) + 1)
        means = (self.total + np.cumsum(values)) / counts
        # m_t = alpha * m_(t-1) + d_t, for the whole batch at once
        fade = self.alpha ** np.arange(1, len(values) + 1)
        cumulative = fade * (self.cumulative + np.cumsum((values - means - self.delta) / fade))
        minimum = np.minimum.accumulate(np.minimum(cumulative, self.minimum))
        statistic = cumulative - minimum
        fired = (statistic > self.threshold) & (counts >= self.min_records)
        self.count, self.total = int(counts[-1]), float(self.total + values.sum())
        self.cumulative, self.minimum = float(cumulative[-1]), float(minimum[-1])
        self.last_statistic = float(statistic[-1])
        if fired.any():
            self.reset()
            return True
        return False

    @property
    def score(self) -> float:
        return getattr(self, "last_statistic", 0.0) / self.threshold

    def reset(self) -> None:
        self.count, self.total, self.cumulative, self.minimum = 0, 0.0, 0.0, 0.0
        self.last_statistic = 0.0


@dataclass
class DriftReport:
    """What one micro-batch's drift checks found."""

    concept: list[str]  # detectors that fired on the error stream
    feature_psi: dict[str, float]  # every feature's PSI (empty until both windows are filled)
    feature_psi_max: float | None
    feature_ks_max: float | None
    top_features: list[tuple[str, float]]
    label_score: float | None
    feature_drift: bool
    label_drift: bool
    scores: dict[str, float]
    unseen: dict[str, float] = field(default_factory=dict)  # categorical: share of never-seen categories

    @property
    def detected(self) -> list[str]:
        return [
            *self.concept,
            *(["feature_psi"] if self.feature_drift else []),
            *(["label"] if self.label_drift else []),
        ]


class DriftMonitor:
    """All the drift checks of one model, updated with each micro-batch."""

    def __init__(
        self,
        feature_names: list[str],
        task: str,
        n_classes: int = 0,
        psi_threshold: float = 0.25,
        window: int = 2000,
        top_k: int = 5,
        categories: tuple[tuple[str, ...], np.ndarray, int] | None = None,
    ) -> None:
        """`categories`: the categorical features' names, each slot's feature, and the table's rows."""
        self.feature_names = feature_names
        self.task = task
        self.n_classes = n_classes
        self.psi_threshold = psi_threshold
        self.top_k = top_k
        self.adwin = Adwin()
        self.page_hinkley = PageHinkley()
        self.features = Histograms(window=window)
        self.category_names: tuple[str, ...] = ()
        self.categories: CategoryHistograms | None = None
        if categories is not None and categories[0]:
            self.category_names = categories[0]
            self.categories = CategoryHistograms(categories[1], categories[2], window=window)
        self.window = window
        self.loss_scale = 0.0  # regression: running mean loss, to make the error stream scale-free
        self.scale_count = 0
        self.label_reference: np.ndarray | None = None
        self.label_recent: np.ndarray | None = None
        self.label_warmup: list[np.ndarray] = []
        self.detections: dict[str, int] = {}
        self.last: DriftReport | None = None

    def update(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        errors: np.ndarray,
        categories: np.ndarray | None = None,
    ) -> DriftReport:
        stream = self._error_stream(errors)
        concept = [
            name
            for name, det in (("adwin", self.adwin), ("page_hinkley", self.page_hinkley))
            if det.update(stream)
        ]
        names: list[str] = []
        psis: list[np.ndarray] = []
        ks_max = None
        if self.feature_names:
            self.features.update(features)
            if (numeric := self.features.scores()) is not None:
                names += self.feature_names
                psis.append(numeric[0])
                ks_max = float(numeric[1].max())
        unseen: dict[str, float] = {}
        if self.categories is not None and categories is not None:
            self.categories.update(categories)
            unseen = dict(zip(self.category_names, map(float, self.categories.unseen_share()), strict=True))
            if (categorical := self.categories.scores()) is not None:
                names += self.category_names
                psis.append(categorical[0])
        psi_max = None
        top: list[tuple[str, float]] = []
        feature_drift = False
        per_feature: dict[str, float] = {}
        if psis:
            psi = np.concatenate(psis)
            per_feature = dict(zip(names, map(float, psi), strict=True))
            psi_max = float(psi.max())
            order = np.argsort(psi)[::-1][: self.top_k]
            top = [(names[i], round(float(psi[i]), 4)) for i in order]
            feature_drift = psi_max > self.psi_threshold
            if feature_drift:  # the new distribution becomes the reference
                self.features.restart()
                if self.categories is not None:
                    self.categories.restart()
        label_score = self._label_update(labels)
        label_drift = label_score is not None and label_score > self.psi_threshold
        if label_drift:
            self.label_reference, self.label_recent, self.label_warmup = None, None, []
        report = DriftReport(
            concept, per_feature, psi_max, ks_max, top, label_score, feature_drift, label_drift,
            scores={"adwin": self._adwin_score(), "page_hinkley": self.page_hinkley.score}, unseen=unseen,
        )  # fmt: skip
        for name in report.detected:
            self.detections[name] = self.detections.get(name, 0) + 1
        self.last = report
        return report

    def _error_stream(self, errors: np.ndarray) -> np.ndarray:
        if self.task != "regression":
            return errors.astype(np.float64)
        # Scale the loss by its running mean so the detectors' defaults fit any unit.
        self.scale_count += len(errors)
        self.loss_scale += (float(errors.mean()) - self.loss_scale) * len(errors) / self.scale_count
        return errors / max(self.loss_scale, 1e-12)

    def _adwin_score(self) -> float:
        """How far the recent half of ADWIN's window is from the older half, in window means (0 = none)."""
        summaries = list(self.adwin.summaries)
        if len(summaries) < 2:
            return 0.0
        half = len(summaries) // 2
        old, new = np.array(summaries[:half]).sum(axis=0), np.array(summaries[half:]).sum(axis=0)
        return float(abs(new[1] / new[0] - old[1] / old[0]))

    def _label_update(self, labels: np.ndarray) -> float | None:
        if self.task == "regression":
            values = np.array([[labels.mean(), (labels**2).mean(), len(labels)]]) if len(labels) else None
        else:
            k = max(self.n_classes, 2)
            values = np.bincount(labels.astype(np.int64), minlength=k)[None, :].astype(np.float64)
        if values is None:
            return None
        if self.label_reference is None:
            self.label_warmup.append(values)
            total = sum(v[0, -1] if self.task == "regression" else v.sum() for v in self.label_warmup)
            if total >= self.window:
                self.label_reference = self._combine(np.concatenate(self.label_warmup))
                self.label_warmup = []
            return None
        n = values[0, -1] if self.task == "regression" else values.sum()
        keep = (1 - 1 / self.window) ** n
        self.label_recent = values if self.label_recent is None else keep * self.label_recent + values
        return self._label_score()

    def _combine(self, rows: np.ndarray) -> np.ndarray:
        if self.task != "regression":
            return rows.sum(axis=0, keepdims=True)
        weights = rows[:, 2:3]
        means = (rows[:, :2] * weights).sum(axis=0) / weights.sum()
        return np.array([[means[0], means[1], weights.sum()]])

    def _label_score(self) -> float | None:
        assert self.label_reference is not None and self.label_recent is not None
        if self.task == "regression":
            ref_mean, ref_square, _ = self.label_reference[0]
            recent_mean = self.label_recent[0, 0]
            std = math.sqrt(max(ref_square - ref_mean**2, 1e-12))
            return float(abs(recent_mean - ref_mean) / std)  # shift of the mean, in reference std
        p = np.clip(self.label_reference[0] / self.label_reference.sum(), EPS, None)
        q = np.clip(self.label_recent[0] / self.label_recent.sum(), EPS, None)
        return float(((q - p) * np.log(q / p)).sum())

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Everything the detectors know, as arrays and JSON, so a restart detects as if it never
        happened (a drift response then changes learning exactly as in an uninterrupted run)."""
        arrays: dict[str, np.ndarray] = {}
        arrays.update({f"features.{k}": v for k, v in self.features.state().items()})
        for name in ("reference", "recent"):
            if (value := getattr(self, f"label_{name}")) is not None:
                arrays[f"labels.{name}"] = value
        if self.label_warmup:
            arrays["labels.warmup"] = np.concatenate(self.label_warmup)
        if self.categories is not None:
            arrays.update({f"categories.{k}": v for k, v in self.categories.state().items()})
        ph = self.page_hinkley
        meta = {
            "adwin": [list(summary) for summary in self.adwin.summaries],
            "page_hinkley": [ph.count, ph.total, ph.cumulative, ph.minimum, ph.last_statistic],
            "loss_scale": [self.loss_scale, self.scale_count],
            "detections": self.detections,
        }
        return arrays, meta

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.features.load_state(unprefixed(arrays, "features."))
        self.label_reference = arrays.get("labels.reference")
        self.label_recent = arrays.get("labels.recent")
        self.label_warmup = [arrays["labels.warmup"]] if "labels.warmup" in arrays else []
        if self.categories is not None and "categories.seen" in arrays:
            self.categories.load_state(unprefixed(arrays, "categories."))
        self.adwin.summaries = deque(tuple(summary) for summary in meta["adwin"])
        ph = self.page_hinkley
        ph.count, ph.total, ph.cumulative, ph.minimum, ph.last_statistic = meta["page_hinkley"]
        self.loss_scale, self.scale_count = meta["loss_scale"]
        self.detections = dict(meta["detections"])

    def to_dict(self) -> dict[str, Any]:
        """A summary for snapshot metadata and the model status endpoint."""
        last = self.last
        return {
            "detections": dict(self.detections),
            "feature_psi_max": last.feature_psi_max if last else None,
            "feature_ks_max": last.feature_ks_max if last else None,
            "top_drifting_features": [{"name": n, "psi": s} for n, s in (last.top_features if last else [])],
            "label_drift_score": last.label_score if last else None,
            **({"unseen_categories": last.unseen if last else {}} if self.categories is not None else {}),
        }
