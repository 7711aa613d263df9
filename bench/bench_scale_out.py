"""Trainer throughput under torchrun at several world sizes, beside a plain trainer and a bare consumer.

One topic of --records records (--features numbers, binary labels of a fixed hyperplane,
--partitions partitions) in the embedded broker, produced once. Against it, in each of --runs
rounds (the order reversed every other round): a bare confluent-kafka consumer that only parses
each value into a float32 array (the limit), a plain `streamlearn train` (one process, no
torchrun), and `torchrun --standalone --nproc-per-node W -m streamlearn train` for each W of
--world-sizes, each in a fresh group, snapshot directory and model name. The trainers are pinned
to --cores cores with taskset where that is fewer than this process may use. Rates come from
polling rank 0's /metrics every POLL_S (rank 0 counts every rank's records: each rank learns the
global batch), from the first record learned to the last; medians over the runs.

    .venv/bin/python bench/bench_scale_out.py --world-sizes 1,2,4,8 --cores 16 --write
"""

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer, TopicPartition

import bench_ingest as ingest
from common import DOCS, machine, table
from streamlearn import kafka
from streamlearn.dev.broker import EmbeddedBroker, free_port

WORLD_SIZES = "1,2"
RECORDS = 400_000
PARTITIONS = 4
FEATURES = 32
RUNS = 3
SEED = 12
POLL_S = ingest.POLL_S
TITLE = "Scale-out: trainer ranks under torchrun"
TORCHRUN = Path(sys.executable).with_name("torchrun")


@dataclass(frozen=True)
class Reader:
    """One row: the bare consumer (no ranks), the plain trainer, or torchrun with `ranks` ranks."""

    label: str
    ranks: int  # 0: the bare consumer
    torchrun: bool


def readers(world_sizes: Sequence[int]) -> list[Reader]:
    return [
        Reader("bare consumer (limit)", 0, False),
        Reader("`streamlearn train` (no torchrun)", 1, False),
        *(Reader(f"`torchrun`, {w} rank{'s' * (w > 1)}", w, True) for w in world_sizes),
    ]


@dataclass(frozen=True)
class Setup:
    """How many cores the trainers get and how a trainer with `ranks` ranks divides them."""

    cores: int
    pin: tuple[str, ...]  # the taskset prefix, or nothing

    def threads(self, ranks: int) -> int:
        """Torch threads per rank, as the trainer picks them (pipeline.py): one core stays with a
        lone trainer's polling loop; W ranks share the cores they see."""
        return max(1, self.cores - 1 if ranks == 1 else self.cores // ranks)


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, Setup]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-sizes", default=WORLD_SIZES, help="ranks per torchrun, comma-separated")
    cores = len(os.sched_getaffinity(0))  # os.cpu_count(), less any this process may not use
    parser.add_argument("--cores", type=int, default=cores, help="cores the trainers may use")
    parser.add_argument("--records", type=int, default=RECORDS)
    parser.add_argument("--partitions", type=int, default=PARTITIONS)
    parser.add_argument("--features", type=int, default=FEATURES)
    parser.add_argument("--runs", type=int, default=RUNS, help="rounds over every setup; medians reported")
    parser.add_argument("--write", action="store_true", help=f"replace the section '{TITLE}' in {DOCS}")
    args = parser.parse_args(argv)
    try:
        args.world_sizes = sorted({int(w) for w in args.world_sizes.split(",")})
    except ValueError:
        parser.error(f"--world-sizes {args.world_sizes}: integers separated by commas")
    if args.world_sizes[0] < 1 or args.world_sizes[-1] > args.partitions:
        parser.error(f"every world size must be between 1 and --partitions ({args.partitions})")
    if min(args.records, args.partitions, args.features, args.runs) < 1:
        parser.error("--records, --partitions, --features and --runs must be positive")
    available = sorted(os.sched_getaffinity(0))
    if not 1 <= args.cores <= len(available):
        parser.error(f"--cores {args.cores}: this process may use {len(available)}")
    if args.cores < len(available) and shutil.which("taskset"):
        cpus = ",".join(str(cpu) for cpu in available[: args.cores])
        return args, Setup(args.cores, ("taskset", "-c", cpus))
    return args, Setup(len(available), ())  # without taskset the trainers see every core


# -- the data and the limit ----------------------------------------------------------------------


