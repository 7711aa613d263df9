"""`streamlearn produce --predict-url`: a client of the prediction server whose labels come later.

For each record of the synthetic stream it asks the server to predict the record's features
under an id of its own, then publishes the record's label to the labels topic after a delay
drawn from an exponential distribution (mean --label-delay-s), except for a share of predictions
(--label-loss) whose labels never come: the delayed feedback (a chargeback weeks after a
payment, a click seconds after an impression) that the trainer's label join learns from.

Only a served prediction (200, answered under our id) gets a label, since only those are in the
prediction log. A 503 (no snapshot yet, too many connections) or a refused connection is retried
with the same record after a pause; any other failure skips the record. Failures are counted and
logged at most once every few seconds. Labels wait in a heap by due time. With --count the run
ends once every kept label is published; a stop (a signal, `stopped()`) publishes the labels due
by then and drops the others, which a client that goes away would never send either.
"""

import heapq
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import numpy as np
import orjson
from confluent_kafka import KafkaError, Message, Producer

from streamlearn import kafka
from streamlearn.config import ProduceSettings
from streamlearn.dev.streams import Record, records
from streamlearn.errors import KafkaOperationError

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0
RETRY_S = 0.5  # pause before asking again after a 503 (without Retry-After) or a refused connection
MAX_RETRY_S = 5.0
MAX_CATCH_UP_S = 1.0  # after a pause, --rate makes up for at most this much lost time
POLL_S = 0.1  # longest sleep between looks at stopped() and at the labels due
LOG_EVERY_S = 5.0
FLUSH_S = 30.0
LABEL_STREAM = 1  # the labels' randomness: a stream of its own, beside the records' (stream_seed)


@dataclass(order=True, frozen=True)
class PendingLabel:
    """A label waiting to be published."""

    due: float  # the clock's seconds (monotonic)
    id: str = field(compare=False)
    label: Any = field(compare=False)


class LabelSchedule:
    """When each served prediction's label is published, if ever: a heap by due time."""

    def __init__(self, mean_delay_s: float, loss: float, rng: np.random.Generator) -> None:
        self.mean_delay_s = mean_delay_s
        self.loss = loss
        self.rng = rng
        self.lost = 0
        self._heap: list[PendingLabel] = []

    def add(self, prediction_id: str, label: Any, now: float) -> PendingLabel | None:
        """Schedule the label of a prediction served at `now`; None when it is lost."""
        if self.rng.random() < self.loss:
            self.lost += 1
            return None
        pending = PendingLabel(now + float(self.rng.exponential(self.mean_delay_s)), prediction_id, label)
        heapq.heappush(self._heap, pending)
        return pending

    def pop_due(self, now: float) -> PendingLabel | None:
        """The label due first, if it is due by `now`."""
        return heapq.heappop(self._heap) if self._heap and self._heap[0].due <= now else None

    def put_back(self, pending: PendingLabel) -> None:
        heapq.heappush(self._heap, pending)

    @property
    def next_due(self) -> float | None:
        return self._heap[0].due if self._heap else None

    def clear(self) -> int:
        """Drop every waiting label; how many there were."""
        count, self._heap = len(self._heap), []
        return count

    def __len__(self) -> int:
        return len(self._heap)


def prediction_ids(stream: str) -> Iterator[str]:
    """Ids unique to this run: the stream, a random run token, a sequence number."""
    run = f"{stream}-{uuid.uuid4().hex[:12]}"
    n = 0
    while True:
        yield f"{run}-{n}"
        n += 1


@dataclass(frozen=True)
class Answer:
    """What one predict request came to."""

    outcome: Literal["served", "unavailable", "failed"]
    reason: str = ""  # unless served: what went wrong, short enough to count by
    retry_after_s: float = 0.0  # unavailable: how long to wait before asking again


