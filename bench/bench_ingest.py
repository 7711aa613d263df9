"""Ingest rate of `streamlearn train` against a bare Kafka consumer, its memory, and a profile (issue 12).

One topic of N_RECORDS records (32 features, binary labels, 4 partitions) in the embedded broker,
produced once. Against it, in the same run: a bare confluent-kafka consumer that only parses the
JSON and makes a float32 array of each record (the limit), then `streamlearn train` as a user
starts it, once with --arch linear and once with the default MLP, each in a fresh group; then one
more linear trainer under cProfile. Trainer rates come from polling its /metrics every POLL_S.
"""

import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer, TopicPartition

from common import table
from streamlearn import kafka
from streamlearn.dev.broker import EmbeddedBroker, free_port

N_RECORDS = int(os.environ.get("STREAMLEARN_BENCH_INGEST_RECORDS", "1000000"))
N_FEATURES = 32
PARTITIONS = 4
SEED = 12
MEMORY_EARLY = max(1, N_RECORDS // 10)  # RSS is compared at 10% of the records and at all of them
MEMORY_TARGET = 0.10  # the RSS at the end within 10% of the RSS at MEMORY_EARLY
PROFILE_RECORDS = min(200_000, N_RECORDS)
PROFILE_TOP = 8
RATE_TARGETS = {"linear": 0.8, "mlp": 0.6}  # trainer rate / bare consumer rate, at the defaults
# The trainer's extra flags per run; the MLP is the default (hidden 64,64). The runs at a larger
# micro-batch show how much of the time is the fixed cost of each optimizer step.
ARCHS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("linear", ("--arch", "linear")),
    ("mlp", ()),
    ("linear, batch 1024", ("--arch", "linear", "--batch-size", "1024")),
    ("mlp, batch 1024", ("--batch-size", "1024")),
)
POLL_S = 0.05
# Deadlines: every wait raises when it passes. A rate below SLOWEST_RATE means something is broken.
START_TIMEOUT_S = 120.0  # broker start-up, or a trainer's imports and group join
SLOWEST_RATE = 2000.0  # records/s
STOP_TIMEOUT_S = 60.0
METRIC = "streamlearn_records_trained_total"
INVALID_METRIC = "streamlearn_records_invalid_total"


class Deadline:
    def __init__(self, seconds: float, what: str) -> None:
        self.seconds, self.what = seconds, what
        self.end = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise TimeoutError(f"{self.what} did not happen within {self.seconds:.0f} s")


def work_deadline(records: int, what: str) -> Deadline:
    return Deadline(START_TIMEOUT_S + records / SLOWEST_RATE, what)


# -- the data ------------------------------------------------------------------------------------


def values(n: int, chunk: int = 10_000) -> Iterator[bytes]:
    """A fixed hyperplane concept: label = w.x >= sum(w)/2, x uniform in [0, 1]^32 (4 decimals)."""
    rng = np.random.default_rng(SEED)
    weights = rng.uniform(0, 1, N_FEATURES)
    threshold = weights.sum() / 2
    ts = int(time.time() * 1000)
    for start in range(0, n, chunk):
        x = rng.uniform(0, 1, (min(chunk, n - start), N_FEATURES)).round(4)
        labels = (x @ weights >= threshold).astype(int).tolist()
        for i, (row, label) in enumerate(zip(x.tolist(), labels, strict=True)):
            yield orjson.dumps({"features": row, "label": label, "ts": ts + start + i})


