"""The label join: predictions from the prediction log meet the labels that arrive later.

Both topics are keyed by the prediction id and partitioned alike, so an id's prediction and its
label are in the same partition of each; one PartitionJoin serves one such pair. It is a
symmetric hash join in event time: whichever of an id's prediction and label comes first waits
for the other, up to `window_ms` of event time past its own timestamp.

An id's prediction and label join when their timestamps are at most `window_ms` apart, whichever
arrives first; further apart, the label is late (or, before its prediction, orphaned) whenever
it arrives, so what joins does not depend on how the two topics' reads interleave.

The join's clock is the smaller of the two inputs' newest timestamps, so that a backlog on one
topic never expires what the other has yet to deliver. A side read to its end that has sent
nothing for `idle_ms` of wall time stops holding the clock back, and when both are idle the
clock moves on with wall time from where it stood (otherwise, with traffic stopped, nothing
would ever expire: the classic trap of stream-stream left joins). Under --deterministic there is
no idling: the clock is event time only. Given `now` (epoch ms), the clock never passes it: one
record stamped in the future cannot expire what is waiting (labeljoin.py refuses timestamps far
in the future, and a clock restored from such a past is pulled back).

What expires: a prediction without a label is dropped, or learned with the negative label
(--on-missing-label negative, "no chargeback within 30 days means legitimate"); a label without
a prediction is dropped (orphaned). A label for an id already joined is a duplicate, one for an
id expired (or forgotten past its window) is late; both are counted and dropped. At most
`max_pending` entries wait per pair: beyond it the oldest are evicted, counted; `pending_bytes`
sums the sizes of the entries waiting, for a byte budget (labeljoin.py evicts with evict_oldest).
The state is plain JSON (state() / restore()), so a snapshot holds it without pickle; state(refs=True)
keeps each waiting prediction as a reference to its offset in the prediction log instead of its
features, to be read again on restore.
"""

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

OUTCOMES = ("joined", "imputed", "expired", "orphaned", "late", "duplicate", "evicted")
NEVER = -(2**62)


@dataclass(frozen=True)
class Logged:
    """A prediction as the server logged it."""

    id: str
    ts: int  # the server's receive time, epoch ms
    features: Any
    version: int = 0
    prediction: Any = None
    probabilities: list[float] | None = None
    offset: int = -1  # in the prediction log
    size: int = 0  # bytes, for the pending byte budget: its message's


@dataclass(frozen=True)
class Label:
    """A label as its producer sent it."""

    id: str
    ts: int  # when the label became known, epoch ms
    label: Any
    weight: float = 1.0
    size: int = 0  # bytes, for the pending byte budget: its message's


@dataclass(frozen=True)
class Joined:
    """A training example: the logged prediction's features and the label (or the imputed one)."""

    prediction: Logged
    label: Any
    weight: float
    imputed: bool = False  # the negative label of a prediction whose label never came

    @property
    def delay_ms(self) -> int | None:
        return None if self.imputed else self.label_ts - self.prediction.ts

    label_ts: int = 0


