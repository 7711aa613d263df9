"""The label join on its own: event-time windows both ways, expiry, late and duplicate labels,
bounded state, idle clocks, and a state that survives a restart."""

import itertools
import json
import random

import pytest

from streamlearn.train.join import Joined, Label, Logged, PartitionJoin

W = 1_000  # the window, ms


def p(key: str, ts: int) -> Logged:
    return Logged(key, ts, [float(ts)], version=3, prediction=1, probabilities=[0.2, 0.8])


def lab(key: str, ts: int, label: int = 1) -> Label:
    return Label(key, ts, label)


def test_a_label_after_its_prediction_joins_with_its_delay():
    join = PartitionJoin(W, idle_ms=None)
    assert join.add_prediction(p("a", 100), 0) == []
    (joined,) = join.add_label(lab("a", 400), 0)
    assert joined.prediction.features == [100.0] and joined.label == 1 and joined.delay_ms == 300
    assert join.counts["joined"] == 1 and not join.predictions


def test_a_label_before_its_prediction_waits_for_it():
    join = PartitionJoin(W, idle_ms=None)
    assert join.add_label(lab("a", 50), 0) == []
    (joined,) = join.add_prediction(p("a", 100), 0)
    assert joined.label == 1 and joined.delay_ms == -50


def test_predictions_without_labels_expire_or_are_learned_as_negatives():
    for on_missing, imputed in (("drop", 0), ("negative", 1)):
        join = PartitionJoin(W, on_missing=on_missing, negative=0, idle_ms=None)
        join.add_prediction(p("a", 0), 0)
        join.add_label(lab("x", 0), 0)  # the label side's clock
        join.add_prediction(p("b", 1_500), 0)
        out = join.add_label(lab("y", 1_500), 0)  # both clocks past a's window: a expires
        assert [j.prediction.id for j in out] == (["a"] if imputed else [])
        assert all(j.imputed and j.label == 0 and j.delay_ms is None for j in out)
        assert join.counts["imputed" if imputed else "expired"] == 1
        assert join.counts["orphaned"] == 1  # the label x never met a prediction


def test_late_and_duplicate_labels_are_counted_and_dropped():
    join = PartitionJoin(W, idle_ms=None)
    join.add_prediction(p("a", 0), 0)
    join.add_label(lab("a", 10), 0)
    assert join.add_label(lab("a", 20), 0) == [] and join.counts["duplicate"] == 1
    join.add_prediction(p("b", 100), 0)
    join.add_prediction(p("c", 2_000), 0)
    join.add_label(lab("z", 2_000), 0)  # b expires
    assert join.add_label(lab("b", 2_050), 0) == [] and join.counts["late"] == 1
    join.add_prediction(p("d", 5_000), 0)
    join.add_label(lab("zz", 5_000), 0)
    assert join.add_label(lab("old", 100), 0) == []  # for a prediction long forgotten
    assert join.counts["late"] == 2 and join.counts["joined"] == 1


def test_a_prediction_and_label_further_apart_than_the_window_never_join():
    join = PartitionJoin(W, idle_ms=None)
    join.add_prediction(p("a", 0), 0)
    assert join.add_label(lab("a", W + 1), 0) == [] and join.counts["late"] == 1  # the clock lags
    join.add_label(lab("b", 0), 0)
    assert join.add_prediction(p("b", W + 1), 0) == [] and join.counts["orphaned"] == 1
    assert join.add_label(lab("b", W + 2), 0)[0].label == 1  # b's own window still holds


def test_the_clock_waits_for_the_slower_topic():
    join = PartitionJoin(W, idle_ms=None)
    join.add_label(lab("x", 0), 0)
    for ts in range(0, 50_000, 1_000):  # the prediction log runs far ahead of the labels
        join.add_prediction(p(f"k{ts}", ts), 0)
    assert join.counts["expired"] == 0 and len(join.predictions) == 50
    assert len(join.add_label(lab("k30000", 30_500), 0)) == 1
    assert join.counts["expired"] == 30  # k0 .. k29000 (ts + window < 30.5 s) once the labels reached it