def produce(bootstrap: str, topic: str, n: int, source: Iterator[bytes] | None = None) -> tuple[float, int]:
    """Publish n records (of `source`, by default this benchmark's) round-robin over the
    partitions; seconds taken and bytes of values."""
    failed: list[KafkaError] = []
    delivered = [0]

    def report(error: KafkaError | None, _message: Message) -> None:
        if error is None:
            delivered[0] += 1
        else:
            failed.append(error)

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "compression.type": "none",
            "queue.buffering.max.kbytes": 1_048_576,
            "on_delivery": report,
        }
    )
    deadline = work_deadline(n, f"producing {n:,} records")
    started, size = time.perf_counter(), 0
    for i, value in enumerate(source if source is not None else values(n)):
        size += len(value)
        while True:
            try:
                producer.produce(topic, value, partition=i % PARTITIONS)
                break
            except BufferError:  # the local queue is full: serve delivery reports, then retry
                deadline.check()
                producer.poll(0.05)
        if i % 1000 == 0:
            producer.poll(0)
            deadline.check()
    left = producer.flush(max(1.0, deadline.end - time.monotonic()))
    # Delivery reports, not the high watermarks, say what the broker holds: Tansu's watermarks can
    # fall short of the records it stores (the bare consumer below checks it reads all n).
    if left or failed or delivered[0] != n:
        raise RuntimeError(
            f"{delivered[0]:,} of {n:,} records delivered, {left} undelivered, {len(failed)} failed "
            f"(first: {failed[:1]})"
        )
    return time.perf_counter() - started, size


# -- the limit: a bare consumer --------------------------------------------------------------------


def bare_rate(bootstrap: str, topic: str, n: int) -> float:
    """Records/s of a consumer that only parses each value and makes its float32 feature array."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bare-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    deadline = work_deadline(n, f"the bare consumer reading {n:,} records")
    count, first_count, first_at = 0, 0, 0.0
    try:
        while count < n:
            deadline.check()
            messages = consumer.consume(1000, timeout=0.5)
            for message in messages:
                if message.error() is not None:
                    raise RuntimeError(f"bare consumer: {message.error()}")
                np.asarray(orjson.loads(message.value())["features"], dtype=np.float32)  # type: ignore[arg-type]
            count += len(messages)
            if not first_count and count:
                first_at, first_count = time.perf_counter(), count
        elapsed = time.perf_counter() - first_at
    finally:
        consumer.close()
    if count != n:
        raise RuntimeError(f"the bare consumer read {count:,} records, not {n:,}")
    return (n - first_count) / elapsed if elapsed > 0 else float("nan")


# -- the trainer, as a user starts it --------------------------------------------------------------


@dataclass
class TrainerRun:
    rate: float  # records/s from the first learned record to the last
    seconds: float
    rss_early_kib: int | None  # at MEMORY_EARLY records learned
    rss_end_kib: int | None  # at the last record


def train_args(bootstrap: str, topic: str, snapshots: str, port: int, extra: Sequence[str]) -> list[str]:
    return [
        "train", "--bootstrap", bootstrap, "--topic", topic, "--group", f"ingest-{uuid.uuid4().hex[:12]}",
        "--task", "binary", "--snapshot-dir", snapshots, "--metrics-port", str(port),
        "--start-offset", "earliest", *extra,
    ]  # fmt: skip


def streamlearn_command() -> list[str]:
    """The `streamlearn` script of this environment, as a user runs it."""
    script = Path(sys.executable).parent / "streamlearn"
    return [str(script)] if script.exists() else [sys.executable, "-m", "streamlearn"]


def child_env() -> dict[str, str]:
    """This environment without STREAMLEARN_* variables, so the trainer runs with its defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith("STREAMLEARN_")}


def scrape(client: httpx.Client, port: int) -> tuple[float, float] | None:
    """Records trained and records invalid, or None while the endpoint does not answer."""
    try:
        page = client.get(f"http://127.0.0.1:{port}/metrics", timeout=1.0).text
    except httpx.HTTPError:
        return None
    trained, invalid = None, 0.0
    for line in page.splitlines():
        if line.startswith(METRIC + " "):
            trained = float(line.split()[1])
        elif line.startswith(INVALID_METRIC + "{"):
            invalid += float(line.rsplit(" ", 1)[1])
    return None if trained is None else (trained, invalid)


def rss_kib(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    line = next((x for x in status.splitlines() if x.startswith("VmRSS:")), None)
    return int(line.split()[1]) if line else None


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def run_trainer(command: list[str], port: int, log: Path, stop_at: int, label: str) -> TrainerRun:
    """Start a trainer, watch it learn `stop_at` records, then SIGINT it and wait for it to end."""
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=child_env())
    try:
        result = watch(process, port, stop_at, label, log)
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.wait()
        raise
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise TimeoutError(
            f"{label}: the trainer did not stop within {STOP_TIMEOUT_S:.0f} s of SIGINT"
        ) from None
    if code != 0:
        raise RuntimeError(f"{label}: the trainer exited with code {code} after SIGINT:\n{tail(log)}")
    return result


