"""Hostile predict bodies (issue 25, item 4): one request's time, the server's peak RSS, and how
often a canary's /healthz answered meanwhile, against a real `streamlearn serve`.

    PYTHONPATH=service python bench/bench_hostile_predict.py [kind] [seconds of looping]

kind: many (419,000 instances of {"a": [1]}, the issue's body), list (one instance of 800,000
booleans), object (one instance of 300,000 keys), nan (600,000 instances of [NaN], which msgspec
cannot parse), v2 (a V2 infer with 800,000 booleans). Not part of run_all.py: a measurement
for the issue, printed, not a table in docs/benchmarks.md.
"""

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench_serving import make_trainer, save
from streamlearn.dev.broker import free_port
from streamlearn.snapshots import LocalSnapshotStore

BODIES = {
    "many": lambda: b'{"instances":[' + b",".join([b'{"a":[1]}'] * 419_000) + b"]}",
    "list": lambda: b'{"instances":[[' + b",".join([b"true"] * 800_000) + b"]]}",
    "object": lambda: b'{"instances":[{' + b",".join(b'"k%d":[1]' % i for i in range(300_000)) + b"}]}",
    "nan": lambda: b'{"instances":[' + b",".join([b"[NaN]"] * 600_000) + b"]}",
    "v2": lambda: (
        b'{"inputs":[{"name":"features","shape":[1,10],"datatype":"FP32","data":['
        + b",".join([b"true"] * 800_000)
        + b"]}]}"
    ),
}


def peak_rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) // 1024
    return -1


def canary(base: str, stop: threading.Event, latencies: list[float]) -> None:
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            started = time.perf_counter()
            client.get(base + "/healthz")
            latencies.append(time.perf_counter() - started)


def main(kind: str, loop_s: float) -> None:
    body = BODIES[kind]()
    path = "/v2/models/default/infer" if kind == "v2" else "/v1/models/default:predict"
    with tempfile.TemporaryDirectory() as directory:
        save(LocalSnapshotStore(directory), make_trainer())
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "streamlearn", "serve", "--snapshot-dir", directory]
        server = subprocess.Popen([*command, "--port", str(port)], stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not _ready(base):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not become ready")
                time.sleep(0.1)
            print(f"{kind}: {len(body):,} bytes; peak RSS before {peak_rss_mb(server.pid)} MB")
            stop, latencies = threading.Event(), []
            probe = threading.Thread(target=canary, args=(base, stop, latencies))
            probe.start()
            sent, started = 0, time.perf_counter()
            with httpx.Client(timeout=300) as client:
                while not sent or time.perf_counter() - started < loop_s:
                    one = time.perf_counter()
                    json_body = {"content-type": "application/json"}
                    answer = client.post(base + path, content=body, headers=json_body)
                    if not sent:
                        print(f"  one request: {answer.status_code} in {time.perf_counter() - one:.2f} s")
                        print(f"  {answer.text[:120]}")
                    sent += 1
            elapsed = time.perf_counter() - started
            stop.set()
            probe.join()
            print(
                f"  {sent} requests in {elapsed:.1f} s; the canary answered {len(latencies)} times, "
                f"slowest {max(latencies):.2f} s; peak RSS {peak_rss_mb(server.pid)} MB"
            )
        finally:
            server.terminate()
            server.wait(10)


def _ready(base: str) -> bool:
    try:
        return httpx.get(base + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "many", float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