class Predictor:
    """Asks the server's V1 predict route, over one keep-alive connection."""

    def __init__(self, base_url: str, model_name: str, transport: httpx.BaseTransport | None = None) -> None:
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=REQUEST_TIMEOUT_S, transport=transport
        )
        self.path = f"/v1/models/{model_name}:predict"

    def predict(self, features: Any, prediction_id: str) -> Answer:
        body = orjson.dumps({"instances": [features], "id": prediction_id})
        try:
            response = self.http.post(self.path, content=body, headers={"content-type": "application/json"})
        except httpx.ConnectError:
            return Answer("unavailable", "connection refused", RETRY_S)
        except httpx.HTTPError as exc:  # a timeout, a broken answer: it may have been served, or not
            return Answer("failed", type(exc).__name__)
        if response.status_code == 503:
            return Answer("unavailable", "HTTP 503", _retry_after(response.headers.get("retry-after")))
        if response.status_code != 200:
            return Answer("failed", f"HTTP {response.status_code}")
        try:
            ids = orjson.loads(response.content).get("prediction_ids")
        except (orjson.JSONDecodeError, AttributeError):
            return Answer("failed", "answer is no JSON object")
        if ids is None:
            return Answer("failed", "answer without prediction_ids (is --prediction-log-topic set?)")
        if ids != [prediction_id]:
            return Answer("failed", "answer under another prediction id")
        return Answer("served")

    def close(self) -> None:
        self.http.close()


def _retry_after(header: str | None) -> float:
    try:
        seconds = float(header) if header is not None else RETRY_S
    except ValueError:  # an HTTP date, or nonsense
        seconds = RETRY_S
    return min(max(seconds, RETRY_S), MAX_RETRY_S) if math.isfinite(seconds) else RETRY_S


