"""Serving under concurrent load (issue 14): `streamlearn serve` against a bare endpoint, with wrk.

Both servers run as processes on loopback, one after the other, under the same wrk loads (its
threads on the same 2 cores, so the limit is measured under the same contention). The bare
endpoint (bare_endpoint.py) parses the JSON body and answers a constant under the same uvicorn
settings. While `streamlearn serve` is measured, a new snapshot of its model is published every
SWAP_EVERY_S, so every run also swaps models under load; failed requests (non-2xx answers and
socket errors) must be zero. wrk comes from Debian (`apt-get install wrk`; installed when
missing, as the observability test installs Prometheus).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import orjson

from bench_serving import make_trainer, save
from common import table
from streamlearn.dev.broker import free_port
from streamlearn.snapshots import LocalSnapshotStore

LOADS = ((1, 16), (1, 64), (256, 16), (256, 64))  # (instances per request, connections)
DURATION_S = 15
WRK_THREADS = 2
SWAP_EVERY_S = 1.0
READY_TIMEOUT_S = 30.0
N_FEATURES = 10  # bench_serving's model: MLP 64,64 on 10 features, binary
TARGETS = {1: 0.7, 256: 0.5}  # streamlearn's rate / the bare endpoint's, by instances per request
P99_TARGET = 3.0  # streamlearn's p99 within this many times the bare endpoint's, at 16 connections


@dataclass
class Run:
    rate: float
    p99_ms: float
    failed: int
    requests: int


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "wrk"], check=True, env=env)
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk is not installed and apt-get could not install it")
    return found


def script(directory: Path, instances: int) -> Path:
    body = {
        "instances": np.random.default_rng(instances).normal(size=(instances, N_FEATURES)).round(4).tolist()
    }
    lua = directory / f"post-{instances}.lua"
    lua.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [==[{orjson.dumps(body).decode()}]==]\n"  # [[ ]] would end at the first ]]
    )
    return lua


UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run_wrk(wrk: str, url: str, lua: Path, connections: int) -> Run:
    result = subprocess.run(
        [wrk, f"-t{WRK_THREADS}", f"-c{connections}", f"-d{DURATION_S}s", "--latency", "--timeout", "5s",
         "-s", str(lua), url],
        capture_output=True, text=True, check=True, timeout=DURATION_S + 60,
    )  # fmt: skip
    out = result.stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"\s99%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    failed = 0
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        failed += int(match.group(1))
    if match := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        failed += sum(int(n) for n in match.groups())
    return Run(rate, float(value) * UNITS_MS[unit], failed, requests)


def start(command: list[str], base: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"{command[:4]}: not ready within {READY_TIMEOUT_S:.0f} s")


class Swapper(threading.Thread):
    """Publishes a new snapshot every SWAP_EVERY_S until stopped."""

    def __init__(self, store: LocalSnapshotStore) -> None:
        super().__init__(daemon=True)
        self.store, self.trainer = store, make_trainer()
        self.stopped = threading.Event()
        self.swaps = 0

    def run(self) -> None:
        while not self.stopped.wait(SWAP_EVERY_S):
            save(self.store, self.trainer)
            self.swaps += 1


def measure(
    wrk: str, scripts: dict[int, Path], command: list[str], port: int, swapper: Swapper | None
) -> dict:
    base = f"http://127.0.0.1:{port}"
    server = start(command, base)
    runs = {}
    try:
        if swapper is not None:
            swapper.start()
        for instances, connections in LOADS:
            runs[(instances, connections)] = run_wrk(
                wrk, base + "/v1/models/default:predict", scripts[instances], connections
            )
    finally:
        if swapper is not None:
            swapper.stopped.set()
            swapper.join()
        server.terminate()
        server.wait(30)
    return runs


def main() -> list[str]:
    wrk = wrk_binary()
    with tempfile.TemporaryDirectory() as root:
        directory = Path(root)
        scripts = {instances: script(directory, instances) for instances, _ in LOADS}
        store = LocalSnapshotStore(directory / "snapshots")
        save(store, make_trainer())
        port = free_port()
        bare_command = [sys.executable, str(Path(__file__).with_name("bare_endpoint.py")), str(port)]
        bare = measure(wrk, scripts, bare_command, port, None)
        port = free_port()
        swapper = Swapper(store)
        serve = [sys.executable, "-m", "streamlearn", "serve", "--snapshot-dir", str(store.root),
                 "--port", str(port), "--log-level", "warning"]  # fmt: skip
        ours = measure(wrk, scripts, serve, port, swapper)
    rows = []
    for load in LOADS:
        instances, connections = load
        ratio = ours[load].rate / bare[load].rate
        p99_ratio = ours[load].p99_ms / bare[load].p99_ms
        rate_ok = ratio >= TARGETS[instances]
        p99_ok = p99_ratio <= P99_TARGET if connections == 16 else None
        verdict = "met" if rate_ok and p99_ok is not False else "missed"
        rows.append((
            instances, connections, f"{ours[load].rate:,.0f}", f"{bare[load].rate:,.0f}", f"{ratio:.2f}",
            f">= {TARGETS[instances]}", f"{ours[load].p99_ms:.1f}", f"{bare[load].p99_ms:.1f}",
            f"{p99_ratio:.1f}" + (f" (<= {P99_TARGET:.0f})" if connections == 16 else ""),
            f"{ours[load].failed} of {ours[load].requests:,}", verdict,
        ))  # fmt: skip
    return [
        table(
            "Serving under concurrent load",
            (
                "instances",
                "connections",
                "streamlearn req/s",
                "bare req/s",
                "ratio",
                "target",
                "streamlearn p99 ms",
                "bare p99 ms",
                "p99 ratio",
                "failed",
                "",
            ),
            rows,
            f"wrk ({WRK_THREADS} threads, {DURATION_S} s per load, --latency) against `streamlearn serve` "
            f"(defaults: 1 torch thread) on an MLP 64,64 over {N_FEATURES} features, and against the bare "
            "endpoint (bench/bare_endpoint.py: parse the body, answer a constant; h11, one worker) on the "
            f"same machine and loads; a new snapshot published every {SWAP_EVERY_S:.0f} s during the "
            "streamlearn runs "
            f"({swapper.swaps} swaps).",
        )
    ]


if __name__ == "__main__":
    main()
