"""`streamlearn up`: its children's command lines come from the settings models, not spelled out."""

import pytest
from pydantic import ValidationError

from streamlearn.cli import COMMANDS, build_parser
from streamlearn.config import UpSettings
from streamlearn.dev import up


class FakeProcess:
    def __init__(self, argv, **kwargs):
        self.argv = argv
        self.kwargs = kwargs


def children(monkeypatch, tmp_path, settings: UpSettings, bootstrap: str) -> dict[str, object]:
    """The settings each child command would run with, parsed back from its command line
    (and under "argv", every command line joined)."""
    monkeypatch.setattr(up.subprocess, "Popen", FakeProcess)
    supervisor = up.Supervisor(settings, tmp_path)
    supervisor._spawn("server", "serve", COMMANDS["serve"][0], {})
    supervisor._spawn("trainer", "train", COMMANDS["train"][0], supervisor._train_values(bootstrap))
    supervisor._spawn("producer", "produce", COMMANDS["produce"][0], {"bootstrap": bootstrap})
    parsed: dict[str, object] = {"argv": " ".join(a for c in supervisor.children for a in c.process.argv)}
    for child in supervisor.children:
        args = vars(build_parser().parse_args(child.process.argv[3:]))
        model = COMMANDS[args.pop("command")][0]
        parsed[child.name] = model(**args)
    return parsed


