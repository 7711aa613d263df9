"""`streamlearn up`: broker, topic, trainer, server and demo stream as supervised child processes.

Children run in their own process groups, so Ctrl-C reaches only this supervisor, which then
stops them in order (producer, trainer, server, broker) and lets the trainer write its final
snapshot while the broker is still there. A supervisor killed with SIGKILL takes its children
with it (on Linux): the kernel kills them too (lifeline.py), as a crash, and frees their ports.

With --delayed-labels the demo is a client of the server (`produce --predict-url`) whose labels
come later, and the trainer learns the prediction log joined with them. Nothing is predicted
before the server has a model, though, and the join learns only what was predicted: so, unless
the store holds a snapshot already, a warm-up comes first. A plain trainer learns
WARM_UP_RECORDS complete records of the stream (a model's history) until the server serves them,
and stops with a final snapshot; the join-mode trainer then resumes that snapshot's weights.
"""

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel

from streamlearn import kafka
from streamlearn.config import ProduceSettings, ServeSettings, TrainSettings, UpSettings, command_line
from streamlearn.dev.broker import EmbeddedBroker, ensure_port_free
from streamlearn.dev.lifeline import die_with_parent
from streamlearn.dev.status import get_json, scrape, total, value
from streamlearn.dev.streams import stream_info
from streamlearn.errors import ConfigError
from streamlearn.snapshots import open_store

log = logging.getLogger(__name__)
MODEL_NAME = "default"
PARTITIONS = 1  # of each topic `up` creates; the label join's two topics must have as many
WARM_UP_RECORDS = 2000  # complete records the first model learns before the client asks it
WARM_UP_SEED = 1  # a stream seed of its own: the client plays other records (seed 0)
# A consumer group of its own: the joining trainer's group assigns partitions by another protocol
# (range), and a broker may refuse it in a group that an earlier member joined with its own.
WARM_UP_GROUP = "streamlearn-warm-up"
JOIN_WINDOW_DELAYS = 10  # --join-window in mean label delays: e^-10 of the labels come later
MIN_JOIN_WINDOW_S = 10.0
STOP_ORDER = ("producer", "trainer", "server")  # by a child's role


def join_topics(topic: str) -> tuple[str, str]:
    """The prediction log and the labels topic of `up --delayed-labels` on `topic`."""
    return f"{topic}.predictions", f"{topic}.labels"


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def role(self) -> str:
        """producer, trainer or server (the warm-up-trainer is a trainer)."""
        return self.name.rsplit("-", 1)[-1]

    def last_line(self) -> str:
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "(no output)"


@dataclass(frozen=True)
class Progress:
    """What the live line showed."""

    trained: int  # records the trainer learned
    served: int | None  # the version the server serves


