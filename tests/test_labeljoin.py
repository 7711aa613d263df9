"""The trainer's side of the label join, without Kafka: parsing both topics, refusing what breaks
their contracts, the records it makes to learn, served scores, and a state that survives restarts."""

import random
from dataclasses import dataclass

import orjson
import pytest

from streamlearn.decoding import RecordDecoder
from streamlearn.errors import InvalidReason
from streamlearn.records import LabelSpec
from streamlearn.train.labeljoin import LabelJoin, fingerprint

LOG, LABELS = "predictions", "labels"


@dataclass
class Msg:
    """What the join needs of a consumed message."""

    topic_: str
    partition_: int
    offset_: int
    value_: bytes | None

    def topic(self) -> str:
        return self.topic_

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def value(self) -> bytes | None:
        return self.value_


class Topics:
    """Messages of both topics, with their offsets counted per partition."""

    def __init__(self) -> None:
        self.next: dict[tuple[str, int], int] = {}

    def msg(self, topic: str, value: object, partition: int = 0) -> Msg:
        offset = self.next.get((topic, partition), 0)
        self.next[(topic, partition)] = offset + 1
        raw = value if isinstance(value, bytes) or value is None else orjson.dumps(value)
        return Msg(topic, partition, offset, raw)

    def entry(self, key: str, ts: int, features=(1.0, 2.0), version: int = 1, prediction=1, **extra) -> Msg:
        value = {"id": key, "ts": ts, "model": "m", "version": version, "features": list(features)}
        return self.msg(LOG, {**value, "prediction": prediction, **extra})

    def label(self, key: str, ts: int, label=1, **extra) -> Msg:
        return self.msg(LABELS, {"id": key, "ts": ts, "label": label, **extra})


def reader(messages: list[Msg]):
    """A reread of the prediction log that these messages are of: {(partition, offset): value}."""
    log = {(m.partition_, m.offset_): m.value_ for m in messages if m.topic_ == LOG}

    def reread(wanted):
        return {(p, o): log[(p, o)] for p, offsets in wanted.items() for o in offsets if (p, o) in log}

    return reread


def join_of(task: str = "binary", classes: tuple[str, ...] = (), **kwargs) -> LabelJoin:
    settings = {"window_ms": 1_000, "idle_ms": None, "batch_size": 4, **kwargs}
    return LabelJoin(LOG, LABELS, "m", LabelSpec.create(task, classes), **settings)


def test_a_label_joins_its_logged_prediction_into_a_record_to_learn():
    join, t = join_of(), Topics()
    assert (
        join.feed([t.entry("a", 100, features=(3.0, 4.0)), t.label("a", 400, label=0, weight=2.0)], 0) == []
    )
    (record,) = join.batches(whole=False)[0]
    assert (record.id, record.label, record.weight, record.imputed) == ("a", 0, 2.0, False)
    assert record.source == (LABELS, 0, 0)  # the label completed it
    decoded = RecordDecoder(LabelSpec.create("binary")).decode([record.value()])
    assert decoded.features.tolist() == [[3.0, 4.0]] and decoded.labels.tolist() == [0.0]
    assert join.delays_s == [0.3]


