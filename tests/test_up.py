"""`streamlearn up`: its children's command lines come from the settings models, not spelled out."""

from streamlearn.cli import COMMANDS, build_parser
from streamlearn.config import UpSettings
from streamlearn.dev import up


class FakeProcess:
    def __init__(self, argv, **_kwargs):
        self.argv = argv


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


def test_without_the_demo_the_trainer_learns_the_task_given(monkeypatch, tmp_path):
    settings = UpSettings(task="regression", bootstrap="kafka:9092")
    trainer = children(monkeypatch, tmp_path, settings, settings.bootstrap)["trainer"]
    assert trainer.task == "regression" and trainer.bootstrap == "kafka:9092"
    assert trainer.resume_from == "snapshot"  # a Kafka of its own keeps the snapshot's offsets
