"""How soon a restarted trainer learns again: from process start to its first learned record."""

import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import orjson
from confluent_kafka import Producer

from common import table
from streamlearn import kafka
from streamlearn.dev.broker import EmbeddedBroker, free_port
from streamlearn.dev.streams import records

SESSION_TIMEOUTS_MS = (6000, 3000)
RECORDS_PER_PHASE = 2000


def publish(bootstrap: str, topic: str, n: int, seed: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for record in itertools.islice(records("sea", seed=seed), n):
        producer.produce(topic, orjson.dumps(record))
    producer.flush(30)


def trained(port: int) -> float:
    try:
        page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=0.5).text
    except httpx.HTTPError:
        return 0.0
    line = next((x for x in page.splitlines() if x.startswith("streamlearn_records_trained_total ")), "x 0")
    return float(line.split()[1])


def start(bootstrap: str, topic: str, snapshots: str, session_ms: int) -> tuple[subprocess.Popen, float, int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlearn", "train", "--bootstrap", bootstrap, "--topic", topic, "--task",
         "binary", "--snapshot-dir", snapshots, "--metrics-port", str(port), "--session-timeout-ms",
         str(session_ms), "--log-level", "warning"],
        stderr=subprocess.DEVNULL, env=os.environ,
    )  # fmt: skip
    return process, time.perf_counter(), port


def seconds_to_learn(process: subprocess.Popen, started: float, port: int) -> float:
    while trained(port) == 0:
        assert process.poll() is None, "trainer exited"
        time.sleep(0.05)
    return time.perf_counter() - started


def main() -> list[str]:
    rows = []
    with EmbeddedBroker(port=free_port()) as broker, tempfile.TemporaryDirectory() as root:
        for session_ms in SESSION_TIMEOUTS_MS:
            topic = f"restart-{session_ms}"
            kafka.ensure_topic(broker.bootstrap, {}, topic)
            snapshots = os.path.join(root, topic)
            publish(broker.bootstrap, topic, RECORDS_PER_PHASE, 0)
            process, started, port = start(broker.bootstrap, topic, snapshots, session_ms)
            fresh = seconds_to_learn(process, started, port)
            process.send_signal(signal.SIGTERM)
            process.wait(60)
            publish(broker.bootstrap, topic, RECORDS_PER_PHASE, 1)
            process, started, port = start(broker.bootstrap, topic, snapshots, session_ms)
            after_stop = seconds_to_learn(process, started, port)
            process.kill()  # kill -9: no goodbye to the group
            process.wait()
            publish(broker.bootstrap, topic, RECORDS_PER_PHASE, 2)
            process, started, port = start(broker.bootstrap, topic, snapshots, session_ms)
            after_kill = seconds_to_learn(process, started, port)
            process.send_signal(signal.SIGTERM)
            process.wait(60)
            rows.append((session_ms, f"{fresh:.1f}", f"{after_stop:.1f}", f"{after_kill:.1f}"))
    return [
        table(
            "Trainer restarts",
            ("--session-timeout-ms", "first start s", "restart after SIGTERM s", "restart after kill -9 s"),
            rows,
            "Seconds from starting `streamlearn train` (Python start-up included) to its first learned "
            "record; embedded broker, dynamic group membership, records waiting in the topic.",
        )
    ]


if __name__ == "__main__":
    main()
