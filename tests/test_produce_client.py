"""`streamlearn produce --predict-url`: the client's label schedule, ids and answers, with the
server and Kafka replaced by in-process fakes (tests/integration/test_produce_client.py uses real ones)."""

import itertools
import logging
import math
import time

import httpx
import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from streamlearn.config import ProduceSettings
from streamlearn.dev import client
from streamlearn.dev.client import Complaints, LabelSchedule, Predictor, play, prediction_ids
from streamlearn.dev.streams import records


class FakeProducer:
    """Takes what is produced; every message is delivered at the next poll or flush."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, dict]] = []
        self._undelivered: list = []

    def produce(self, topic, value, key=None, on_delivery=None):
        self.messages.append((topic, key, orjson.loads(value)))
        self._undelivered.append(on_delivery)

    def poll(self, timeout=0.0):
        self._deliver()
        time.sleep(timeout)  # what librdkafka's poll does with nothing to deliver

    def flush(self, _timeout=0.0):
        self._deliver()
        return 0

    def _deliver(self):
        while self._undelivered:
            self._undelivered.pop(0)(None, None)


class FakeServer:
    """A V1 predict route: `answers` picks each request's answer (a status, or a callable)."""

    def __init__(self, answers=None) -> None:
        self.requests: list[dict] = []
        self.answers = answers or (lambda _n, request: serve(request))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(orjson.loads(request.content))
        return self.answers(len(self.requests) - 1, request)

    def predictor(self) -> Predictor:
        return Predictor("http://server:8000", "default", transport=httpx.MockTransport(self))


def serve(request: httpx.Request) -> httpx.Response:
    body = orjson.loads(request.content)
    return httpx.Response(200, json={"predictions": [1], "model_version": 3, "prediction_ids": [body["id"]]})


def settings(**values) -> ProduceSettings:
    defaults = {"stream": "sea", "predict_url": "http://server:8000", "labels_topic": "labels", "rate": 0}
    return ProduceSettings(**{**defaults, **values})


def binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    spread = sigmas * math.sqrt(n * p * (1 - p))
    return n * p - spread, n * p + spread


# -- the schedule ------------------------------------------------------------------------------


def test_labels_are_delayed_exponentially_and_a_share_is_lost():
    schedule = LabelSchedule(mean_delay_s=2.0, loss=0.25, rng=np.random.default_rng(7))
    n = 20_000
    kept = [p for i in range(n) if (p := schedule.add(f"id-{i}", True, now=100.0)) is not None]
    low, high = binomial_bounds(n, 0.75)
    assert low <= len(kept) <= high and schedule.lost == n - len(kept) == n - len(schedule)
    delays = np.array([p.due - 100.0 for p in kept])
    assert (delays >= 0).all()
    assert abs(delays.mean() - 2.0) <= 5 * 2.0 / math.sqrt(len(delays))  # an exponential's sd is its mean
    assert np.median(delays) == pytest.approx(2.0 * math.log(2), rel=0.1)


def test_labels_fall_due_earliest_first_and_only_when_due():
    schedule = LabelSchedule(mean_delay_s=1.0, loss=0.0, rng=np.random.default_rng(1))
    for i in range(100):
        schedule.add(f"id-{i}", i, now=0.0)
    assert schedule.pop_due(now=0.0) is None or schedule.next_due == 0.0
    due = list(iter(lambda: schedule.pop_due(now=1.0), None))
    assert due == sorted(due) and all(p.due <= 1.0 for p in due)
    assert schedule.next_due is not None and schedule.next_due > 1.0
    assert len(due) + len(schedule) == 100 and schedule.clear() == 100 - len(due) and not schedule


@pytest.mark.parametrize(("loss", "kept"), [(0.0, 500), (1.0, 0)])
def test_no_loss_keeps_every_label_and_full_loss_none(loss, kept):
    schedule = LabelSchedule(mean_delay_s=0.0, loss=loss, rng=np.random.default_rng(0))
    for i in range(500):
        schedule.add(str(i), 1, now=5.0)
    assert len(schedule) == kept and schedule.next_due in (None, 5.0)  # no delay: due at once


def test_prediction_ids_are_unique_within_a_run_and_across_runs():
    first = list(itertools.islice(prediction_ids("sea"), 10_000))
    second = list(itertools.islice(prediction_ids("sea"), 10_000))
    assert len(set(first)) == len(first) and not set(first) & set(second)
    assert first[0].startswith("sea-") and first[1].endswith("-1")


# -- the client against fakes --------------------------------------------------------------------


