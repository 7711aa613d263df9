"""Freshness: how soon the served predictions follow a change of concept in a live stream (issue 12).

A background thread produces sea records (3 features, uniform in 0..10) at a steady rate into a
4-partition topic, round-robin, labelled by the concept in force; `streamlearn train` and
`streamlearn serve` run live on it with their defaults. At a known moment the producer switches
to the other concept (a flip), and back at the next flip. Two kinds of change, each its own run:

- threshold: sea's abrupt drift, label = x0 + x1 <= theta with theta 7, then 9.5, then 7 ...
  The probe records lie in the band where the two concepts disagree (7.25 < x0 + x1 < 9.25,
  a quarter away from either threshold), so the old concept scores 0 on them and the new one 1.
- invert: label = x0 + x1 <= 8, then every label inverted, then back. Probe: any sea records.

The probe set, labelled by the new concept, is predicted through the server every 50 ms; a flip is
reflected at the first answer that agrees with the new concept on more than half of it (0.5, the
midpoint between the old concept's 0 and the new one's 1). Before each flip the concept in force
has lasted SETTLE_RECORDS records, the trainer has caught up with the stream, and the served
model scores SETTLED_ACCURACY on the probe set.
"""

import itertools
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import httpx
import numpy as np
import orjson

from bench_order import (
    Child,
    Watched,
    accuracy,
    make_producer,
    metric,
    model_status,
    produce,
    server_args,
    trainer_args,
    wait_for,
)
from common import table
from streamlearn import kafka
from streamlearn.config import ServeSettings, TrainSettings
from streamlearn.dev.broker import EmbeddedBroker, free_port
from streamlearn.dev.streams import Record, records


def _env(name: str, default: float) -> float:
    return float(os.environ.get(f"STREAMLEARN_BENCH_FRESHNESS_{name}", default))


FLIPS = int(_env("FLIPS", 5))
RATE = _env("RATE", 2000)  # records per second
# Each concept lasts at least this many records (10 s at 2,000/s) and until the served model has
# settled on it (SETTLED_ACCURACY on the probe set) before the next flip.
SETTLE_RECORDS = int(_env("SETTLE_RECORDS", 20_000))
CHANGES = tuple(os.environ.get("STREAMLEARN_BENCH_FRESHNESS_CHANGES", "threshold,invert").split(","))
SETTLED_ACCURACY = 0.9
CAUGHT_UP_S = 0.5  # settled also means the trainer has learned all but the last 0.5 s of records
REFLECTED_ACCURACY = 0.5  # the midpoint between the old concept (0 on the probe) and the new one (1)
PROBE_SIZE = 200
POLL_S = 0.05  # while waiting for a flip to be reflected
SETTLE_POLL_S = 0.5  # while waiting for the model to settle (it scrapes the trainer's /metrics)
PARTITIONS = 4
TICK_S = 0.005  # the producer thread's pace: it produces the records due every tick
STREAM, SEED, PROBE_SEED = "sea", 1, 2
MODEL = "fresh"
SNAPSHOT_INTERVAL_S = float(TrainSettings.model_fields["snapshot_interval_s"].default)  # trainer's default
RELOAD_INTERVAL_S = float(ServeSettings.model_fields["reload_interval_s"].default)  # server's default
TARGET_S = SNAPSHOT_INTERVAL_S + 1.0
START_TIMEOUT_S = 120.0  # for the first served snapshot: Python start-ups and the group join
REFLECT_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 300.0  # generous: a trainer that fell behind on a busy machine catches up slowly


@dataclass(frozen=True)
class Change:
    """A pair of concepts the stream flips between, and the probe records they disagree on."""

    name: str
    label: Callable[[float, int], bool]  # (x0 + x1, concept) -> label
    in_probe: Callable[[float], bool]  # whether a record with this x0 + x1 may be a probe record


CHANGE_KINDS = {
    "threshold": Change(
        "threshold", lambda s, concept: s <= (9.5 if concept % 2 else 7.0), lambda s: 7.25 < s < 9.25
    ),
    "invert": Change("invert", lambda s, concept: (s <= 8.0) != bool(concept % 2), lambda s: True),
}


def labelled(change: Change, record: Record, concept: int) -> Record:
    """The record labelled by `concept` of `change`."""
    x = record["features"]
    return {**record, "label": change.label(x[0] + x[1], concept)}


def probe_records(change: Change) -> list[Record]:
    """PROBE_SIZE records of another seed, on which the two concepts of `change` disagree."""
    source = (
        r for r in records(STREAM, seed=PROBE_SEED, drift_every=0) if change.in_probe(sum(r["features"][:2]))
    )
    return list(itertools.islice(source, PROBE_SIZE))


