"""Settings: flags, STREAMLEARN_* variables, librdkafka pass-through and validation."""

import pytest
from pydantic import ValidationError

from streamlearn.config import ServeSettings, TrainSettings, kafka_overrides


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


def test_kafka_properties_never_appear_in_a_repr(monkeypatch):
    monkeypatch.setenv("STREAMLEARN_KAFKA_SASL_PASSWORD", "hunter2")
    settings = TrainSettings(task="binary")
    assert settings.kafka == {"sasl.password": "hunter2"}
    assert "hunter2" not in repr(settings)


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