class Supervisor:
    """Starts the children, shows progress, and stops everything cleanly."""

    def __init__(self, settings: UpSettings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.broker: EmbeddedBroker | None = None
        self.stopping = False
        self.warming_up = False
        self.deadline: float | None = None

    def run(self) -> int:
        s = self.settings
        for port, what in ((s.port, "prediction server"), (s.metrics_port, "trainer metrics")):
            ensure_port_free("127.0.0.1", port, what)
        store = open_store(s.snapshot_dir)
        store.ensure_writable()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGTERM, self._stop)
        self.deadline = time.monotonic() + s.duration_s if s.duration_s else None
        try:
            bootstrap = self._start_broker() if s.embedded_broker else s.bootstrap
            kafka.check_reachable(bootstrap, s.kafka, s.connect_timeout_s)
            self._create_topics(bootstrap)
            self._spawn("server", "serve", ServeSettings, self._serve_values(bootstrap))
            self._print_banner(bootstrap)
            if s.delayed_labels and store.latest_version(MODEL_NAME) is None:
                code = self._warm_up(bootstrap)
                if code is not None:
                    return code
            self._spawn("trainer", "train", TrainSettings, self._train_values(bootstrap, s.delayed_labels))
            if s.demo:
                self._spawn("producer", "produce", ProduceSettings, self._produce_values(bootstrap))
            return self._watch() or 0
        finally:
            self._stop_all()

    def _create_topics(self, bootstrap: str) -> None:
        s = self.settings
        joined = join_topics(s.topic) if s.delayed_labels else ()
        for topic in (s.topic, *joined):
            kafka.ensure_topic(bootstrap, s.kafka, topic, PARTITIONS)
        counts = kafka.partition_counts(bootstrap, s.kafka, list(joined)) if joined else {}
        if len(set(counts.values())) > 1:  # topics of an earlier run, on a Kafka of your own
            found = ", ".join(f"{topic} has {count}" for topic, count in counts.items())
            raise ConfigError(f"the label join needs its topics equally partitioned: {found}")

    def _warm_up(self, bootstrap: str) -> int | None:
        """Let a plain trainer learn WARM_UP_RECORDS complete records until the server serves
        them, then stop it (it writes a final snapshot). None when done, else the exit code."""
        produce = {"bootstrap": bootstrap, "count": WARM_UP_RECORDS, "rate": 0, "stream_seed": WARM_UP_SEED}
        self._spawn("warm-up-producer", "produce", ProduceSettings, produce)
        train = {**self._train_values(bootstrap), "group": WARM_UP_GROUP}
        self._spawn("warm-up-trainer", "train", TrainSettings, train)
        self.warming_up = True
        code = self._watch(until=lambda p: p.trained >= WARM_UP_RECORDS and p.served is not None)
        self.warming_up = False
        if code is not None:
            return code
        warm_up = [child for child in self.children if child.name.startswith("warm-up")]
        self._stop_children(warm_up)
        self.children = [child for child in self.children if child not in warm_up]
        trainer = next(child for child in warm_up if child.role == "trainer")
        if trainer.process.returncode != 0:
            print(f"\nthe warm-up trainer exited with code {trainer.process.returncode}: "
                  f"{trainer.last_line()}", file=sys.stderr)  # fmt: skip
            return 1
        return None

    def _serve_values(self, bootstrap: str) -> dict[str, Any]:
        values: dict[str, Any] = {"bootstrap_servers": bootstrap}
        if self.settings.delayed_labels:
            values["prediction_log_topic"] = join_topics(self.settings.topic)[0]
        return values

    def _produce_values(self, bootstrap: str) -> dict[str, Any]:
        values: dict[str, Any] = {"bootstrap": bootstrap}
        if self.settings.delayed_labels:  # a client of the server, its labels later
            values.update(
                predict_url=f"http://127.0.0.1:{self.settings.port}",
                model_name=MODEL_NAME,
                labels_topic=join_topics(self.settings.topic)[1],
            )
        return values

    def _train_values(self, bootstrap: str, joining: bool = False) -> dict[str, Any]:
        values: dict[str, Any] = {"bootstrap": bootstrap, "model_name": MODEL_NAME}
        if joining:  # the prediction log joined with the labels, instead of --topic
            predictions, labels = join_topics(self.settings.topic)
            window = max(JOIN_WINDOW_DELAYS * self.settings.label_delay_s, MIN_JOIN_WINDOW_S)
            values.update(prediction_log_topic=predictions, labels_topic=labels, join_window=window)
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
        # config/ declares each setting once, so a name `up` shares with a command means the same there.
        s = self.settings
        shared = {field: getattr(s, field) for field in type(s).model_fields if field in model.model_fields}
        log_path = self.log_dir / f"{name}.log"
        output: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - kept open for the child's life
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlearn", command, *command_line(model, {**shared, **values})],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),  # SIGKILL when this supervisor dies without stopping it
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
        if s.delayed_labels:
            predictions, labels = join_topics(s.topic)
            print(f"  delayed labels:  predictions logged to {predictions!r}, labels on {labels!r} "
                  f"(mean delay {s.label_delay_s:g} s, {s.label_loss:.0%} never come)")  # fmt: skip
        print("Ctrl-C stops everything.", flush=True)

    def _watch(self, until: Callable[[Progress], bool] | None = None) -> int | None:
        """Show progress until a stop or the duration (0), a child's failure (1), or `until` the
        progress shown (None)."""
        while not self.stopping and (self.deadline is None or time.monotonic() < self.deadline):
            for child in self.children:
                code = child.process.poll()
                if code is not None and not (child.role == "producer" and code == 0):
                    print(f"\n{child.name} exited with code {code}: {child.last_line()}", file=sys.stderr)
                    return 1
            progress = self._show_progress()
            if until is not None and until(progress):
                return None
            time.sleep(1.0)
        print()
        return 0

    def _show_progress(self) -> Progress:
        trainer = scrape(f"http://127.0.0.1:{self.settings.metrics_port}/metrics") or []
        served = get_json(f"http://127.0.0.1:{self.settings.port}/v1/models/{MODEL_NAME}")
        trained = int(total(trainer, "streamlearn_records_trained_total"))
        version = f"v{served['version']}" if served else "none yet"
        progress = Progress(trained, served["version"] if served else None)
        if self.warming_up:
            line = f"warm-up: trained {trained:,} of {WARM_UP_RECORDS:,} records | served snapshot {version}"
            print("\r" + line.ljust(100), end="", flush=True)
            return progress
        accuracy = value(trainer, "streamlearn_prequential_accuracy_ratio", window="1000")
        loss = value(trainer, "streamlearn_prequential_loss", window="1000")
        quality = (
            f"accuracy {accuracy:.3f}"
            if accuracy is not None
            else f"loss {loss:.4g}"
            if loss
            else "warming up"
        )
        line = f"trained {trained:>9,} records | prequential {quality} (last 1k) | served snapshot {version}"
        if self.settings.delayed_labels:
            joined = value(trainer, "streamlearn_join_outcomes_total", outcome="joined") or 0
            waiting = value(trainer, "streamlearn_join_pending", side="predictions") or 0
            line += f" | labels joined {joined:,.0f}, {waiting:,.0f} predictions waiting"
        print("\r" + line.ljust(100), end="", flush=True)
        return progress

    def _stop(self, *_: Any) -> None:
        self.stopping = True

    def _stop_all(self) -> None:
        self._stop_children(self.children)
        if self.broker is not None:
            self.broker.stop()

    def _stop_children(self, children: list[Child]) -> None:
        for child in sorted(children, key=lambda c: STOP_ORDER.index(c.role)):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
                try:
                    child.process.wait(30)
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()


def run_up(settings: UpSettings, log_dir: Path = Path(".streamlearn/logs")) -> int:
    return Supervisor(settings, log_dir).run()