def watch(process: subprocess.Popen[bytes], port: int, stop_at: int, label: str, log: Path) -> TrainerRun:
    first = Deadline(START_TIMEOUT_S, f"{label}: the first learned record")
    deadline = work_deadline(stop_at, f"{label}: learning {stop_at:,} records")
    first_at, first_count = 0.0, 0.0
    rss_early = None
    next_poll = time.perf_counter()
    with httpx.Client() as client:
        while True:
            deadline.check()
            if process.poll() is not None:
                raise RuntimeError(
                    f"{label}: the trainer exited with code {process.returncode}:\n{tail(log)}"
                )
            polled_at = time.perf_counter()
            counts = scrape(client, port)
            trained, invalid = counts or (0.0, 0.0)
            if invalid:
                raise RuntimeError(f"{label}: the trainer rejected {invalid:.0f} records:\n{tail(log)}")
            if not first_count:
                if trained > 0:
                    first_at, first_count = polled_at, trained
                else:
                    first.check()
            if rss_early is None and trained >= MEMORY_EARLY:
                rss_early = rss_kib(process.pid)
            if trained >= stop_at:
                rss_end = rss_kib(process.pid)
                elapsed = polled_at - first_at
                rate = (trained - first_count) / elapsed if elapsed > 0 else float("nan")
                return TrainerRun(rate, elapsed, rss_early, rss_end)
            next_poll += POLL_S
            time.sleep(max(0.0, next_poll - time.perf_counter()))


# -- the profile -----------------------------------------------------------------------------------

Key = tuple[str, int, str]


def where(key: Key) -> str:
    file, line, name = key
    if file == "~":  # a built-in
        return name.replace("<", "").replace(">", "")
    path = Path(file)
    return f"{path.parent.name}/{path.name}:{line} {name}"


def importing(key: Key) -> bool:
    file, _, name = key
    return "importlib" in file or name in (
        "<built-in method builtins.exec>",
        "<built-in method marshal.loads>",
    )


def profile_tables(path: Path) -> tuple[str, list[tuple[str, str, str, str]]]:
    """A note (the loop's direct callees) and rows (the top functions by own time) from a profile.

    Shares are of the time inside Pipeline.run, the trainer's loop (its first consume calls wait
    for the group join). Only functions the loop reaches are ranked, and not through the import
    machinery: a module imported lazily would otherwise bring in the start-up's imports too.
    """
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    run = next(
        (k for k in stats if k[2] == "run" and k[0].endswith(os.path.join("train", "pipeline.py"))), None
    )
    if run is None:
        raise RuntimeError(f"no Pipeline.run in the profile {path}")
    callees: dict[Key, list[Key]] = {}
    for key, (*_, callers) in stats.items():
        for caller in callers:
            callees.setdefault(caller, []).append(key)
    reached, todo = {run}, [run]
    while todo:
        for callee in callees.get(todo.pop(), ()):
            if callee not in reached and not importing(callee):
                reached.add(callee)
                todo.append(callee)
    loop_s = stats[run][3]
    direct = sorted(
        ((stats[c][4][run][3], c) for c in callees.get(run, ())), reverse=True
    )  # cumulative time of each callee when called from run
    note = ", ".join(f"{where(c).split(' ', 1)[-1]} {t / loop_s:.0%}" for t, c in direct if t >= loop_s / 100)
    top = sorted(reached, key=lambda k: stats[k][2], reverse=True)[:PROFILE_TOP]
    rows = [
        (f"`{where(k)}`", f"{stats[k][2] / loop_s:.1%}", f"{stats[k][3] / loop_s:.1%}", f"{stats[k][1]:,}")
        for k in top
    ]
    return f"Pipeline.run {loop_s:.1f} s; its direct callees (1% and more): {note}.", rows


