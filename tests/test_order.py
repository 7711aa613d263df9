"""The order taken messages are learned in: by event time across partitions, or by offsets."""

from dataclasses import dataclass

from streamlearn.train.order import BUFFER_RECORDS, RELEASE_BATCHES, EventTimeOrder, OffsetBatches
from streamlearn.train.partitions import Partitions

P0, P1, P2 = ("events", 0), ("events", 1), ("events", 2)


@dataclass(frozen=True)
class Msg:
    """A consumed message (an in-process stand-in for confluent_kafka.Message)."""

    partition_: int
    offset_: int
    ts: int | None = None  # event time, ms; None: the message carries no timestamp

    def topic(self) -> str:
        return "events"

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def value(self) -> bytes:
        return b"{}"

    def timestamp(self) -> tuple[int, int]:
        return (0, -1) if self.ts is None else (1, self.ts)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lane(partition: int, times: list[int | None], first_offset: int = 0) -> list[Msg]:
    return [Msg(partition, first_offset + i, ts) for i, ts in enumerate(times)]


def released(order: EventTimeOrder, fetch: list[Msg]) -> list[Msg]:
    """What the loop learns after a poll: its batches, and those of the polls without waiting."""
    out = [m for batch in order.batches(fetch) for m in batch]
    while order.more_ready:
        out += [m for batch in order.batches([]) for m in batch]
    return out


def learned(order: EventTimeOrder, *fetches: list[Msg]) -> list[tuple[int, int]]:
    """(partition, offset) of every message released, in the order released."""
    return [(m.partition_, m.offset_) for fetch in fetches for m in released(order, fetch)]


def timeline(order: EventTimeOrder, *fetches: list[Msg]) -> list[int | None]:
    return [m.ts for fetch in fetches for m in released(order, fetch)]


def make(max_wait_ms: int = 10_000, batch_size: int = 4, partitions=(P0, P1)) -> tuple[EventTimeOrder, Clock]:
    clock = Clock()
    order: EventTimeOrder = EventTimeOrder(batch_size, max_wait_ms, clock=clock)
    order.assigned(partitions)
    return order, clock


# -- event time ---------------------------------------------------------------------------------


def test_chunks_of_several_partitions_are_learned_in_event_time_order():
    order, _ = make()
    # one partition's chunk, then the other's: what a consumer hands over after a backlog
    released = timeline(order, lane(0, [0, 2, 4, 6, 8]), lane(1, [1, 3, 5, 7, 9]), lane(0, [10, 12], 5))

    assert released == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]  # 10 and 12 wait: partition 1 may still send 10


def test_nothing_is_released_before_every_partition_being_read_has_reached_it():
    order, _ = make()

    assert learned(order, lane(0, [5, 6, 7])) == []  # partition 1 has sent nothing yet
    assert learned(order, lane(1, [6])) == [(0, 0), (0, 1), (1, 0)]
    assert order.skew_ms() == 1  # partition 0 is 1 ms ahead of the watermark


def test_a_first_fetch_spanning_a_long_time_waits_for_the_other_partitions():
    order, clock = make(max_wait_ms=2_000)

    assert learned(order, lane(0, list(range(0, 600_000, 1_000)))) == []  # 10 minutes of event time
    clock.now += 1.0
    assert timeline(order, lane(1, [500])) == [0, 500]


def test_micro_batches_hold_at_most_batch_size_records():
    order, _ = make(batch_size=3)
    order.reached_end(P1, 0)

    batches = order.batches(lane(0, list(range(8))))

    assert [len(b) for b in batches] == [3, 3, 2]


def test_a_watermark_that_jumps_releases_a_few_batches_per_poll_oldest_first():
    order, _ = make(batch_size=4)
    learned(order, lane(0, list(range(0, 400, 2))))  # waits for partition 1
    cap = RELEASE_BATCHES * 4

    first = [m.ts for batch in order.batches(lane(1, list(range(1, 401, 2)))) for m in batch]

    assert first == list(range(cap)) and order.more_ready
    assert timeline(order, []) == list(range(cap, 399))  # 399 waits: partition 0 may send 399
    assert not order.more_ready


def test_in_a_backlog_only_whole_micro_batches_are_released():
    order, _ = make(batch_size=4)
    order.reached_end(P1, 0)

    backlog = order.batches(lane(0, list(range(10))), backlog=True)  # the poll came back full
    caught_up = order.batches([], backlog=False)  # a poll that waited and found less

    assert [[m.ts for m in b] for b in backlog] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [[m.ts for m in b] for b in caught_up] == [[8, 9]]


def test_a_timestamp_that_goes_back_never_reorders_its_partition():
    order, _ = make()
    order.reached_end(P1, 0)

    released = learned(order, lane(0, [5, 3, None, 9, 1]))

    assert released == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4)]


# -- idle, slow and lagging partitions -------------------------------------------------------------