def values(n: int, features: int, chunk: int = 10_000) -> Iterator[bytes]:
    """A fixed hyperplane: label = w.x >= sum(w)/2, x uniform in [0, 1]^features (4 decimals)."""
    rng = np.random.default_rng(SEED)
    weights = rng.uniform(0, 1, features)
    for start in range(0, n, chunk):
        x = rng.uniform(0, 1, (min(chunk, n - start), features)).round(4)
        labels = (x @ weights >= weights.sum() / 2).astype(int).tolist()
        for row, label in zip(x.tolist(), labels, strict=True):
            yield orjson.dumps({"features": row, "label": label})


def produce(bootstrap: str, topic: str, n: int, features: int, partitions: int) -> float:
    """Publish n records round-robin over the partitions; seconds taken."""
    failed: list[KafkaError] = []

    def report(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failed.append(error)

    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 50, "batch.size": 1_000_000,
         "queue.buffering.max.kbytes": 1_048_576, "on_delivery": report}
    )  # fmt: skip
    deadline = ingest.work_deadline(n, f"producing {n:,} records")
    started = time.perf_counter()
    for i, value in enumerate(values(n, features)):
        while True:
            try:
                producer.produce(topic, value, partition=i % partitions)
                break
            except BufferError:  # the local queue is full: serve delivery reports, then retry
                deadline.check()
                producer.poll(0.05)
        if i % 1000 == 0:
            producer.poll(0)
    left = producer.flush(max(1.0, deadline.end - time.monotonic()))
    if left or failed:
        raise RuntimeError(f"{left} records undelivered, {len(failed)} failed (first: {failed[:1]})")
    return time.perf_counter() - started


def bare_rate(bootstrap: str, topic: str, n: int, partitions: int) -> float:
    """Records/s of a consumer that only parses each value and makes its float32 feature array."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"bare-{uuid.uuid4().hex}", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    deadline = ingest.work_deadline(n, f"the bare consumer reading {n:,} records")
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


# -- the trainers --------------------------------------------------------------------------------


def metrics_ports(count: int) -> int:
    """A port p with p .. p + count - 1 free now: rank r serves its /metrics on p + r."""
    for _ in range(100):
        base = free_port()
        try:
            for port in range(base + 1, base + count):
                with socket.create_server(("127.0.0.1", port)):
                    pass
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports found")


def command(setup: Setup, reader: Reader, bootstrap: str, topic: str, root: Path, port: int) -> list[str]:
    """A trainer as a user starts it: plain, or under torchrun."""
    name = f"scale-{reader.ranks}-{uuid.uuid4().hex[:8]}"  # a fresh group, model and snapshot directory
    launcher = ingest.streamlearn_command()
    if reader.torchrun:
        launcher = [str(TORCHRUN), "--standalone", f"--nproc-per-node={reader.ranks}", "-m", "streamlearn"]
    return [
        *setup.pin, *launcher, "train", "--bootstrap", bootstrap, "--topic", topic, "--task", "binary",
        "--group", name, "--model-name", name, "--snapshot-dir", str(root / name),
        "--metrics-port", str(port), "--start-offset", "earliest",
    ]  # fmt: skip


def trainer_rate(args: list[str], reader: Reader, threads: int, port: int, n: int, log: Path) -> float:
    """Start a trainer, watch rank 0 learn n records, then SIGTERM it and wait for every rank to end."""
    env = {**ingest.child_env(), "OMP_NUM_THREADS": str(threads)}
    with log.open("wb") as output:  # its own session, so that one left over ends with all its ranks
        process = subprocess.Popen(
            args, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        rate = ingest.watch(process, port, n, reader.label, log).rate
        process.send_signal(signal.SIGTERM)  # torchrun passes it on: every rank checkpoints and ends
        process.wait(ingest.STOP_TIMEOUT_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # torchrun reports the signal that stopped it as an error, whatever its ranks did
    if process.returncode != 0 and not reader.torchrun:
        raise RuntimeError(f"{reader.label}: exited with code {process.returncode}:\n{ingest.tail(log)}")
    return rate


# -- the benchmark -------------------------------------------------------------------------------


def measure(
    args: argparse.Namespace, setup: Setup, plan: list[Reader]
) -> tuple[dict[Reader, list[float]], float]:
    """Each reader's rate in every run, and the seconds producing took."""
    rates: dict[Reader, list[float]] = {reader: [] for reader in plan}
    with EmbeddedBroker(port=free_port()) as broker, tempfile.TemporaryDirectory() as tmp:
        topic, root = "scale-out", Path(tmp)
        kafka.ensure_topic(broker.bootstrap, {}, topic, partitions=args.partitions)
        produce_s = produce(broker.bootstrap, topic, args.records, args.features, args.partitions)
        for run in range(args.runs):
            for reader in plan if run % 2 == 0 else reversed(plan):
                if not reader.ranks:
                    rate = bare_rate(broker.bootstrap, topic, args.records, args.partitions)
                else:
                    port = metrics_ports(reader.ranks)
                    trainer = command(setup, reader, broker.bootstrap, topic, root, port)
                    log = root / f"{run}-{reader.ranks}-{reader.torchrun}.log"
                    threads = setup.threads(reader.ranks)
                    rate = trainer_rate(trainer, reader, threads, port, args.records, log)
                rates[reader].append(rate)
                print(f"run {run + 1}: {reader.label}: {rate:,.0f} records/s", flush=True)
    return rates, produce_s