class LiveStream(threading.Thread):
    """Produces the stream at RATE records/s, record i to partition i mod PARTITIONS, until stopped.

    `flip()` asks for the next concept; the thread switches at its next record and notes the
    time it produced the first record of each concept.
    """

    def __init__(self, bootstrap: str, topic: str, change: Change) -> None:
        super().__init__(name="live-stream", daemon=True)
        self.bootstrap, self.topic, self.change = bootstrap, topic, change
        self.stopped = threading.Event()
        self.requested = 0  # concept asked for by flip()
        self.concept = 0  # concept of the records being produced
        # concept -> (monotonic time, wall time, stream index) of its first record produced
        self.first_record: dict[int, tuple[float, float, int]] = {0: (time.monotonic(), time.time(), 0)}
        self.produced = 0
        self.produced_in_concept = 0
        self.error: BaseException | None = None

    def flip(self) -> int:
        self.requested += 1
        return self.requested

    def run(self) -> None:
        try:
            self._produce()
        except BaseException as exc:  # reported by check_alive in the main thread
            self.error = exc

    def _produce(self) -> None:
        producer = make_producer(self.bootstrap, linger_ms=5)
        source = records(STREAM, seed=SEED, drift_every=0)
        started = time.monotonic()
        while not self.stopped.is_set():
            due = int((time.monotonic() - started) * RATE)
            while self.produced < due:
                if self.concept != self.requested:
                    self.concept = self.requested
                    self.first_record[self.concept] = (time.monotonic(), time.time(), self.produced)
                    self.produced_in_concept = 0
                value = orjson.dumps(labelled(self.change, next(source), self.concept))
                produce(producer, self.topic, value, self.produced % PARTITIONS, int(time.time() * 1000))
                self.produced += 1
                self.produced_in_concept += 1
            producer.poll(0)
            self.stopped.wait(TICK_S)  # pacing: the next records are due by then
        producer.flush(10)

    def check_alive(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the live stream failed: {self.error!r}")
        if not self.is_alive() and not self.stopped.is_set():
            raise RuntimeError("the live stream stopped")

    def stop(self) -> None:
        self.stopped.set()
        self.join(30)


@dataclass
class Run:
    """One live run: the stream, the server's client, the probe set and the processes to watch."""

    stream: LiveStream
    client: httpx.Client
    probe: list[Record]
    children: Sequence[Watched]
    trainer_port: int

    def trainer_behind(self) -> float:
        """Records produced that the trainer has not learned yet (inf while it does not answer)."""
        trained = metric(self.trainer_port, "streamlearn_records_trained_total")
        return float("inf") if trained is None else self.stream.produced - trained

    def probe_accuracy(self, concept: int) -> float:
        """Accuracy of the served model on the probe records, labelled by `concept`."""
        return accuracy(self.client, MODEL, [labelled(self.stream.change, r, concept) for r in self.probe])

    def settle(self, concept: int) -> None:
        """Wait until the served model has settled on `concept`.

        Settled: the concept has lasted SETTLE_RECORDS records, the trainer has learned all but the
        last CAUGHT_UP_S of them, and the served model scores SETTLED_ACCURACY on the probe set.
        """

        def settled() -> bool:
            return (
                self.stream.produced_in_concept >= SETTLE_RECORDS
                and self.trainer_behind() <= RATE * CAUGHT_UP_S
                and self.probe_accuracy(concept) >= SETTLED_ACCURACY
            )

        def explain() -> str:
            return (
                f"{self.stream.produced_in_concept:,} records of it produced, the trainer "
                f"{self.trainer_behind():,.0f} behind, learning "
                f"{metric(self.trainer_port, 'streamlearn_records_per_second') or 0:,.0f} records/s, "
                f"probe accuracy {self.probe_accuracy(concept):.3f}"
            )

        what = f"the served model to settle on concept {concept}"
        wait_for(settled, SETTLE_TIMEOUT_S, what, self.children, SETTLE_POLL_S, explain)

    def flip(self) -> tuple[float, float, int]:
        """Flip the concept and wait for the served model to reflect it.

        Returns the seconds from the new concept's first record produced to the first answer that
        reflects it, the seconds to the write of the snapshot served then, and how many records
        of the new concept that snapshot had learned.
        """
        stream = self.stream
        concept = stream.flip()
        wait_for(
            lambda: stream.first_record.get(concept), 10, "the flip to be produced", self.children, 0.001
        )
        flipped, flipped_wall, flipped_index = stream.first_record[concept]
        trained = metric(self.trainer_port, "streamlearn_records_trained_total") or 0
        behind = max(0.0, flipped_index - trained)

        def reflected() -> float | None:
            return time.monotonic() if self.probe_accuracy(concept) > REFLECTED_ACCURACY else None

        seen = wait_for(
            reflected, REFLECT_TIMEOUT_S, f"concept {concept} to be served", self.children, POLL_S
        )
        status = model_status(self.client, MODEL)  # the snapshot served just after: where the time went
        if status is None:
            raise RuntimeError(f"the server stopped serving {MODEL}")
        written = datetime.fromisoformat(status["created_at"]).timestamp() - flipped_wall
        learned = status["records_trained"] - flipped_index
        print(
            f"{stream.change.name} flip to concept {concept}: served {seen - flipped:.2f} s after its "
            f"first record; snapshot v{status['version']}, written {written:.2f} s after it, had learned "
            f"{learned:,} records of the new concept; the trainer was {behind:,.0f} records behind at "
            "the flip",
            flush=True,
        )
        return seen - flipped, written, learned


def run_flips(bootstrap: str, change: Change, root: str) -> list[tuple[float, float, int]]:
    """A live run with its own topic, trainer and server: FLIPS flips of `change`."""
    topic, snapshots = f"freshness-{change.name}", os.path.join(root, change.name)
    os.mkdir(snapshots)
    kafka.ensure_topic(bootstrap, {}, topic, partitions=PARTITIONS)
    trainer_port, server_port = free_port(), free_port()
    train = trainer_args(bootstrap, topic, STREAM, snapshots, MODEL, trainer_port)
    stream = LiveStream(bootstrap, topic, change)
    stream.start()
    try:
        with (
            Child(f"train-{change.name}", train, root) as trainer,
            Child(f"serve-{change.name}", server_args(snapshots, server_port), root) as server,
            httpx.Client(base_url=f"http://127.0.0.1:{server_port}", timeout=10.0) as client,
        ):
            run = Run(stream, client, probe_records(change), (trainer, server, stream), trainer_port)
            wait_for(
                lambda: model_status(client, MODEL), START_TIMEOUT_S, "a first served snapshot", run.children
            )
            try:
                run.settle(0)
            except TimeoutError as exc:
                raise TimeoutError(f"{exc}; the trainer's log ends:\n{trainer.log_tail()}") from None
            flips = []
            for _ in range(FLIPS):
                flips.append(run.flip())
                try:
                    run.settle(stream.concept)
                except TimeoutError as exc:  # a model that cannot relearn: report the flips so far
                    print(f"{change.name}: stopped after {len(flips)} flips: {exc}", flush=True)
                    break
            return flips
    finally:
        stream.stop()


def main() -> list[str]:
    rows = []
    with (
        EmbeddedBroker(port=free_port()) as broker,
        tempfile.TemporaryDirectory(prefix="bench-freshness-") as root,
    ):
        for name in CHANGES:
            flips = run_flips(broker.bootstrap, CHANGE_KINDS[name], root)
            latencies = [seconds for seconds, _, _ in flips]
            p50, p95 = (float(v) for v in np.percentile(latencies, [50, 95]))
            written = float(np.median([w for _, w, _ in flips]))
            learned = float(np.median([n for _, _, n in flips]))
            rows.append((
                name, len(flips), f"{p50:.2f}", f"{p95:.2f}", f"{max(latencies):.2f}",
                "met" if p50 <= TARGET_S else "missed", f"{written:.2f}", f"{learned:,.0f}",
                ", ".join(f"{seconds:.2f}" for seconds in latencies),
            ))  # fmt: skip
    return [
        table(
            "Freshness: a concept change reaching the served predictions",
            (
                "change",
                "flips",
                "p50 s",
                "p95 s",
                "max s",
                f"p50 <= {TARGET_S:g} s",
                "snapshot written s (p50)",
                "new-concept records learned (p50)",
                "each flip s",
            ),
            rows,
            f"A live sea stream at {RATE:,.0f} records/s into a {PARTITIONS}-partition topic (record i in "
            f"partition i mod {PARTITIONS}); `streamlearn train` (defaults: MLP [64, 64], batch 256, a "
            f"snapshot every {SNAPSHOT_INTERVAL_S:g} s) and `streamlearn serve` (a reload poll every "
            f"{RELOAD_INTERVAL_S:g} s) running on it. A flip changes the concept from one record on: "
            "*threshold* moves sea's threshold between 7 and 9.5 (label = x0 + x1 <= theta), *invert* "
            "inverts every label of x0 + x1 <= 8. Seconds from producing the new concept's first record "
            f"to the first answer (polled every {POLL_S * 1000:.0f} ms) that agrees with the new concept "
            f"on more than half of {PROBE_SIZE} probe records on which the two concepts disagree (the "
            "midpoint between the old concept's 0 and the new one's 1). *Snapshot written*: from that first "
            "record to the write of the snapshot served then; *records learned*: how many records of the "
            f"new concept it held. Each concept lasts at least {SETTLE_RECORDS:,} records and until the "
            f"served model scores {SETTLED_ACCURACY:g} on the probe set; a model that does not get there "
            f"within {SETTLE_TIMEOUT_S:.0f} s (the MLP can lose the plasticity to flip again, issue 13) "
            "ends its series early, with fewer flips. Target: p50 within the snapshot interval + 1 s.",
        )
    ]


if __name__ == "__main__":
    main()
