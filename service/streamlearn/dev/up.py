"""`streamlearn up`: broker, topic, trainer, server and demo stream as supervised child processes.

Children run in their own process groups, so Ctrl-C reaches only this supervisor, which then
stops them in order (producer, trainer, server, broker) and lets the trainer write its final
snapshot while the broker is still there.
"""

import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel

from streamlearn import kafka
from streamlearn.config import ProduceSettings, ServeSettings, TrainSettings, UpSettings, command_line
from streamlearn.dev.broker import EmbeddedBroker, ensure_port_free
from streamlearn.dev.status import get_json, scrape, total, value
from streamlearn.dev.streams import stream_info
from streamlearn.snapshots import open_store

log = logging.getLogger(__name__)
MODEL_NAME = "default"


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def last_line(self) -> str:
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "(no output)"


class Supervisor:
    """Starts the children, shows progress, and stops everything cleanly."""

    def __init__(self, settings: UpSettings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.broker: EmbeddedBroker | None = None
        self.stopping = False

    def run(self) -> int:
        s = self.settings
        for port, what in ((s.port, "prediction server"), (s.metrics_port, "trainer metrics")):
            ensure_port_free("127.0.0.1", port, what)
        open_store(s.snapshot_dir).ensure_writable()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGTERM, self._stop)
        try:
            bootstrap = self._start_broker() if s.embedded_broker else s.bootstrap
            kafka.check_reachable(bootstrap, s.kafka, s.connect_timeout_s)
            kafka.ensure_topic(bootstrap, s.kafka, s.topic)
            self._spawn("server", "serve", ServeSettings, {"bootstrap_servers": bootstrap})
            self._spawn("trainer", "train", TrainSettings, self._train_values(bootstrap))
            if s.demo:
                self._spawn("producer", "produce", ProduceSettings, {"bootstrap": bootstrap})
            self._print_banner(bootstrap)
            return self._watch()
        finally:
            self._stop_all()

    def _train_values(self, bootstrap: str) -> dict[str, Any]:
        values: dict[str, Any] = {"bootstrap": bootstrap, "model_name": MODEL_NAME}
        if self.broker is not None:
            # The embedded broker starts empty each time: earlier snapshots' offsets mean nothing to it.
            values["resume_from"] = "group"
        if self.settings.demo:
            info = stream_info(self.settings.stream)
            values.update(task=info.task, n_features=info.n_features, classes=info.classes or None)
            if info.categorical or info.multi_categorical:
                values.update(categorical=info.categorical, multi_categorical=info.multi_categorical)
        return values

    def _start_broker(self) -> str:
        output = open(self.log_dir / "broker.log", "wb")  # noqa: SIM115 - kept open for the child's life
        self.broker = EmbeddedBroker(port=self.settings.broker_port, binary=self.settings.broker_bin)
        self.broker.start(output=output)
        return self.broker.bootstrap

    def _spawn(self, name: str, command: str, model: type[BaseModel], values: dict[str, Any]) -> None:
        """Start `streamlearn <command>` with the settings `up` shares with it, then `values`."""
        # config.py declares each setting once, so a name `up` shares with a command means the same there.
        s = self.settings
        shared = {field: getattr(s, field) for field in type(s).model_fields if field in model.model_fields}
        log_path = self.log_dir / f"{name}.log"
        output: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - kept open for the child's life
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlearn", command, *command_line(model, {**shared, **values})],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.children.append(Child(name, process, log_path))

    def _print_banner(self, bootstrap: str) -> None:
        s = self.settings
        base = f"http://127.0.0.1:{s.port}"
        print(f"Streamlearn is up (Kafka at {bootstrap}, topic {s.topic!r}; logs in {self.log_dir}/)")
        print(f"  predict:         POST {base}/v1/models/{MODEL_NAME}:predict")
        print(f"  API docs:        {base}/docs")
        print(f"  server metrics:  {base}/metrics")
        print(f"  trainer metrics: http://127.0.0.1:{s.metrics_port}/metrics")
        print("Ctrl-C stops everything.", flush=True)

    def _watch(self) -> int:
        deadline = time.monotonic() + self.settings.duration_s if self.settings.duration_s else None
        while not self.stopping and (deadline is None or time.monotonic() < deadline):
            for child in self.children:
                code = child.process.poll()
                if code is not None and not (child.name == "producer" and code == 0):
                    print(f"\n{child.name} exited with code {code}: {child.last_line()}", file=sys.stderr)
                    return 1
            self._show_progress()
            time.sleep(1.0)
        print()
        return 0

    def _show_progress(self) -> None:
        trainer = scrape(f"http://127.0.0.1:{self.settings.metrics_port}/metrics") or []
        served = get_json(f"http://127.0.0.1:{self.settings.port}/v1/models/{MODEL_NAME}")
        trained = int(total(trainer, "streamlearn_records_trained_total"))
        accuracy = value(trainer, "streamlearn_prequential_accuracy_ratio", window="1000")
        loss = value(trainer, "streamlearn_prequential_loss", window="1000")
        quality = (
            f"accuracy {accuracy:.3f}"
            if accuracy is not None
            else f"loss {loss:.4g}"
            if loss
            else "warming up"
        )
        version = f"v{served['version']}" if served else "none yet"
        line = f"trained {trained:>9,} records | prequential {quality} (last 1k) | served snapshot {version}"
        print("\r" + line.ljust(100), end="", flush=True)

    def _stop(self, *_: Any) -> None:
        self.stopping = True

    def _stop_all(self) -> None:
        order = {"producer": 0, "trainer": 1, "server": 2}
        for child in sorted(self.children, key=lambda c: order[c.name]):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
                try:
                    child.process.wait(30)
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
        if self.broker is not None:
            self.broker.stop()


def run_up(settings: UpSettings, log_dir: Path = Path(".streamlearn/logs")) -> int:
    return Supervisor(settings, log_dir).run()
