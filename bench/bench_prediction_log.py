"""What the prediction log costs a predict (issue 15): p99 with logging on against off, at a steady rate.

One `streamlearn serve` at a time on loopback serves an MLP 64,64 over 10 features; an asyncio
client sends RATE predicts a second (one instance each, every one with its own id) for
DURATION_S, and measures each answer's latency. Three runs: no log, the log to the embedded
broker, and the log to a broker that is gone (every entry dropped, counted; no request may fail).
Target: p99 at most 0.5 ms above the run without the log.

Each predict's latency runs from the moment it was due, so a stall counts against every predict
due during it.
"""

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

from bench_order import Child, wait_for
from bench_serving import make_trainer, save
from common import percentiles, table
from streamlearn import kafka
from streamlearn.dev.broker import EmbeddedBroker, free_port
from streamlearn.snapshots import LocalSnapshotStore


def _env(name: str, default: float) -> float:
    return float(os.environ.get(f"STREAMLEARN_BENCH_LOG_{name}", default))


RATE = _env("RATE", 200)  # predicts per second
DURATION_S = _env("DURATION_S", 20)
WARMUP_S = 2.0
P99_TARGET_MS = 0.5


CONNECTIONS = 32
WARM = 100  # sequential predicts before the steady ones: connections, lazy imports


def request(i: int, body: bytes) -> bytes:
    """One predict, as bytes on the wire: each with its own id."""
    payload = b'{"id": "p-%d", ' % i + body[1:]
    head = (
        "POST /v1/models/default:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def answer(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 answer; its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    await reader.readexactly(length)
    return status


async def steady(base: str) -> tuple[list[float], int, int]:
    """Latencies of the answered predicts, each from the moment it was due (so that a stall delays
    every predict due during it: no coordinated omission); failures; and predicts sent.

    A plain asyncio client over keep-alive connections: httpx's own cost per request (milliseconds
    of Python) made the client, not the server, the bottleneck at this rate."""
    body = orjson.dumps({"instances": np.random.default_rng(0).normal(size=(1, 10)).round(4).tolist()})
    host, port = base.removeprefix("http://").split(":")
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(CONNECTIONS):
        pool.put_nowait(await asyncio.open_connection(host, int(port)))
    latencies: list[float] = []
    failures = 0

    async def one(i: int, due: float, measured: bool) -> None:
        nonlocal failures
        reader, writer = await pool.get()
        try:
            writer.write(request(i, body))
            status = await asyncio.wait_for(answer(reader), 30)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            status = 0
            writer.close()
            reader, writer = await asyncio.open_connection(host, int(port))
        pool.put_nowait((reader, writer))
        if status != 200:
            failures += 1
        elif measured:
            latencies.append(time.perf_counter() - due)

    for i in range(WARM):
        await one(-1 - i, time.perf_counter(), False)
    tasks = []
    start = time.perf_counter()
    total = int(RATE * (DURATION_S + WARMUP_S))
    for i in range(total):
        due = start + i / RATE
        if due > time.perf_counter():
            await asyncio.sleep(due - time.perf_counter())
        tasks.append(asyncio.create_task(one(i, due, i >= RATE * WARMUP_S)))
    await asyncio.gather(*tasks)
    while not pool.empty():
        pool.get_nowait()[1].close()
    return latencies, failures, total


def counter(port: int, outcome: str) -> float:
    page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    prefix = f'streamlearn_predictions_logged_total{{outcome="{outcome}"}}'
    return next((float(line.split()[-1]) for line in page.splitlines() if line.startswith(prefix)), 0.0)


def run(snapshots: str, log_dir: str, flags: list[str], env: dict[str, str] | None = None) -> dict:
    port = free_port()
    saved = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    try:
        child = Child(f"serve-{port}", ["serve", "--snapshot-dir", snapshots, "--port", str(port),
                                        "--log-level", "warning", *flags], log_dir)  # fmt: skip
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ready(base), 60, "the server ready", [child])
        latencies, failures, sent = asyncio.run(steady(base))
        logged = flags != []
        if logged:  # every entry ends sent or dropped: wait for the last deliveries or timeouts
            total = sent + WARM  # and the warm-up's
            wait_for(lambda: counter(port, "sent") + counter(port, "dropped") >= total, 60, "the log drained")
        return {
            "latencies": latencies,
            "failures": failures,
            "sent": sent,
            "entries": sent + WARM if logged else 0,  # the warm-up's too
            "logged": counter(port, "sent") if logged else 0,
            "dropped": counter(port, "dropped") if logged else 0,
        }
    finally:
        child.stop()


def _ready(base: str) -> bool:
    try:
        return httpx.get(base + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory() as work, EmbeddedBroker(port=free_port()) as broker:
        store = LocalSnapshotStore(Path(work) / "snapshots")
        save(store, make_trainer())
        kafka.ensure_topic(broker.bootstrap, {}, "predictions", partitions=4)
        dead = f"127.0.0.1:{free_port()}"
        log_to = ["--announce-topic", "", "--prediction-log-topic", "predictions", "--bootstrap-servers"]
        runs = [
            ("off", [], None),
            ("on, broker up", [*log_to, broker.bootstrap], None),
            ("on, broker gone", [*log_to, dead], {"STREAMLEARN_KAFKA_MESSAGE_TIMEOUT_MS": "2000"}),
        ]
        results = {}
        for label, flags, env in runs:
            results[label] = run(str(store.root), work, flags, env)
            slow = sum(latency > 0.1 for latency in results[label]["latencies"])
            print(label, {k: v for k, v in results[label].items() if k != "latencies"}, "over 100 ms:", slow,
                  file=sys.stderr)  # fmt: skip
        base_p99 = percentiles(results["off"]["latencies"])[2]
        for label, _flags, _env_vars in runs:
            r = results[label]
            p50, _p95, p99 = percentiles(r["latencies"])
            extra = p99 - base_p99
            verdict = "" if label == "off" else ("met" if extra <= P99_TARGET_MS else "missed")
            counts = [f"{r['sent']:,}", r["failures"], f"{r['entries']:,}", f"{r['logged']:,.0f}",
                      f"{r['dropped']:,.0f}"]  # fmt: skip
            compared = "" if label == "off" else f"{extra:+.2f}"
            rows.append([label, *counts, f"{p50:.2f}", f"{p99:.2f}", compared, verdict])
    return [
        table(
            "Prediction log: what logging costs a predict",
            [
                "log",
                "requests",
                "failed",
                "log entries",
                "logged",
                "dropped (counted)",
                "p50 ms",
                "p99 ms",
                "p99 vs off ms",
                f"<= +{P99_TARGET_MS} ms",
            ],
            rows,
            f"`streamlearn serve` (MLP 64,64 over 10 features, one instance per predict, each with its "
            f"own id) at a steady {RATE:.0f} predicts per second for {DURATION_S:.0f} s after a "
            f"{WARMUP_S:.0f} s warm-up (and 100 sequential predicts before), from an asyncio client "
            "on the same 2-core machine; the log to a "
            "4-partition topic of the embedded broker, or to a broker that is gone (librdkafka's "
            "message.timeout.ms 2 s, so every entry ends dropped and counted).",
        )
    ]


if __name__ == "__main__":
    main()