def test_with_traffic_stopped_the_clock_moves_with_wall_time():
    join = PartitionJoin(W, idle_ms=2_000)
    join.add_prediction(p("a", 0), wall_ms=10_000)
    join.add_label(lab("x", 0), wall_ms=10_000)
    join.tick(20_000)
    assert join.counts["expired"] == 0  # silent, but not known to be read to the end: a backlog, maybe
    join.reached_end("prediction", 20_000)
    join.reached_end("label", 20_000)
    join = PartitionJoin(W, idle_ms=2_000)
    join.add_prediction(p("a", 0), wall_ms=10_000)
    join.add_label(lab("x", 0), wall_ms=10_000)
    join.reached_end("prediction", 10_000)
    join.reached_end("label", 10_000)
    assert join.tick(11_900) == [] and join.counts["expired"] == 0  # not idle yet
    join.tick(12_000)  # both idle from here: the clock starts moving with wall time
    assert join.counts["expired"] == 0
    join.tick(13_001)  # one window of wall time later
    assert join.counts["expired"] == 1 and join.counts["orphaned"] == 1


def test_a_label_topic_that_never_speaks_stops_holding_the_clock_back():
    join = PartitionJoin(W, idle_ms=2_000, on_missing="negative")
    join.add_prediction(p("a", 0), wall_ms=0)
    join.reached_end("label", 0)  # an empty topic: its end is reported at once
    assert join.tick(1_999) == []
    out = join.add_prediction(p("b", 5_000), wall_ms=2_500)  # the label side is idle: the log's clock
    assert [j.prediction.id for j in out] == ["a"] and out[0].imputed


def test_pending_entries_are_bounded_oldest_first():
    join = PartitionJoin(W, max_pending=3, idle_ms=None)
    for i in range(5):
        join.add_prediction(p(f"k{i}", i), 0)
    assert list(join.predictions) == ["k2", "k3", "k4"] and join.counts["evicted"] == 2


def test_the_state_round_trips_through_json_and_the_join_goes_on_alike():
    rng = random.Random(7)
    events = []
    for i in range(2_000):
        ts = i * 10
        events.append(("p", p(f"k{i}", ts)))
        if rng.random() < 0.8:
            delay = int(rng.expovariate(1 / 400)) - 100  # some labels come before their prediction
            events.append(("l", lab(f"k{i}", ts + delay, rng.randint(0, 1))))
    events.sort(key=lambda e: e[1].ts)
    events.insert(1_500, ("l", lab("k100", 1_400)))  # a duplicate label

    def run(join: PartitionJoin, items) -> list[Joined]:
        out = []
        for kind, item in items:
            out += join.add_prediction(item, 0) if kind == "p" else join.add_label(item, 0)
        return out

    whole = PartitionJoin(W, on_missing="negative", idle_ms=None)
    expected = run(whole, events)
    first = PartitionJoin(W, on_missing="negative", idle_ms=None)
    out = run(first, events[:1_700])
    second = PartitionJoin(W, on_missing="negative", idle_ms=None)
    second.restore(json.loads(json.dumps(first.state())))
    out += run(second, events[1_700:])
    assert out == expected and second.counts == whole.counts
    ids = [j.prediction.id for j in out]
    assert len(ids) == len(set(ids))  # every id learned at most once
    assert whole.counts["joined"] > 1_000 and whole.counts["imputed"] > 100