def note(args: argparse.Namespace, setup: Setup, produce_s: float) -> str:
    runs = f"{args.runs} run{'s' * (args.runs > 1)}"
    reference = "" if 1 in args.world_sizes else " Without a 1-rank torchrun, W=1 is the plain trainer."
    pinned = f"pinned with taskset to {setup.cores} cores" if setup.pin else f"on all {setup.cores} cores"
    return (
        f"{args.records:,} records of {args.features} features (binary, fixed hyperplane) in "
        f"{args.partitions} partitions of the embedded broker, produced once in {produce_s:.1f} s; "
        f"{machine()}. Each trainer with its defaults (MLP 64,64, batch 256), a fresh group, model and "
        f"snapshot directory, {pinned} (OMP_NUM_THREADS as the torch threads per rank), stopped with "
        f"SIGTERM; under torchrun rank r reads the partitions p with p mod W = r. Rates from polling "
        f"rank 0's `{ingest.METRIC}` (all ranks' records) every {POLL_S * 1000:.0f} ms, from the first "
        f"record learned to the last; {runs}, the order reversed every other run. The bare consumer (one "
        "thread, not pinned) only does `consume(1000)`, `orjson.loads` and a float32 array per record.\n\n"
        "Each rank receives every other rank's records (all_gather), then decodes and tests the whole "
        "global batch and updates the normalizer, drift detectors and prequential scores from it; only "
        "the forward and backward of each optimizer step are split over the ranks, their gradients "
        "summed with gloo. More ranks can only speed up the training step, and add the collectives: on a "
        "2-core machine two ranks cannot show scaling, as each needs a core for its own copy of the "
        "polling, decoding and testing, and both share them with the broker. To measure scaling, run on "
        "a machine with more cores than ranks, e.g. `.venv/bin/python bench/bench_scale_out.py "
        f"--world-sizes 1,2,4 --cores 16 --partitions 8 --write`.{reference}"
    )


def write_section(text: str) -> None:
    """Put this benchmark's section into docs/benchmarks.md in place of its last one (or at the end)."""
    docs = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    heading = f"\n## {TITLE}\n"
    start = docs.find(heading)
    if start < 0:
        docs = docs.rstrip("\n") + "\n\n" + text
    else:
        end = docs.find("\n## ", start + len(heading))
        docs = docs[: start + 1] + text + (docs[end:] if end >= 0 else "")
    DOCS.write_text(docs)
    print(f"wrote the section '{TITLE}' into {DOCS}")


def row(reader: Reader, setup: Setup, rates: list[float], one: float, bare: float) -> tuple[object, ...]:
    median = statistics.median(rates)
    threads = setup.threads(reader.ranks) if reader.ranks else 1
    return (
        reader.label, reader.ranks or "-", threads, f"{median:,.0f}", ", ".join(f"{r:,.0f}" for r in rates),
        f"{median / one:.2f}", f"{median / bare:.2f}",
    )  # fmt: skip


def main(argv: Sequence[str] = ()) -> list[str]:
    args, setup = parse(argv)
    plan = readers(args.world_sizes)
    rates, produce_s = measure(args, setup, plan)
    median = {reader: statistics.median(runs) for reader, runs in rates.items()}
    bare = median[plan[0]]
    one = next((median[r] for r in plan if r.torchrun and r.ranks == 1), median[plan[1]])
    rows = [row(reader, setup, rates[reader], one, bare) for reader in plan]
    header = ("setup", "ranks", "threads per rank", "records/s (median)", "runs", "ratio to W=1",
              "ratio to bare consumer")  # fmt: skip
    section = table(TITLE, header, rows, note(args, setup, produce_s))
    if args.write:
        write_section(section)
    return [section]


if __name__ == "__main__":
    main(sys.argv[1:])
