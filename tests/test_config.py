"""Settings: flags, STREAMLEARN_* variables, librdkafka pass-through and validation."""

import pytest
from pydantic import ValidationError

from streamlearn.cli import COMMANDS, build_parser
from streamlearn.config import (
    BrokerSettings,
    DlqInspectSettings,
    ProduceSettings,
    ServeSettings,
    TrainSettings,
    UpSettings,
    command_line,
    kafka_overrides,
)


def test_every_setting_reads_its_streamlearn_variable(monkeypatch):
    monkeypatch.setenv("STREAMLEARN_TASK", "multiclass")
    monkeypatch.setenv("STREAMLEARN_CLASSES", "cat, dog,bird")
    monkeypatch.setenv("STREAMLEARN_HIDDEN", "32,16")
    monkeypatch.setenv("STREAMLEARN_N_FEATURES", "5")
    settings = TrainSettings()
    assert settings.task == "multiclass" and settings.classes == ("cat", "dog", "bird")
    assert settings.hidden == (32, 16) and settings.n_features == 5


def test_explicit_values_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("STREAMLEARN_PORT", "9999")
    assert ServeSettings().port == 9999
    assert ServeSettings(port=8080).port == 8080


def test_kafka_properties_pass_through_with_dots():
    environ = {
        "STREAMLEARN_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "STREAMLEARN_KAFKA_SASL_USERNAME": "alice",
        "STREAMLEARN_TOPIC": "not-a-kafka-property",
    }
    assert kafka_overrides(environ) == {"security.protocol": "SASL_SSL", "sasl.username": "alice"}


def test_kafka_properties_never_appear_in_a_repr_or_a_dump(monkeypatch):
    monkeypatch.setenv("STREAMLEARN_KAFKA_SASL_PASSWORD", "hunter2")
    settings = TrainSettings(task="binary")
    assert settings.kafka == {"sasl.password": "hunter2"}
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.model_dump()) + settings.model_dump_json()
    assert "hunter2" not in str(settings.model_dump(mode="json", exclude={"kafka"}))


def test_one_name_means_one_thing_in_every_command(monkeypatch):
    monkeypatch.setenv("STREAMLEARN_PORT", "8001")
    monkeypatch.setenv("STREAMLEARN_SEED", "7")
    monkeypatch.setenv("STREAMLEARN_TOPIC", "payments")
    assert ServeSettings().port == UpSettings().port == 8001
    assert BrokerSettings().broker_port == UpSettings().broker_port == 9092
    assert TrainSettings(task="binary").seed == 7 and ProduceSettings(stream="sea").stream_seed == 0
    assert TrainSettings(task="binary").dead_letter_topic == "payments.dlq"
    assert DlqInspectSettings().dead_letter_topic == "payments.dlq"
    assert DlqInspectSettings(dlq_topic="other.dlq").dead_letter_topic == "other.dlq"


def test_a_setting_means_the_same_in_every_command_but_for_its_default():
    meanings: dict[str, set[str]] = {}
    for model, _run, _summary in COMMANDS.values():
        for name, field in model.model_fields.items():
            meaning = f"{field.annotation} {field.description} {field.metadata}"
            meanings.setdefault(name, set()).add(meaning)
    assert not {name: found for name, found in meanings.items() if len(found) > 1}


def test_up_starts_the_embedded_broker_unless_told_of_a_kafka(monkeypatch):
    assert UpSettings().embedded_broker
    assert not UpSettings(bootstrap="kafka:9092").embedded_broker
    monkeypatch.setenv("STREAMLEARN_BOOTSTRAP", "kafka:9092")
    assert not UpSettings().embedded_broker


def test_command_lines_built_from_settings_parse_back_to_them():
    values = {
        "task": "multiclass",
        "classes": ("red", "green", "blue"),
        "hidden": (8, 4),
        "lr": 0.01,
        "deterministic": True,
        "drift_per_feature": False,
        "n_features": None,
        "kafka": {"sasl.password": "hunter2"},
    }
    args = command_line(TrainSettings, values)
    assert "hunter2" not in args and "--n-features" not in args
    parsed = vars(build_parser().parse_args(["train", *args]))
    parsed.pop("command")
    settings = TrainSettings(**parsed)
    assert settings.classes == values["classes"] and settings.hidden == values["hidden"]
    assert settings.lr == 0.01 and settings.deterministic and not settings.drift_per_feature
    with pytest.raises(ValueError, match="no setting 'stream'"):
        command_line(TrainSettings, {"stream": "sea"})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"task": "multiclass"}, "needs --classes or --num-classes"),
        ({"task": "multiclass", "classes": "a,b", "num_classes": 3}, "disagree"),
        ({"task": "binary", "classes": "a,b,c"}, "exactly two classes"),
        ({"task": "regression", "classes": "a,b"}, "takes no classes"),
        ({"task": "binary", "feature_names": "x,y", "n_features": 3}, "disagree"),
        ({"task": "binary", "classes": "a,a"}, "duplicate"),
        ({"task": "binary", "hidden": "64,0"}, "positive"),
        ({"task": "binary", "lr": 0}, "greater than 0"),
        ({"task": "binary", "model_name": "../etc"}, "pattern"),
    ],
)
def test_settings_that_cannot_work_are_refused(values, message):
    with pytest.raises(ValidationError, match=message):
        TrainSettings(**values)


def test_settings_are_frozen():
    settings = TrainSettings(task="binary")
    with pytest.raises(ValidationError):
        settings.lr = 1.0