@pytest.mark.parametrize("seed", range(3))
def test_every_id_ends_joined_expired_or_pending_never_twice(seed):
    rng = random.Random(seed)
    join = PartitionJoin(10 * W, idle_ms=None)  # ids are unique within two windows, as they must be
    seen: list[str] = []
    for i in itertools.count():
        if i == 3_000:
            break
        key = f"k{rng.randint(0, 1_000)}"
        if rng.random() < 0.5:
            seen += [j.prediction.id for j in join.add_prediction(p(key, i), 0)]
        else:
            seen += [j.prediction.id for j in join.add_label(lab(key, i), 0)]
    assert len(seen) == len(set(seen)) == join.counts["joined"]


def test_one_timestamp_far_ahead_does_not_carry_the_idle_clock_along():
    join = PartitionJoin(W, idle_ms=2_000, on_missing="negative")
    join.add_prediction(p("a", 0), wall_ms=10_000)
    join.add_label(lab("x", 0), wall_ms=10_000)
    join.add_label(lab("µs", 2**52), wall_ms=10_000)  # a label stamped in microseconds
    join.reached_end("prediction", 10_000)
    join.reached_end("label", 10_000)
    assert join.tick(12_000) == [] and join.tick(12_900) == []  # from where the clock stood
    assert join.clock == 900 and list(join.predictions) == ["a"]
    assert len(join.tick(13_001)) == 1  # a window of wall time later, as with no such label


def test_with_a_side_that_never_spoke_idle_the_clock_moves_on_from_the_other():
    join = PartitionJoin(W, idle_ms=2_000)
    join.reached_end("label", 10_000)  # an empty labels topic, idle at the same time as the log
    join.add_prediction(p("a", 0), wall_ms=10_000)
    join.reached_end("prediction", 10_000)
    assert join.tick(12_000) == [] and join.counts["expired"] == 0
    join.tick(13_001)
    assert join.counts["expired"] == 1


def test_the_clock_never_passes_the_present():
    now = 1_000_000
    join = PartitionJoin(W, idle_ms=2_000, now=lambda: now)
    join.reached_end("label", 0)  # the labels say nothing: the log's clock alone
    join.add_prediction(p("a", now - 500), wall_ms=2_500)
    join.add_prediction(p("far", now + 10**12), wall_ms=2_500)
    assert join.clock == now and list(join.predictions) == ["a", "far"]
    join.add_prediction(p("b", now - 200), wall_ms=2_600)  # not expired on arrival
    assert join.add_label(lab("b", now - 100), wall_ms=2_600)[0].label == 1


def test_a_restored_clock_in_the_future_is_pulled_back_to_the_present():
    broken = PartitionJoin(W, idle_ms=None)
    broken.add_prediction(p("far", 2**52), 0)
    broken.add_label(lab("far2", 2**52), 0)
    assert broken.clock == 2**52
    now = 1_000_000
    join = PartitionJoin(W, idle_ms=None, now=lambda: now)
    join.restore(json.loads(json.dumps(broken.state())))
    assert join.clock == now and max(join.newest.values()) == now
    join.add_prediction(p("a", now - 10), 0)
    assert join.counts["expired"] == 0 and join.add_label(lab("a", now - 5), 0)[0].label == 1


def test_pending_bytes_follow_every_entry_and_the_oldest_is_evicted_first():
    join = PartitionJoin(W, idle_ms=None)
    join.add_label(Label("l", 5, 1, size=100), 0)
    join.add_prediction(Logged("b", 3, [1.0], size=1_000), 0)
    join.add_prediction(Logged("c", 8, [1.0], size=10), 0)
    assert join.pending_bytes == 1_110
    join.evict_oldest()  # b, the oldest of either side
    assert list(join.predictions) == ["c"] and join.pending_bytes == 110 and join.counts["evicted"] == 1
    join.add_prediction(Logged("l", 6, [1.0], size=7), 0)  # joins l: both leave
    assert join.pending_bytes == 10
    restored = PartitionJoin(W, idle_ms=None)
    restored.restore(json.loads(json.dumps(join.state(refs=True))))
    assert restored.pending_bytes == 10 and restored.predictions["c"].features is None
