"""The trainer's label join: prediction-log entries and labels in, records to learn out.

`streamlearn train --labels-topic L --prediction-log-topic P` learns what the server served,
once its label came: LabelJoin parses each message of both topics, feeds the PartitionJoin of
its partition (the two topics are partitioned alike by the prediction id), and queues what
joins as JoinedRecords: the logged features with the label, in the record contract's JSON, which
the pipeline decodes and learns like any micro-batch. The entry or label a record came from is
its source: its offsets, its dead letter if the record is refused.

A message of either topic that breaks its contract is refused with a reason (dead-lettered); an
entry logged for another model is skipped, counted. Everything a restart needs (each pair's
join state, the joined records not yet learned, the scores) is JSON, kept in the snapshot's
training file, so the snapshot's offsets of both topics and the join's state always agree.

Besides the records to learn it scores what was served: each logged prediction against the label
that came for it (accuracy, or the squared error for regression), per served version.
"""

import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import xxhash

from streamlearn.errors import InvalidReason, InvalidRecord
from streamlearn.records import LabelSpec, Rejected, fits_float32, parse_json
from streamlearn.train.join import OUTCOMES, Joined, Label, Logged, PartitionJoin
from streamlearn.train.partitions import Consumed, Key, position

PREDICTION, LABEL = "prediction", "label"
MAX_ID_CHARS = 256  # as the server's prediction ids
COVERAGE_WINDOW = 1_000  # predictions, for the fading join coverage
FINGERPRINT_SPACE = 2**64
MAX_TS = 2**53  # epoch ms far beyond any real time, still exact in a float
SCORED_VERSIONS = 10  # the newest served versions scored (a bounded metric label)


@dataclass
class JoinedRecord:
    """A joined example, handled as a message: a record to decode and learn, and its source."""

    id: str
    features: Any
    label: Any
    weight: float
    source: tuple[str, int, int]  # (topic, partition, offset) of the label, or of the entry imputed
    imputed: bool = False
    _value: bytes | None = field(default=None, repr=False, compare=False)

    def topic(self) -> str:
        return self.source[0]

    def partition(self) -> int:
        return self.source[1]

    def offset(self) -> int:
        return self.source[2]

    def key(self) -> bytes:
        return self.id.encode()

    def headers(self) -> None:
        return None

    def value(self) -> bytes:
        """The record the decoder reads: {"features", "label", "weight"}."""
        if self._value is None:
            record = {"features": self.features, "label": self.label, "weight": self.weight}
            self._value = orjson.dumps(record)
        return self._value

    def to_json(self) -> list[Any]:
        return [self.id, self.features, self.label, self.weight, list(self.source), self.imputed]

    @classmethod
    def from_json(cls, data: list[Any]) -> "JoinedRecord":
        key, features, label, weight, (topic, partition, offset), imputed = data
        return cls(key, features, label, float(weight), (topic, int(partition), int(offset)), bool(imputed))


def fingerprint(pairs: Sequence[tuple[str, Any]]) -> int:
    """An order-independent fingerprint of (id, label) pairs: the sum of their 64-bit hashes.

    Two runs learned the same pairs (each as often) exactly when their fingerprints and counts
    agree, whatever order they learned them in."""
    total = 0
    for key, label in pairs:
        total += xxhash.xxh3_64_intdigest(orjson.dumps([key, label]))
    return total % FINGERPRINT_SPACE


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
        idle_ms: int | None = 10_000,
        max_record_bytes: int = 1 << 20,
        batch_size: int = 256,
    ) -> None:
        self.topics = {log_topic: PREDICTION, labels_topic: LABEL}
        self.model_name = model_name
        self.labels = labels
        self.window_ms = window_ms
        self.on_missing = on_missing
        # --task binary: class 0, by its name when the classes are named
        self.negative: Any = labels.classes[0] if labels.classes else 0
        self.max_pending = max_pending
        self.idle_ms = idle_ms
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
        return refused

    def tick(self, wall_ms: float) -> bool:
        """Move each pair's clock on (with wall time while both topics idle); queue what expiry
        imputes. Whether anything expired (the state to checkpoint changed)."""
        before = self._finished(), self.pending()
        for partition, join in self.pairs.items():
            self._queue(join.tick(wall_ms), (self._log_topic, partition, -1))
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

    def summary(self) -> dict[str, Any]:
        """For the snapshot's meta.json and `streamlearn status`."""
        counts: Counter[str] = Counter()
        for join in self.pairs.values():
            counts.update(join.counts)
        return {
            "counts": {outcome: counts[outcome] for outcome in OUTCOMES} | {"other_model": self.other_models},
            "pending": self.pending(),
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
                "pairs": {str(p): join.state() for p, join in self.pairs.items()},
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

    def restore(self, data: bytes) -> None:
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

    # -- the steps ------------------------------------------------------------------------------

    @property
    def _log_topic(self) -> str:
        return next(topic for topic, side in self.topics.items() if side == PREDICTION)

    def _pair(self, partition: int) -> PartitionJoin:
        join = self.pairs.get(partition)
        if join is None:
            join = self.pairs[partition] = PartitionJoin(
                self.window_ms, self.max_pending, self.on_missing, self.negative, self.idle_ms
            )
        return join

    def _queue(self, joined: list[Joined], source: tuple[str, int, int]) -> None:
        for item in joined:
            entry = item.prediction
            # what completed the join, or the entry whose label never came
            at = (self._log_topic, source[1], entry.offset) if item.imputed else source
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
        entry = _parsed(value, self.max_record_bytes)
        key, ts = _id(entry), _ts(entry)
        model = entry.get("model")
        if model is not None and model != self.model_name:
            return None
        features = entry.get("features")
        if features is None:
            raise InvalidRecord(InvalidReason.MISSING_FEATURES, "the logged prediction has no features")
        version = entry.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < MAX_TS:
            raise InvalidRecord(InvalidReason.BAD_JOIN_FIELD, "version must be a non-negative integer")
        return Logged(key, ts, features, version, entry.get("prediction"), offset=offset)

    def _label(self, value: bytes | None) -> Label:
        entry = _parsed(value, self.max_record_bytes)
        key, ts = _id(entry), _ts(entry)
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
        return Label(key, ts, label, float(weight))


def _parsed(value: bytes | None, max_bytes: int) -> dict[str, Any]:
    """A message value as a JSON object that can be written back as JSON: what the join keeps is
    written into snapshots, records and dead letters, and the lenient reader takes what orjson
    does not write (integers beyond 64 bits, lone surrogates, nesting deeper than 254)."""
    entry = parse_json(value, max_bytes)
    try:
        orjson.dumps(entry)
    except (orjson.JSONEncodeError, RecursionError):
        detail = "value holds an integer beyond 64 bits, a lone surrogate or too deep a nesting"
        raise InvalidRecord(InvalidReason.BAD_JSON, detail) from None
    return entry


def _id(entry: dict[str, Any]) -> str:
    key = entry.get("id")
    if not isinstance(key, str) or not 0 < len(key) <= MAX_ID_CHARS:
        detail = f"id must be a string of 1 to {MAX_ID_CHARS} characters"
        raise InvalidRecord(InvalidReason.BAD_JOIN_FIELD, detail)
    return key


def _ts(entry: dict[str, Any]) -> int:
    ts = entry.get("ts")
    if isinstance(ts, float) and math.isfinite(ts) and ts.is_integer():
        ts = int(ts)
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts < MAX_TS:
        detail = "ts must be epoch milliseconds (a non-negative integer)"
        raise InvalidRecord(InvalidReason.BAD_JOIN_FIELD, detail)
    return ts