class Complaints:
    """Unserved answers, counted by reason and logged at most once every `every_s` seconds."""

    def __init__(self, every_s: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self.total: Counter[str] = Counter()
        self._unlogged: Counter[str] = Counter()
        self._logged_at = -math.inf

    def note(self, reason: str) -> None:
        self.total[reason] += 1
        self._unlogged[reason] += 1
        now = self.clock()
        if now - self._logged_at >= self.every_s:
            log.warning("prediction server: %s", _counts(self._unlogged))
            self._unlogged.clear()
            self._logged_at = now


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{reason} x{count}" for reason, count in counter.most_common())


@dataclass
class Tally:
    """What a client run came to."""

    asked: int = 0  # records asked for, each once (the retries after a 503 aside)
    served: int = 0
    labels_published: int = 0  # delivered to the labels topic
    labels_lost: int = 0  # never to come (--label-loss)
    labels_dropped: int = 0  # not yet due when the client was stopped


class Client:
    """Plays the client: predict, schedule the label, publish labels as they fall due."""

    def __init__(
        self,
        settings: ProduceSettings,
        stopped: Callable[[], bool],
        predictor: Predictor,
        producer: Producer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert settings.labels_topic is not None  # ProduceSettings checks it goes with --predict-url
        self.settings = settings
        self.topic = settings.labels_topic
        self.stopped = stopped
        self.predictor = predictor
        self.producer = producer
        self.clock = clock
        rng = np.random.default_rng([settings.stream_seed, LABEL_STREAM])
        self.schedule = LabelSchedule(settings.label_delay_s, settings.label_loss, rng)
        self.ids = prediction_ids(settings.stream)
        self.complaints = Complaints(clock=clock)
        self.tally = Tally()
        self.produced = 0
        self.undelivered: list[str] = []

    def run(self) -> Tally:
        """Ask for predictions at --rate until --count records are asked for or `stopped()`."""
        s = self.settings
        source = records(s.stream, s.stream_seed, s.drift_every)
        interval = 1 / s.rate if s.rate else 0.0
        next_at = self.clock()
        record: Record | None = None  # kept across retries
        while not self.stopped() and (s.count == 0 or self.tally.asked < s.count):
            self._wait_until(next_at)
            if self.stopped():
                break
            record = record or next(source)
            retry_after_s = self._ask(record)
            if retry_after_s is not None:
                next_at = self.clock() + retry_after_s
                continue
            record = None
            next_at = max(next_at + interval, self.clock() - MAX_CATCH_UP_S)
        self._finish()
        return self.tally

    def _ask(self, record: Record) -> float | None:
        """Ask for one record's prediction and schedule its label; the pause before asking again
        when the server could not answer it now."""
        prediction_id = next(self.ids)
        answer = self.predictor.predict(record["features"], prediction_id)
        if answer.outcome == "unavailable":
            self.complaints.note(f"{answer.reason} (retried)")
            return answer.retry_after_s
        self.tally.asked += 1
        if answer.outcome == "served":
            self.tally.served += 1
            self.schedule.add(prediction_id, record["label"], self.clock())
        else:
            self.complaints.note(f"{answer.reason} (skipped)")
        return None

    def _wait_until(self, deadline: float) -> None:
        """Publish labels as they fall due until `deadline` or a stop."""
        while True:
            self._publish_due()
            now = self.clock()
            if now >= deadline or self.stopped():
                return
            due = self.schedule.next_due
            wake = deadline if due is None else min(deadline, due)
            self.producer.poll(min(max(wake - now, 0.0), POLL_S))

    def _publish_due(self) -> None:
        while (pending := self.schedule.pop_due(self.clock())) is not None:
            value = orjson.dumps({"id": pending.id, "label": pending.label, "ts": int(time.time() * 1000)})
            try:
                self.producer.produce(self.topic, value, key=pending.id.encode(), on_delivery=self._delivered)
            except BufferError:  # the local queue is full: let deliveries drain, then try again
                self.schedule.put_back(pending)
                self.producer.poll(POLL_S)
                return
            self.produced += 1
        self.producer.poll(0)

    def _delivered(self, error: KafkaError | None, _message: Message) -> None:
        if error is None:
            self.tally.labels_published += 1
        else:
            self.undelivered.append(error.str())

    def _finish(self) -> None:
        """With --count, wait for every kept label; stopped, publish those due and drop the rest."""
        while len(self.schedule) and not self.stopped():
            self._wait_until(self.schedule.next_due or 0.0)
        self._publish_due()
        self.tally.labels_dropped = self.schedule.clear()
        self.tally.labels_lost = self.schedule.lost
        remaining = self.producer.flush(FLUSH_S)
        log.info(
            "asked for %d predictions, %d served; %d labels published to %s, %d lost, %d not yet due "
            "at the stop and dropped%s",
            self.tally.asked, self.tally.served, self.tally.labels_published, self.topic,
            self.tally.labels_lost, self.tally.labels_dropped,
            f"; unserved answers: {_counts(self.complaints.total)}" if self.complaints.total else "",
        )  # fmt: skip
        if remaining or self.undelivered:
            raise KafkaOperationError(
                f"{remaining + len(self.undelivered)} of {self.produced} labels were not delivered"
                + (f" (first error: {self.undelivered[0]})" if self.undelivered else "")
            )


def play(
    settings: ProduceSettings,
    stopped: Callable[[], bool] = lambda: False,
    predictor: Predictor | None = None,
    producer: Producer | None = None,
) -> Tally:
    """Play a client of the server at --predict-url until --count records or `stopped()`."""
    assert settings.predict_url is not None
    if producer is None:
        kafka.check_reachable(settings.bootstrap, settings.kafka, settings.connect_timeout_s)
        producer = kafka.make_producer(
            settings.bootstrap, settings.kafka, partitioner=kafka.LABEL_JOIN_PARTITIONER
        )
    predictor = predictor or Predictor(settings.predict_url, settings.model_name)
    try:
        return Client(settings, stopped, predictor, producer).run()
    finally:
        predictor.close()