@pytest.mark.parametrize(
    ("topic", "value", "reason"),
    [
        (LOG, b"{not json", InvalidReason.BAD_JSON),
        (LOG, None, InvalidReason.EMPTY),
        (LOG, [1, 2], InvalidReason.NOT_AN_OBJECT),
        (LOG, {"ts": 1, "features": [1, 2]}, InvalidReason.BAD_JOIN_FIELD),
        (LOG, {"id": "", "ts": 1, "features": [1, 2]}, InvalidReason.BAD_JOIN_FIELD),
        (LOG, {"id": "x" * 257, "ts": 1, "features": [1, 2]}, InvalidReason.BAD_JOIN_FIELD),
        (LOG, {"id": "a", "ts": "yesterday", "features": [1, 2]}, InvalidReason.BAD_JOIN_FIELD),
        (LOG, {"id": "a", "ts": -5, "features": [1, 2]}, InvalidReason.BAD_JOIN_FIELD),
        (LOG, {"id": "a", "ts": 1, "features": [1, 2], "version": "v1"}, InvalidReason.BAD_JOIN_FIELD),
        (LOG, {"id": "a", "ts": 1}, InvalidReason.MISSING_FEATURES),
        # what the lenient reader takes and orjson cannot write back into a snapshot or a record
        (
            LOG,
            b'{"id": "a", "ts": 1, "features": [NaN, 123456789012345678901234567890]}',
            InvalidReason.BAD_JSON,
        ),
        (LOG, b'{"id": "a", "ts": 1, "features": ' + b"[" * 600 + b"]" * 600 + b"}", InvalidReason.BAD_JSON),
        (LOG, b'{"id": "a\\ud800", "ts": 1, "features": [1, 2], "x": NaN}', InvalidReason.BAD_JSON),
        (
            LABELS,
            b'{"id": "a", "ts": 1, "label": 123456789012345678901234567890, "y": NaN}',
            InvalidReason.BAD_JSON,
        ),
        (LABELS, {"id": "a", "ts": 1}, InvalidReason.MISSING_LABEL),
        (LABELS, {"id": "a", "ts": 1, "label": 7}, InvalidReason.UNKNOWN_CLASS),
        (LABELS, {"id": "a", "ts": 1, "label": 1, "weight": -1}, InvalidReason.BAD_WEIGHT),
        (LABELS, {"id": "a", "ts": 1, "label": 1, "weight": True}, InvalidReason.BAD_WEIGHT),
        (LABELS, {"id": 5, "ts": 1, "label": 1}, InvalidReason.BAD_JOIN_FIELD),
        (LABELS, {"id": "a", "ts": 1e300, "label": 1}, InvalidReason.BAD_JOIN_FIELD),
        (LABELS, b"\xff\xfe", InvalidReason.NOT_UTF8),
    ],
)
def test_what_breaks_a_topic_contract_is_refused_with_its_reason(topic, value, reason):
    join, t = join_of(), Topics()
    message = t.msg(topic, value)
    ((refused, rejected),) = join.feed([message], 0)
    assert refused is message and rejected.reason == reason
    assert not join.pending()["predictions"] and not join.pending()["labels"]


def test_entries_of_another_model_are_skipped_and_counted():
    join, t = join_of(), Topics()
    other = t.msg(LOG, {"id": "a", "ts": 1, "model": "other", "features": [1, 2]})
    assert join.feed([other, t.label("a", 2)], 0) == []
    assert join.outcomes()["other_model"] == 1 and join.pending()["labels"] == 1


def test_a_prediction_whose_label_never_came_is_learned_as_the_negative_class_from_its_entry():
    join, t = join_of(classes=("legit", "fraud"), on_missing="negative"), Topics()
    join.feed([t.entry("a", 0), t.entry("b", 10), t.label("b", 20, "fraud")], 0)
    join.feed([t.entry("c", 5_000), t.label("c", 5_000, "legit")], 0)  # the clock passes a's window
    records = [r for batch in join.batches(whole=False) for r in batch]
    expected = [("b", "fraud", False), ("c", "legit", False), ("a", "legit", True)]
    assert [(r.id, r.label, r.imputed) for r in records] == expected
    assert records[2].source == (LOG, 0, 0)  # the entry whose label never came
    assert join.outcomes()["imputed"] == 1
    assert join.coverage is not None and 0 < join.coverage < 1


def test_records_are_handed_over_in_micro_batches_whole_ones_only_when_asked():
    join, t = join_of(), Topics()
    for i in range(10):
        join.feed([t.entry(f"k{i}", i), t.label(f"k{i}", i)], 0)
    assert [len(b) for b in join.batches(whole=True)] == [4, 4]
    assert [len(b) for b in join.batches(whole=False)] == [2]


def test_served_predictions_are_scored_per_version_and_only_the_newest_versions_kept():
    join, t = join_of(task="regression"), Topics()
    for version in range(1, 14):
        join.feed(
            [t.entry(f"k{version}", 0, version=version, prediction=1.5), t.label(f"k{version}", 1, 1.0)], 0
        )
    assert sorted(join.scores) == list(range(4, 14))  # ten versions at most, the newest
    assert join.scores[13].labelled == 1 and join.scores[13].squared_error == pytest.approx(0.25)
    join.feed([t.entry("old", 2, version=2, prediction=1.0), t.label("old", 3, 1.0)], 0)
    assert 2 not in join.scores  # older than every version scored

    classes = join_of(classes=("no", "yes")), Topics()
    c, ct = classes
    c.feed([ct.entry("a", 0, prediction="yes"), ct.label("a", 1, 1), ct.entry("b", 0, prediction="no"),
            ct.label("b", 1, "yes")], 0)  # fmt: skip
    assert (c.scores[1].labelled, c.scores[1].correct) == (2, 1)  # names and indices compare alike