def test_each_served_prediction_gets_its_record_label_once_unless_lost():
    server, producer = FakeServer(), FakeProducer()
    started_ms = time.time() * 1000
    tally = play(settings(count=300, label_delay_s=0.01, label_loss=0.3), predictor=server.predictor(),
                 producer=producer)  # fmt: skip
    assert tally.asked == tally.served == 300 and len(server.requests) == 300
    low, high = binomial_bounds(300, 0.7)
    assert low <= tally.labels_published <= high and tally.labels_lost == 300 - tally.labels_published
    assert tally.labels_dropped == 0  # with --count, every kept label is waited for
    expected = {
        r["id"]: rec["label"] for r, rec in zip(server.requests, records("sea", 0, 5000), strict=False)
    }
    keys = [key.decode() for _topic, key, _value in producer.messages]
    assert len(keys) == len(set(keys)) == tally.labels_published
    for topic, key, value in producer.messages:
        assert topic == "labels" and value["id"] == key.decode() and value["label"] == expected[value["id"]]
        assert started_ms <= value["ts"] <= time.time() * 1000
    sent = [r["instances"] for r in server.requests]
    assert sent[:2] == [[rec["features"]] for rec in itertools.islice(records("sea", 0, 5000), 2)]


def test_an_unavailable_server_is_asked_again_for_the_same_record(monkeypatch):
    monkeypatch.setattr(client, "RETRY_S", 0.01)

    def answers(n, request):
        if n == 0:
            raise httpx.ConnectError("refused", request=request)
        if n < 3:
            return httpx.Response(503, json={"error": "no snapshot loaded yet"}, headers={"retry-after": "1"})
        return serve(request)

    monkeypatch.setattr(client, "MAX_RETRY_S", 0.01)  # Retry-After: 1 shortened for the test
    server, producer = FakeServer(answers), FakeProducer()
    tally = play(settings(count=4, label_delay_s=0.0), predictor=server.predictor(), producer=producer)
    assert tally.asked == tally.served == 4 and len(server.requests) == 7
    assert len({str(r["instances"]) for r in server.requests[:4]}) == 1  # the first record, four times
    assert len({r["id"] for r in server.requests}) == 7
    assert [key.decode() for _t, key, _v in producer.messages] == [r["id"] for r in server.requests[3:]]


HOSTILE = [
    lambda request: httpx.Response(500, json={"error": "boom"}),
    lambda request: httpx.Response(404, json={"error": "model 'default' not found"}),
    lambda request: httpx.Response(200, content=b"<html>proxy error</html>"),
    lambda request: httpx.Response(200, json=[1, 2, 3]),
    lambda request: httpx.Response(200, json={"predictions": [1], "prediction_ids": None}),
    lambda request: httpx.Response(200, json={"predictions": [1], "prediction_ids": ["someone-else"]}),
    lambda request: httpx.Response(200, json={"predictions": [1]}),
    lambda request: (_ for _ in ()).throw(httpx.ReadTimeout("slow", request=request)),
    lambda request: (_ for _ in ()).throw(httpx.RemoteProtocolError("garbage", request=request)),
]


def test_hostile_answers_are_counted_and_skipped_and_get_no_label(caplog):
    server, producer = FakeServer(lambda n, request: HOSTILE[n % len(HOSTILE)](request)), FakeProducer()
    with caplog.at_level(logging.WARNING, logger="streamlearn.dev.client"):
        tally = play(settings(count=5 * len(HOSTILE), label_delay_s=0.0), predictor=server.predictor(),
                     producer=producer)  # fmt: skip
    assert tally.asked == 5 * len(HOSTILE) and tally.served == 0 and not producer.messages
    assert len(caplog.records) == 1  # the rest wait for the next log, a few seconds on


def test_a_stop_publishes_the_labels_due_and_drops_the_others():
    server, producer = FakeServer(), FakeProducer()
    stopped = lambda: len(server.requests) >= 40  # noqa: E731
    tally = play(settings(label_delay_s=3600, label_loss=0.5), stopped, server.predictor(), producer)
    assert tally.served == 40 and not producer.messages
    assert tally.labels_dropped + tally.labels_lost == 40 and tally.labels_dropped > 0


def test_requests_keep_to_the_rate():
    server = FakeServer()
    started = time.monotonic()
    play(
        settings(count=21, rate=100, label_delay_s=0.0), predictor=server.predictor(), producer=FakeProducer()
    )
    assert time.monotonic() - started >= 0.2  # 20 intervals of 10 ms after the first request


def test_complaints_are_logged_at_most_once_every_few_seconds(caplog):
    now = [0.0]
    complaints = Complaints(every_s=5.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="streamlearn.dev.client"):
        for _ in range(100):
            complaints.note("HTTP 500 (skipped)")
            now[0] += 0.125  # 12.5 s in all
    assert [r.getMessage() for r in caplog.records] == [
        "prediction server: HTTP 500 (skipped) x1",  # at 0 s
        "prediction server: HTTP 500 (skipped) x40",  # at 5 s
        "prediction server: HTTP 500 (skipped) x40",  # at 10 s
    ]
    assert complaints.total == {"HTTP 500 (skipped)": 100}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"labels_topic": None}, "needs --labels-topic"),
        ({"invalid_every": 10}, "does not apply"),
        ({"predict_url": "127.0.0.1:8000"}, "pattern"),
        ({"predict_url": "http://host:8000/v1/models"}, "pattern"),
        ({"label_loss": 1.5}, "less than or equal to 1"),
        ({"label_delay_s": -1}, "greater than or equal to 0"),
    ],
)
def test_client_settings_that_cannot_work_are_refused(values, message):
    with pytest.raises(ValidationError, match=message):
        settings(**values)
