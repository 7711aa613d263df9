"""The settings of every command but `train`: broker, serve, produce, up, dlq and status."""

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from streamlearn.config.base import (
    MIN_TOKEN_CHARS,
    LimitSetting,
    RateSetting,
    StreamSetting,
    TaskSetting,
    _Announcements,
    _DeadLetters,
    _DelayedLabels,
    _EmbeddedBroker,
    _Kafka,
    _KafkaProperties,
    _LabelsTopic,
    _ModelName,
    _PredictionLog,
    _ServerPort,
    _Settings,
    _Snapshots,
    _Topic,
    _TrainerMetricsPort,
)


class BrokerSettings(_EmbeddedBroker):
    """`streamlearn broker`: the embedded Kafka-compatible broker."""

    broker_host: str = Field("127.0.0.1", description="Address the embedded broker listens on.")


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