def test_the_fingerprint_is_that_of_the_pairs_learned_in_any_order():
    pairs = [(f"k{i}", i % 2) for i in range(100)]
    shuffled = random.Random(1).sample(pairs, len(pairs))
    assert fingerprint(pairs) == fingerprint(shuffled)
    assert fingerprint(pairs) != fingerprint([*pairs[:-1], ("k99", 0)])
    assert fingerprint(pairs) != fingerprint([*pairs, pairs[0]])  # learning one twice shows


def test_the_state_round_trips_and_the_join_goes_on_as_if_uninterrupted():
    rng = random.Random(5)
    t = Topics()
    messages = []
    for i in range(600):
        messages.append((i * 10, t.entry(f"k{i}", i * 10, features=(float(i), 1.0))))
        if rng.random() < 0.7:
            ts = i * 10 + int(rng.expovariate(1 / 300)) - 50
            messages.append((ts, t.label(f"k{i}", ts, rng.randint(0, 1))))
    messages.sort(key=lambda m: m[0])
    stream = [m for _, m in messages]

    def run(join: LabelJoin, part) -> list:
        out = []
        for start in range(0, len(part), 37):
            join.feed(part[start : start + 37], 0)
            batches = join.batches(whole=True)
            out += [r.to_json() for batch in batches for r in batch]
            for batch in batches:
                join.learned_records(batch)
        return out

    whole = join_of(on_missing="negative")
    expected = run(whole, stream)
    first = join_of(on_missing="negative")
    got = run(first, stream[:700])
    second = join_of(on_missing="negative")
    second.restore(first.state(), reader(stream))
    got += run(second, stream[700:])
    assert got == expected
    assert second.summary() == whole.summary()
    assert (
        second.outcomes()["joined"]
        == whole.summary()["counts"]["joined"] - first.summary()["counts"]["joined"]
    )


NOW = 1_765_000_000_000  # epoch ms, the trainer's clock in the tests below


def test_a_ts_far_past_the_trainers_clock_is_refused_and_moves_no_clock():
    join, t = join_of(idle_ms=2_000, on_missing="negative", now_ms=lambda: NOW), Topics()
    assert join.feed([t.entry("a", NOW - 100), t.label("x", NOW - 100)], wall_ms=0) == []
    microseconds, ahead = t.label("b", NOW * 1000), t.entry("c", NOW + 301_000)
    refused = join.feed([microseconds, ahead, t.label("skewed", NOW + 299_000)], wall_ms=0)
    assert [(m, r.reason) for m, r in refused] == [
        (microseconds, InvalidReason.BAD_JOIN_FIELD),
        (ahead, InvalidReason.BAD_JOIN_FIELD),
    ]
    assert "past the trainer's clock" in refused[0][1].detail
    for key in ((LOG, 0), (LABELS, 0)):
        join.reached_end(key, 0)
    assert join.tick(5_000) is False  # both idle: the clock moved on, a still waits
    join.feed([t.label("a", NOW)], wall_ms=5_000)
    assert [r.id for batch in join.batches(whole=False) for r in batch] == ["a"]
    assert join.outcomes()["imputed"] == 0


def test_waiting_entries_are_bounded_in_bytes_oldest_evicted_counted():
    join, t = join_of(max_pending_bytes=50_000), Topics()
    big = ("x" * 10_000,)  # the join holds what the log says, whatever its kind
    join.feed([t.entry(f"k{i}", i, features=big) for i in range(10)], 0)
    assert join.pending_bytes() <= 50_000 and join.pending()["predictions"] == 4
    assert join.outcomes()["evicted"] == 6
    assert list(join.pairs[0].predictions) == ["k6", "k7", "k8", "k9"]


def test_a_snapshot_keeps_waiting_predictions_as_offsets_and_restore_reads_them_again():
    join, t = join_of(), Topics()
    entries = [t.entry(f"k{i}", i, features=("x" * 100_000,)) for i in range(20)]
    join.feed(entries, 0)
    state = join.state()
    assert join.pending_bytes() > 2_000_000 and len(state) < 3_000  # bytes per entry, not its features
    restored = join_of()
    restored.restore(state, reader(entries[5:]))  # the first five are gone from the log
    assert list(restored.pairs[0].predictions) == [f"k{i}" for i in range(5, 20)]
    assert restored.pairs[0].predictions["k7"] == join.pairs[0].predictions["k7"]
    assert restored.pending_bytes() == join.pending_bytes() - 5 * entries[0].value_.__len__()
    assert restored.summary()["counts"]["evicted"] == 5
    restored.feed([t.label("k7", 10)], 0)
    (record,) = restored.batches(whole=False)[0]
    assert record.features == ["x" * 100_000]