def test_a_partition_at_its_end_holds_nobody_back_until_it_sends_again():
    order, _ = make()
    order.reached_end(P1, 0)  # empty

    assert learned(order, lane(0, [1, 2, 3])) == [(0, 0), (0, 1), (0, 2)]
    assert learned(order, lane(1, [4]), lane(0, [5], 3)) == [(1, 0)]  # partition 1 is read again
    assert learned(order, lane(1, [6], 1)) == [(0, 3)]  # 6 waits for partition 0 to pass 5


def test_an_end_reported_before_the_last_messages_are_handed_over_still_counts():
    order, _ = make()
    order.reached_end(P1, 3)  # the end event came with the poll that also brought offsets 0..2

    assert learned(order, lane(1, [1, 2, 3]), lane(0, [5])) == [(1, 0), (1, 1), (1, 2), (0, 0)]
    assert learned(order, lane(1, [6], 3)) == []  # past the end: partition 1 is read again


def test_a_partition_that_sends_nothing_holds_learning_back_at_most_the_wait_bound():
    order, clock = make(max_wait_ms=2_000)

    assert learned(order, lane(0, [1, 2])) == []
    clock.now += 1.9
    assert learned(order, []) == []
    clock.now += 0.2  # 2.1 s without a word from partition 1: idle
    assert learned(order, []) == [(0, 0), (0, 1)]


def test_a_lagging_partition_is_caught_up_first_without_reordering_the_others():
    order, _ = make(partitions=(P0, P1, P2))
    # partitions 0 and 1 are live around t=1000; partition 2 delivers a backlog from t=100 on
    first = timeline(order, lane(0, [1_000, 1_002]), lane(1, [1_001, 1_003]), lane(2, [100, 200, 300]))
    rest = timeline(order, lane(2, [400, 999, 1_001], 3), lane(0, [1_004], 2), lane(1, [1_005], 2))

    assert first == [100, 200, 300]
    assert rest == [400, 999, 1_000, 1_001, 1_001]  # partition 2 has reached 1,001 now


def test_a_partition_far_ahead_is_paused_until_the_others_catch_up():
    order, _ = make()
    ahead = lane(0, list(range(1_000, 1_000 + BUFFER_RECORDS)))

    assert learned(order, ahead) == []  # partition 1 is at 0: everything of partition 0 waits
    assert order.flow() == ([P0], [])
    assert order.flow() == ([], [])  # paused once
    learned(order, lane(1, [*range(1_000), 1_000 + BUFFER_RECORDS // 2]))
    assert order.flow() == ([], [P0])  # drained to half: fetch it again
    assert order.buffered <= BUFFER_RECORDS // 2


def test_a_released_partition_is_forgotten_and_holds_nobody_back():
    order, _ = make()
    learned(order, lane(1, [5]))
    order.release([P1])

    assert learned(order, lane(0, [1, 9])) == [(0, 0), (0, 1)]
    assert order.buffered == 0


# -- --deterministic: batches defined by offsets ------------------------------------------------------


def test_deterministic_batches_are_defined_by_offsets_not_by_how_messages_arrive():
    def batches_for(fetches: list[list[Msg]]) -> list[list[int]]:
        partitions: Partitions[Msg] = Partitions()
        partitions.assign(P0, committed=0)
        batching: OffsetBatches[Msg] = OffsetBatches(4)
        out = []
        for fetch in fetches:
            out += [[m.offset_ for m in batch] for batch in batching.batches(partitions.take(fetch))]
        return out

    at_once = batches_for([lane(0, [0] * 12)])
    trickled = batches_for([lane(0, [0] * 3), lane(0, [0] * 2, 3), lane(0, [0] * 8, 5)])

    assert at_once == trickled == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_an_unfinished_deterministic_batch_of_a_revoked_partition_is_dropped_not_learned():
    batching: OffsetBatches[Msg] = OffsetBatches(4)
    assert batching.batches(lane(0, [0] * 3)) == []
    batching.release([P0])

    batches = batching.batches(lane(0, [0] * 4))

    assert [[m.offset_ for m in b] for b in batches] == [[0, 1, 2, 3]]


def test_without_idling_the_partition_at_the_watermark_is_never_left_paused():
    """Strict release holds back records at the watermark: pausing their partition for buffering
    too much would stop everything for good."""
    order: EventTimeOrder[Msg] = EventTimeOrder(batch_size=2, max_wait_ms=None)
    order.assigned([("events", 0), ("events", 1)])
    many = [Msg(0, i, 100) for i in range(order.buffer_records + 1)]  # all at one timestamp
    assert order.batches([*many, Msg(1, 0, 500)]) == []  # partition 0 may still send more at 100
    pause, _ = order.flow()
    assert pause == []  # partition 1 waits for partition 0's next timestamp: it must keep coming
    order.batches([Msg(0, len(many), 200)])
    assert order.flow() == ([], [])
