"""The trainer's label join: prediction-log entries and labels in, records to learn out.

`streamlearn train --labels-topic L --prediction-log-topic P` learns what the server served,
once its label came: LabelJoin parses each message of both topics, feeds the PartitionJoin of
its partition (the two topics are partitioned alike by the prediction id), and queues what
joins as JoinedRecords: the logged features with the label, in the record contract's JSON, which
the pipeline decodes and learns like any micro-batch. The entry or label a record came from is
its source: its offsets, its dead letter if the record is refused.

A message of either topic that breaks its contract is refused with a reason (dead-lettered); an
entry logged for another model is skipped, counted; a `ts` more than `max_skew_ms` past the
trainer's clock (microseconds, say) is refused, as it would carry the join's clock along. What
waits is bounded in bytes too (`max_pending_bytes`, over all partitions): beyond it the oldest
entry of the largest partition is evicted, counted.

Everything a restart needs (each pair's join state, the joined records not yet learned, the
scores) is JSON, kept in the snapshot's training file, so the snapshot's offsets of both topics
and the join's state always agree. A waiting prediction is kept there as a reference to its
offset in the prediction log, not as its features: the log is durable and holds them already,
so every snapshot costs some bytes per waiting prediction whatever the clients sent, and restore()
reads those entries again (an entry the log no longer holds is evicted, counted).

Besides the records to learn it scores what was served: each logged prediction against the label
that came for it (accuracy, or the squared error for regression), per served version.
"""

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from streamlearn.decoding import Rejected
from streamlearn.errors import InvalidReason, InvalidRecord
from streamlearn.logentry import PredictionEntry, join_id, join_ts
from streamlearn.records import LabelSpec, fits_float32
from streamlearn.train.join import OUTCOMES, Joined, Label, Logged, PartitionJoin
from streamlearn.train.joinrecord import FINGERPRINT_SPACE, JoinedRecord, fingerprint, parsed
from streamlearn.train.partitions import Consumed, Key, position

log = logging.getLogger(__name__)

PREDICTION, LABEL = "prediction", "label"
COVERAGE_WINDOW = 1_000  # predictions, for the fading join coverage
SCORED_VERSIONS = 10  # the newest served versions scored (a bounded metric label)
# Reads the prediction log's entries at these offsets, per partition: {(partition, offset): value}
Reread = Callable[[Mapping[int, Sequence[int]]], Mapping[tuple[int, int], bytes | None]]


def epoch_ms() -> float:
    return time.time() * 1000


@dataclass
class Served:
    """How one served version did on the labels that came for its predictions."""

    labelled: int = 0
    correct: int = 0  # classification
    squared_error: float = 0.0  # regression