def profiled_run(
    bootstrap: str, topic: str, root: Path
) -> tuple[TrainerRun, str, list[tuple[str, str, str, str]]]:
    port, output = free_port(), root / "trainer.prof"
    command = [
        sys.executable, "-m", "cProfile", "-o", str(output), "-m", "streamlearn",
        *train_args(bootstrap, topic, str(root / "snapshots-profile"), port, ("--arch", "linear")),
    ]  # fmt: skip
    run = run_trainer(command, port, root / "trainer-profile.log", PROFILE_RECORDS, "profiled linear")
    if not output.exists():
        raise RuntimeError(f"cProfile wrote no profile to {output}")
    note, rows = profile_tables(output)
    return run, note, rows


# -- the benchmark ---------------------------------------------------------------------------------


def mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:,.0f}"


def main() -> list[str]:
    n = N_RECORDS
    runs: dict[str, TrainerRun] = {}
    with EmbeddedBroker(port=free_port()) as broker, tempfile.TemporaryDirectory() as tmp:
        root, topic = Path(tmp), "ingest-events"
        kafka.ensure_topic(broker.bootstrap, {}, topic, partitions=PARTITIONS)
        produce_s, size = produce(broker.bootstrap, topic, n)
        bare = bare_rate(broker.bootstrap, topic, n)
        for arch, extra in ARCHS:
            port = free_port()
            command = streamlearn_command() + train_args(
                broker.bootstrap, topic, str(root / f"snapshots-{arch}"), port, extra
            )
            runs[arch] = run_trainer(command, port, root / f"trainer-{arch}.log", n, arch)
        profiled, profile_note, profile_rows = profiled_run(broker.bootstrap, topic, root)

    rate_rows: list[tuple[object, ...]] = [("bare consumer (limit)", f"{bare:,.0f}", "1.00", "", "")]
    for arch, _ in ARCHS:
        ratio, target = runs[arch].rate / bare, RATE_TARGETS.get(arch)
        verdict = "" if target is None else "met" if ratio >= target else "missed"
        rate_rows.append((f"`streamlearn train`, {arch}", f"{runs[arch].rate:,.0f}", f"{ratio:.2f}",
                          "" if target is None else f">= {target:.1f}", verdict))  # fmt: skip
    memory_rows = []
    for arch, _ in ARCHS:
        early, end = runs[arch].rss_early_kib, runs[arch].rss_end_kib
        ratio = end / early if early and end else float("nan")
        met = "met" if abs(ratio - 1) <= MEMORY_TARGET else "missed"
        memory_rows.append((arch, mib(early), mib(end), f"{ratio:.2f}", f"within {MEMORY_TARGET:.0%}", met))
    return [
        table(
            "Ingest: trainer against a bare consumer",
            ("reader", "records/s", "ratio to bare", "target", ""),
            rate_rows,
            f"{n:,} records of {N_FEATURES} features (binary, fixed hyperplane; {size / n:.0f} bytes of "
            f"JSON each) in {PARTITIONS} partitions of the embedded broker, produced once in "
            f"{produce_s:.1f} s ({n / produce_s:,.0f} records/s). The bare consumer does nothing but "
            "`consume(1000)`, `orjson.loads` and a float32 array per record. The trainers are "
            "`streamlearn train` processes with their defaults (batch 256, Adam, snapshots every 2 s), "
            f"each in a fresh group; their rate comes from polling `{METRIC}` every "
            f"{POLL_S * 1000:.0f} ms. Every rate is from the first record read or learned to the last "
            f"(linear {runs['linear'].seconds:.1f} s, MLP {runs['mlp'].seconds:.1f} s).",
        ),
        table(
            "Ingest: trainer memory",
            ("model", f"RSS at {MEMORY_EARLY:,} records (MiB)", f"RSS at {n:,} (MiB)", "ratio", "target", ""),
            memory_rows,
            "VmRSS of the trainer process (/proc/<pid>/status), read when its trained-records counter "
            "first reaches each mark, in the same runs as above.",
        ),
        table(
            "Ingest: where the trainer's time goes",
            ("function", "own time", "cumulative", "calls"),
            profile_rows,
            f"One more linear trainer under `python -m cProfile`, stopped with SIGINT after "
            f"{PROFILE_RECORDS:,} records ({profiled.rate:,.0f} records/s under the profiler, which "
            f"slows Python-heavy code most). The functions the loop reaches, by own time; shares of "
            f"the time inside `Pipeline.run`. {profile_note}",
        ),
    ]


if __name__ == "__main__":
    main()