def test_children_get_the_settings_up_shares_with_them(monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMLEARN_KAFKA_SASL_PASSWORD", "hunter2")
    settings = UpSettings(
        demo=True, stream="blobs", rate=50, port=8123, metrics_port=9123, topic="demo", log_level="debug",
        snapshot_dir=str(tmp_path / "snaps"),
    )  # fmt: skip
    found = children(monkeypatch, tmp_path, settings, "127.0.0.1:19092")
    server, trainer, producer = found["server"], found["trainer"], found["producer"]
    assert server.port == 8123 and server.snapshot_dir == str(tmp_path / "snaps")
    assert trainer.metrics_port == 9123 and trainer.topic == "demo" and trainer.bootstrap == "127.0.0.1:19092"
    assert trainer.task == "multiclass" and trainer.classes == ("red", "green", "blue")
    assert trainer.n_features == 4 and trainer.model_name == up.MODEL_NAME
    assert (producer.stream, producer.rate, producer.topic) == ("blobs", 50, "demo")
    assert {server.log_level, trainer.log_level, producer.log_level} == {"debug"}
    assert "hunter2" not in found["argv"]  # credentials reach the children by their environment only


@pytest.mark.skipif(not up.sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_every_child_is_set_to_die_with_up(monkeypatch, tmp_path):
    # A kill -9 of `up` gives it no chance to stop them (tests/integration/test_cli.py kills one).
    settings = UpSettings(demo=True, bootstrap="kafka:9092", snapshot_dir=str(tmp_path / "snaps"))
    monkeypatch.setattr(up.subprocess, "Popen", FakeProcess)
    supervisor = up.Supervisor(settings, tmp_path)
    supervisor._spawn("server", "serve", COMMANDS["serve"][0], {})
    (child,) = supervisor.children
    assert child.process.kwargs["start_new_session"] and callable(child.process.kwargs["preexec_fn"])


def test_without_the_demo_the_trainer_learns_the_task_given(monkeypatch, tmp_path):
    settings = UpSettings(task="regression", bootstrap="kafka:9092")
    trainer = children(monkeypatch, tmp_path, settings, settings.bootstrap)["trainer"]
    assert trainer.task == "regression" and trainer.bootstrap == "kafka:9092"
    assert trainer.resume_from == "snapshot"  # a Kafka of its own keeps the snapshot's offsets


# -- up --demo --delayed-labels ------------------------------------------------------------------


class RunningProcess(FakeProcess):
    """A child that runs until it is sent a signal, then exits 0."""

    def __init__(self, argv, **kwargs):
        super().__init__(argv, **kwargs)
        self.returncode = None
        self.signals: list[int] = []

    def poll(self):
        return self.returncode

    def send_signal(self, signum):
        self.signals.append(signum)
        self.returncode = 0

    def wait(self, _timeout=None):
        return self.returncode

    kill = send_signal


def parse(argv: list[str]):
    args = vars(build_parser().parse_args(argv[3:]))
    return COMMANDS[args.pop("command")][0](**args)


def run_up(monkeypatch, settings: UpSettings, log_dir):
    """Run `up` with every child, Kafka and the clock's waits faked: the children started, in
    order, as (name, settings, process), and the topics created as {topic: partitions}."""
    topics: dict[str, int] = {}
    monkeypatch.setattr(up.subprocess, "Popen", RunningProcess)
    monkeypatch.setattr(up.signal, "signal", lambda *_args: None)  # pytest keeps its Ctrl-C
    monkeypatch.setattr(up, "ensure_port_free", lambda *_args: None)
    monkeypatch.setattr(up.kafka, "check_reachable", lambda *_args: None)
    monkeypatch.setattr(up.kafka, "ensure_topic", lambda _b, _o, topic, n: topics.setdefault(topic, n))
    monkeypatch.setattr(up.kafka, "partition_counts", lambda _b, _o, names: {t: topics[t] for t in names})
    supervisor = up.Supervisor(settings, log_dir)
    started: list[tuple[str, object, RunningProcess]] = []

    def progress():
        for child in supervisor.children:
            if all(child.process is not process for _n, _s, process in started):
                started.append((child.name, parse(child.process.argv), child.process))
        # everything is up (or something is amiss): stop
        supervisor.stopping = "producer" in [name for name, _s, _p in started] or len(started) > 5
        return up.Progress(trained=up.WARM_UP_RECORDS, served=1)

    monkeypatch.setattr(supervisor, "_show_progress", progress)
    assert supervisor.run() == 0
    return started, topics


def test_delayed_labels_warm_up_a_first_model_then_join_the_log_with_the_labels(monkeypatch, tmp_path):
    settings = UpSettings(
        demo=True, delayed_labels=True, label_delay_s=2.5, label_loss=0.1, port=8123, topic="demo",
        bootstrap="kafka:9092", snapshot_dir=str(tmp_path / "snaps"),
    )  # fmt: skip
    started, topics = run_up(monkeypatch, settings, tmp_path / "logs")
    assert topics == {"demo": 1, "demo.predictions": 1, "demo.labels": 1}
    names = [name for name, _s, _p in started]
    assert names == ["server", "warm-up-producer", "warm-up-trainer", "trainer", "producer"]
    found = {name: child for name, child, _p in started}
    server, trainer, client = found["server"], found["trainer"], found["producer"]
    assert server.bootstrap_servers == "kafka:9092" and server.prediction_log_topic == "demo.predictions"
    assert (trainer.prediction_log_topic, trainer.labels_topic) == ("demo.predictions", "demo.labels")
    assert trainer.join_window == 25.0 and trainer.model_name == up.MODEL_NAME  # ten mean delays
    assert client.predict_url == "http://127.0.0.1:8123" and client.labels_topic == "demo.labels"
    assert (client.label_delay_s, client.label_loss, client.model_name) == (2.5, 0.1, up.MODEL_NAME)
    warm_producer, warm_trainer = found["warm-up-producer"], found["warm-up-trainer"]
    assert warm_producer.predict_url is None and warm_producer.topic == "demo"
    assert (warm_producer.count, warm_producer.rate, warm_producer.stream_seed) == (up.WARM_UP_RECORDS, 0, 1)
    assert warm_trainer.labels_topic is None and warm_trainer.topic == "demo"
    assert warm_trainer.group == up.WARM_UP_GROUP != trainer.group  # the join's assignor is another
    assert warm_trainer.model_name == trainer.model_name and warm_trainer.task == trainer.task == "binary"
    processes = {name: process for name, _s, process in started}
    # the warm-up was stopped (its trainer writing its final snapshot) before the join began
    assert processes["warm-up-trainer"].signals == [up.signal.SIGTERM]


def test_delayed_labels_skip_the_warm_up_when_a_snapshot_is_there(monkeypatch, tmp_path):
    from .live_server import write_trained_model

    write_trained_model(tmp_path / "snaps", up.MODEL_NAME)
    settings = UpSettings(
        demo=True, delayed_labels=True, bootstrap="kafka:9092", snapshot_dir=str(tmp_path / "snaps")
    )
    started, _topics = run_up(monkeypatch, settings, tmp_path / "logs")
    assert [name for name, _s, _p in started] == ["server", "trainer", "producer"]
    assert started[1][1].join_window == 10 * 5.0  # ten times the default mean delay


def test_without_delayed_labels_up_runs_as_before(monkeypatch, tmp_path):
    settings = UpSettings(demo=True, bootstrap="kafka:9092", snapshot_dir=str(tmp_path / "snaps"))
    started, topics = run_up(monkeypatch, settings, tmp_path / "logs")
    assert [name for name, _s, _p in started] == ["server", "trainer", "producer"] and list(topics) == [
        "events"
    ]
    server, trainer, producer = (child for _n, child, _p in started)
    assert server.prediction_log_topic is None and trainer.labels_topic is None
    assert producer.predict_url is None


def test_delayed_labels_need_the_demo():
    with pytest.raises(ValidationError, match="--delayed-labels needs --demo"):
        UpSettings(delayed_labels=True)