class LabelJoin:
    """Joins the prediction log with the labels topic, partition by partition."""

    def __init__(
        self,
        log_topic: str,
        labels_topic: str,
        model_name: str,
        labels: LabelSpec,
        window_ms: int,
        *,
        on_missing: Literal["drop", "negative"] = "drop",
        max_pending: int = 100_000,
        max_pending_bytes: int = 128 << 20,
        idle_ms: int | None = 10_000,
        max_skew_ms: int = 300_000,
        max_record_bytes: int = 1 << 20,
        batch_size: int = 256,
        now_ms: Callable[[], float] = epoch_ms,
    ) -> None:
        self.topics = {log_topic: PREDICTION, labels_topic: LABEL}
        self.model_name = model_name
        self.labels = labels
        self.window_ms = window_ms
        self.on_missing = on_missing
        # --task binary: class 0, by its name when the classes are named
        self.negative: Any = labels.classes[0] if labels.classes else 0
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.idle_ms = idle_ms
        self.max_skew_ms = max_skew_ms
        self.now_ms = now_ms
        self.max_record_bytes = max_record_bytes
        self.batch_size = batch_size
        self.pairs: dict[int, PartitionJoin] = {}
        self.ready: deque[JoinedRecord] = deque()  # joined, not yet handed over to learning
        self.other_models = 0  # log entries of another model, skipped
        self.coverage: float | None = None  # fading share of predictions whose label came
        self.learned = 0  # joined records learned
        self.fingerprint = 0  # of the (id, label) pairs learned
        self.counted: Counter[str] = Counter()  # outcomes already reported (see outcomes())
        self._covered = (0, 0)  # predictions joined, and not, that the coverage has seen
        self.scores: dict[int, Served] = {}  # per served version, the newest SCORED_VERSIONS
        self.delays_s: list[float] = []  # label delays since the telemetry last took them

    # -- input ----------------------------------------------------------------------------------

    def feed(self, messages: Sequence[Consumed], wall_ms: float) -> list[tuple[Consumed, Rejected]]:
        """Join these messages of either topic, in order; the ones refused, with why."""
        refused = []
        for message in messages:
            topic, partition, offset = position(message)
            join = self._pair(partition)
            try:
                if self.topics[topic] == PREDICTION:
                    logged = self._logged(message.value(), offset)
                    if logged is None:
                        self.other_models += 1
                        continue
                    out = join.add_prediction(logged, wall_ms)
                else:
                    out = join.add_label(self._label(message.value()), wall_ms)
            except InvalidRecord as exc:
                refused.append((message, Rejected(0, exc.reason, exc.detail)))
                continue
            self._queue(out, (topic, partition, offset))
            self._fit()
        return refused

    def tick(self, wall_ms: float) -> bool:
        """Move each pair's clock on (with wall time while both topics idle); queue what expiry
        imputes. Whether anything expired (the state to checkpoint changed)."""
        before = self._finished(), self.pending()
        for partition, join in self.pairs.items():
            self._queue(join.tick(wall_ms), (self.log_topic, partition, -1))
        return (self._finished(), self.pending()) != before

    def reached_end(self, key: Key, wall_ms: float) -> None:
        """Everything of a partition of either topic, up to its end, is joined (said again and
        again while it stays so)."""
        topic, partition = key
        self._pair(partition).reached_end(self.topics[topic], wall_ms)

    def batches(self, whole: bool) -> list[list[JoinedRecord]]:
        """Joined records to learn, in micro-batches of the batch size (and, unless `whole`, the rest)."""
        out = []
        while len(self.ready) >= self.batch_size or (self.ready and not whole):
            count = min(self.batch_size, len(self.ready))
            out.append([self.ready.popleft() for _ in range(count)])
        return out

    def learned_records(self, records: Sequence[JoinedRecord]) -> None:
        """These joined records were learned (on the learning thread)."""
        self.learned += len(records)
        self.fingerprint = (self.fingerprint + fingerprint([(r.id, r.label) for r in records])) % (
            FINGERPRINT_SPACE
        )

    # -- what it reports ------------------------------------------------------------------------

    def outcomes(self) -> Counter[str]:
        """The outcomes since the last call: joined, imputed, expired, orphaned, late, ..."""
        total: Counter[str] = Counter()
        for join in self.pairs.values():
            total.update(join.counts)
        total["other_model"] = self.other_models
        new = total - self.counted
        self.counted = total
        return new

    def pending(self) -> dict[str, int]:
        return {
            "predictions": sum(len(j.predictions) for j in self.pairs.values()),
            "labels": sum(len(j.labels) for j in self.pairs.values()),
        }

    def pending_bytes(self) -> int:
        """The bytes of the messages waiting, the measure of --join-max-pending-bytes."""
        return sum(j.pending_bytes for j in self.pairs.values())

    def summary(self) -> dict[str, Any]:
        """For the snapshot's meta.json and `streamlearn status`."""
        counts: Counter[str] = Counter()
        for join in self.pairs.values():
            counts.update(join.counts)
        return {
            "counts": {outcome: counts[outcome] for outcome in OUTCOMES} | {"other_model": self.other_models},
            "pending": self.pending(),
            "pending_bytes": self.pending_bytes(),
            "coverage": self.coverage,
            "learned": self.learned,
            "fingerprint": f"{self.fingerprint:016x}",
            "window_ms": self.window_ms,
            "on_missing_label": self.on_missing,
            "served": {
                str(v): {"labelled": sc.labelled}
                | (
                    {"squared_error": sc.squared_error}
                    if self.labels.task == "regression"
                    else {"correct": sc.correct}
                )
                for v, sc in sorted(self.scores.items())
            },
        }

    # -- state ----------------------------------------------------------------------------------

    def state(self) -> bytes:
        """Everything a restart needs, as JSON (the snapshot keeps it beside the optimizer's state)."""
        return orjson.dumps(
            {
                "pairs": {str(p): join.state(refs=True) for p, join in self.pairs.items()},
                "ready": [record.to_json() for record in self.ready],
                "other_models": self.other_models,
                "coverage": self.coverage,
                "learned": self.learned,
                "fingerprint": self.fingerprint,
                "scores": {
                    str(v): [sc.labelled, sc.correct, sc.squared_error] for v, sc in self.scores.items()
                },
            }
        )

    def restore(self, data: bytes, reread: Reread | None = None) -> None:
        """Take a state back, reading the waiting predictions again from the log with `reread`."""
        state = orjson.loads(data)
        self.pairs = {}
        for partition, pair in state["pairs"].items():
            self._pair(int(partition)).restore(pair)
        self.ready = deque(JoinedRecord.from_json(r) for r in state["ready"])
        self.other_models = int(state["other_models"])
        self.coverage = state["coverage"]
        self.learned = int(state["learned"])
        self.fingerprint = int(state["fingerprint"])
        self.scores = {int(v): Served(int(n), int(c), float(e)) for v, (n, c, e) in state["scores"].items()}
        self.counted = Counter()
        self.outcomes()  # what the snapshot counted was reported by the run that wrote it
        self._covered = self._finished()
        self._refill(reread)  # after: an entry gone from the log is this run's eviction to report

    # -- the steps ------------------------------------------------------------------------------

    def _refill(self, reread: Reread | None) -> None:
        """Replace the restored references with the prediction-log entries they point to."""
        wanted = {
            partition: [p.offset for p in join.predictions.values() if p.features is None]
            for partition, join in self.pairs.items()
        }
        wanted = {partition: offsets for partition, offsets in wanted.items() if offsets}
        if not wanted:
            return
        values = reread(wanted) if reread is not None else {}
        lost = 0
        for partition, join in self.pairs.items():
            for key, ref in list(join.predictions.items()):
                if ref.features is None:
                    entry = self._reread_entry(values.get((partition, ref.offset)), ref.offset)
                    lost += entry is None
                    join.refill(entry, key)
        if lost:
            log.warning("label join: %d waiting predictions are no longer in the prediction log "
                        "(its retention?): evicted", lost)  # fmt: skip

    def _reread_entry(self, value: bytes | None, offset: int) -> Logged | None:
        try:
            return self._logged(value, offset) if value is not None else None
        except InvalidRecord:
            return None  # not what was joined: the topic was recreated

    def _fit(self) -> None:
        """Within the byte budget: evict the oldest entries of the partition holding the most."""
        while self.pending_bytes() > self.max_pending_bytes:
            max(self.pairs.values(), key=lambda join: join.pending_bytes).evict_oldest()

    @property
    def log_topic(self) -> str:
        return next(topic for topic, side in self.topics.items() if side == PREDICTION)

    def _pair(self, partition: int) -> PartitionJoin:
        join = self.pairs.get(partition)
        if join is None:
            join = self.pairs[partition] = PartitionJoin(
                self.window_ms, self.max_pending, self.on_missing, self.negative, self.idle_ms, self.now_ms
            )
        return join

    def _queue(self, joined: list[Joined], source: tuple[str, int, int]) -> None:
        for item in joined:
            entry = item.prediction
            # what completed the join, or the entry whose label never came
            at = (self.log_topic, source[1], entry.offset) if item.imputed else source
            self.ready.append(
                JoinedRecord(entry.id, entry.features, item.label, item.weight, at, imputed=item.imputed)
            )
            if not item.imputed:
                self.delays_s.append(max(item.label_ts - entry.ts, 0) / 1000)
            self._score(entry, item.label)
        self._cover(joined)

    def _score(self, entry: Logged, label: Any) -> None:
        """The served prediction against its label, for the served version's scores."""
        try:
            truth = self.labels.value(label)
            served = self.labels.value(entry.prediction)
        except InvalidRecord:
            return  # a prediction of another label space: not scored
        scores = self.scores.get(entry.version)
        if scores is None:
            if len(self.scores) >= SCORED_VERSIONS and entry.version < min(self.scores):
                return  # older than every version scored
            scores = self.scores[entry.version] = Served()
            while len(self.scores) > SCORED_VERSIONS:
                del self.scores[min(self.scores)]
        scores.labelled += 1
        if self.labels.task == "regression":
            scores.squared_error += (float(served) - float(truth)) ** 2
        else:
            scores.correct += int(served == truth)

    def _cover(self, joined: list[Joined]) -> None:
        """Fade the join coverage: 1 for each prediction that met its label, 0 for one that did not."""
        labelled, unlabelled = self._finished()
        new_joined, new_missing = labelled - self._covered[0], unlabelled - self._covered[1]
        self._covered = (labelled, unlabelled)
        n = new_joined + new_missing
        if n <= 0:
            return
        keep = (1 - 1 / COVERAGE_WINDOW) ** n
        share = new_joined / n
        self.coverage = share if self.coverage is None else keep * self.coverage + (1 - keep) * share

    def _finished(self) -> tuple[int, int]:
        """Predictions that met their label, and predictions whose label never came."""
        joined = missing = 0
        for join in self.pairs.values():
            joined += join.counts["joined"]
            missing += join.counts["expired"] + join.counts["imputed"]
        return joined, missing

    def _logged(self, value: bytes | None, offset: int) -> Logged | None:
        """A prediction-log entry, or None when it was logged for another model."""
        entry = PredictionEntry.parse(parsed(value, self.max_record_bytes), self.model_name, self._ahead)
        if entry is None:
            return None
        size = len(value or b"")
        return Logged(
            entry.id, entry.ts, entry.features, entry.version, entry.prediction, offset=offset, size=size
        )

    def _label(self, value: bytes | None) -> Label:
        entry = parsed(value, self.max_record_bytes)
        key, ts = join_id(entry), self._ahead(join_ts(entry))
        label = entry.get("label")
        self.labels.value(label)  # refused here, with its reason, rather than once joined
        weight = entry.get("weight", 1.0)
        if (
            not isinstance(weight, int | float)
            or isinstance(weight, bool)
            or not fits_float32(weight)
            or weight < 0
        ):
            raise InvalidRecord(InvalidReason.BAD_WEIGHT, "weight must be a finite number >= 0 (float32)")
        return Label(key, ts, label, float(weight), size=len(value or b""))

    def _ahead(self, ts: int) -> int:
        """The ts, refused when far in the future: it would carry the join's clock along."""
        ahead = ts - self.now_ms()
        if ahead > self.max_skew_ms:
            detail = (
                f"ts is {ahead / 1000:.0f} s past the trainer's clock (more than --join-max-skew-s): "
                "epoch milliseconds?"
            )
            raise InvalidRecord(InvalidReason.BAD_JOIN_FIELD, detail)
        return ts