@dataclass
class PartitionJoin:
    """The join of one partition of the prediction log with the same partition of the labels."""

    window_ms: int
    max_pending: int = 100_000
    on_missing: Literal["drop", "negative"] = "drop"
    negative: Any = 0
    idle_ms: int | None = 10_000  # None: event time only (--deterministic)
    now: Callable[[], float] | None = None  # epoch ms, which the clock never passes (None: no bound)
    predictions: OrderedDict[str, Logged] = field(default_factory=OrderedDict)
    labels: OrderedDict[str, Label] = field(default_factory=OrderedDict)
    finished: OrderedDict[str, tuple[bool, int]] = field(default_factory=OrderedDict)  # id -> (joined, ts)
    newest: dict[str, int] = field(default_factory=lambda: {"prediction": NEVER, "label": NEVER})
    clock: int = NEVER
    counts: Counter[str] = field(default_factory=Counter)
    pending_bytes: int = 0  # the sizes of the predictions and labels waiting
    _heard: dict[str, float] = field(default_factory=dict)  # side -> wall ms of its last record
    _at_end: dict[str, bool] = field(default_factory=dict)  # side -> read to its end since then
    _idle_from: tuple[float, int] | None = None  # (wall ms, clock) when both sides went idle

    # -- input --------------------------------------------------------------------------------------

    def add_prediction(self, prediction: Logged, wall_ms: float) -> list[Joined]:
        self._heard_from("prediction", prediction.ts, wall_ms)
        out: list[Joined] = []
        if prediction.id in self.finished or prediction.id in self.predictions:
            self.counts["duplicate"] += 1  # the same prediction logged twice: its first stands
        elif prediction.id in self.labels and (apart := self._apart(prediction, self.labels[prediction.id])):
            self._take(self.labels, prediction.id)
            self.counts[apart] += 1
            return out + self.add_prediction(prediction, wall_ms)  # it waits for no other label
        elif prediction.id in self.labels:
            out.append(self._join(prediction, self._take(self.labels, prediction.id)))
        elif prediction.ts + self.window_ms < self.clock:
            self.counts["expired"] += 1  # so old that it could only have expired already
        else:
            self._put(self.predictions, prediction.id, prediction)
        return out + self.tick(wall_ms)

    def add_label(self, label: Label, wall_ms: float) -> list[Joined]:
        self._heard_from("label", label.ts, wall_ms)
        out: list[Joined] = []
        done = self.finished.get(label.id)
        if done is not None or label.id in self.labels:
            self.counts["duplicate" if done is None or done[0] else "late"] += 1
        elif label.id in self.predictions and (apart := self._apart(self.predictions[label.id], label)):
            self.counts[apart] += 1  # its prediction waits on, and expires unlabelled
        elif label.id in self.predictions:
            out.append(self._join(self._take(self.predictions, label.id), label))
        elif label.ts + self.window_ms < self.clock:
            self.counts["late"] += 1  # its prediction expired and was forgotten
        else:
            self._put(self.labels, label.id, label)
        return out + self.tick(wall_ms)

    def tick(self, wall_ms: float) -> list[Joined]:
        """Advance the clock (event time, and wall time while idle); return what expiry imputes."""
        self.clock = max(self.clock, self._event_clock(wall_ms))
        if self.now is not None:  # never ahead of the present, whatever a record or a snapshot says
            self.clock = min(self.clock, int(self.now()))
        out = []
        while self.predictions:
            oldest = next(iter(self.predictions.values()))
            if oldest.ts + self.window_ms >= self.clock:
                break
            self._take(self.predictions, oldest.id)
            self._finish(oldest.id, False, oldest.ts)
            if self.on_missing == "negative":
                self.counts["imputed"] += 1
                out.append(
                    Joined(oldest, self.negative, 1.0, imputed=True, label_ts=oldest.ts + self.window_ms)
                )
            else:
                self.counts["expired"] += 1
        while self.labels:
            oldest_label = next(iter(self.labels.values()))
            if oldest_label.ts + self.window_ms >= self.clock:
                break
            self._take(self.labels, oldest_label.id)
            self.counts["orphaned"] += 1
        while self.finished:  # forget an id a window after it finished: a label then is late anyway
            first, (_, ts) = next(iter(self.finished.items()))
            if ts + 2 * self.window_ms >= self.clock:
                break
            del self.finished[first]
        return out

    # -- state --------------------------------------------------------------------------------------

    def state(self, refs: bool = False) -> dict[str, Any]:
        """Everything a restart needs, as JSON-able data (wall-time idling restarts afresh); with
        `refs`, each waiting prediction as [id, ts, offset, size], its entry to be read again."""
        predictions = self.predictions.values()
        return {
            "predictions": [[p.id, p.ts, p.offset, p.size] for p in predictions]
            if refs
            else [asdict(p) for p in predictions],
            "labels": [asdict(label) for label in self.labels.values()],
            "finished": [[key, joined, ts] for key, (joined, ts) in self.finished.items()],
            "newest": dict(self.newest),
            "clock": self.clock,
            "counts": dict(self.counts),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take a state back; a reference's prediction has no features until replaced (refill)."""
        self.predictions = OrderedDict((p.id, p) for p in map(_logged, state["predictions"]))
        self.labels = OrderedDict((label["id"], Label(**label)) for label in state["labels"])
        self.finished = OrderedDict((key, (bool(joined), int(ts))) for key, joined, ts in state["finished"])
        self.newest = {side: int(ts) for side, ts in state["newest"].items()}
        self.clock = int(state["clock"])
        self.counts = Counter(state["counts"])
        sizes = [p.size for p in self.predictions.values()] + [label.size for label in self.labels.values()]
        self.pending_bytes = sum(sizes)
        if self.now is not None:  # a clock some record once pushed into the future is repaired here
            present = int(self.now())
            self.clock = min(self.clock, present)
            self.newest = {side: min(ts, present) for side, ts in self.newest.items()}

    def refill(self, prediction: Logged | None, key: str) -> None:
        """Replace a restored reference with its entry read again, or forget it (None: it is gone
        from the log), counted as evicted."""
        old = self.predictions[key]
        if prediction is None or prediction.id != key:
            self._take(self.predictions, key)
            self.counts["evicted"] += 1
            return
        self.predictions[key] = prediction  # keeps its place in the order
        self.pending_bytes += prediction.size - old.size

    def evict_oldest(self) -> None:
        """Evict the oldest waiting entry, prediction or label, counted (for a byte budget)."""
        prediction = next(iter(self.predictions.values()), None)
        label = next(iter(self.labels.values()), None)
        if label is not None and (prediction is None or label.ts < prediction.ts):
            self._take(self.labels, label.id)
        elif prediction is not None:
            self._take(self.predictions, prediction.id)
        else:
            return
        self.counts["evicted"] += 1

    # -- the steps ----------------------------------------------------------------------------------

    def _apart(self, prediction: Logged, label: Label) -> str | None:
        """Why a prediction and its label are too far apart to join (late, orphaned), or None."""
        if label.ts > prediction.ts + self.window_ms:
            return "late"
        if label.ts < prediction.ts - self.window_ms:
            return "orphaned"  # a label from before the prediction's window
        return None

    def _join(self, prediction: Logged, label: Label) -> Joined:
        self.counts["joined"] += 1
        self._finish(prediction.id, True, max(prediction.ts, label.ts))
        return Joined(prediction, label.label, label.weight, label_ts=label.ts)

    def _finish(self, key: str, joined: bool, ts: int) -> None:
        self.finished[key] = (joined, ts)
        while len(self.finished) > self.max_pending:  # bounded too: the oldest are forgotten early
            self.finished.popitem(last=False)

    def _put(self, pending: OrderedDict[str, Any], key: str, entry: Logged | Label) -> None:
        pending[key] = entry
        self.pending_bytes += entry.size
        while len(pending) > self.max_pending:
            self._take(pending, next(iter(pending)))
            self.counts["evicted"] += 1

    def _take(self, pending: OrderedDict[str, Any], key: str) -> Any:
        """Remove a waiting prediction or label (every removal comes here, to keep pending_bytes)."""
        entry = pending.pop(key)
        self.pending_bytes -= entry.size
        return entry

    def reached_end(self, side: str, wall_ms: float) -> None:
        """A side is read to its end: silent for idle_ms from its last record (or from now, if it
        never sent one), it holds the clock back no longer."""
        self._heard.setdefault(side, wall_ms)
        self._at_end[side] = True

    def _heard_from(self, side: str, ts: int, wall_ms: float) -> None:
        self.newest[side] = max(self.newest[side], ts)
        self._heard[side] = wall_ms
        self._at_end[side] = False
        self._idle_from = None

    def _event_clock(self, wall_ms: float) -> int:
        if self.idle_ms is None:
            return min(self.newest.values())
        active = [
            self.newest[side]
            for side in ("prediction", "label")
            if not self._at_end.get(side) or wall_ms - self._heard[side] < self.idle_ms
        ]
        if active:
            return min(active)
        # Both idle: event time moves on with wall time from where it stood.
        if self._idle_from is None:  # from what both sides reached (a side that never spoke
            # aside), not from the newest timestamp: one record far ahead must not carry the clock
            reached = min((ts for ts in self.newest.values() if ts != NEVER), default=NEVER)
            self._idle_from = (wall_ms, max(self.clock, reached))
        started_wall, started_clock = self._idle_from
        return int(started_clock + (wall_ms - started_wall))


def _logged(data: dict[str, Any] | list[Any]) -> Logged:
    """A waiting prediction of a state: whole (a dict), or a reference [id, ts, offset, size]."""
    if isinstance(data, dict):
        return Logged(**data)
    key, ts, offset, size = data
    return Logged(key, int(ts), None, offset=int(offset), size=int(size))
