"""Settings for every command: frozen pydantic-settings models read from STREAMLEARN_* variables.

Each command-line flag `--some-flag` is the field `some_flag` of its command's model and the
environment variable STREAMLEARN_SOME_FLAG; flags given on the command line win over the
environment. Any librdkafka property passes through as STREAMLEARN_KAFKA_<PROPERTY>, dots
written as underscores (STREAMLEARN_KAFKA_SECURITY_PROTOCOL=SASL_SSL).
"""

from streamlearn.config.base import (
    KAFKA_ENV_PREFIX,
    LOSSES,
    MIN_TOKEN_CHARS,
    MODEL_NAME,
    Duration,
    StreamName,
    command_line,
    flag,
    is_flag,
    kafka_overrides,
)
from streamlearn.config.commands import (
    BrokerSettings,
    DlqInspectSettings,
    DlqReplaySettings,
    ProduceSettings,
    ServeSettings,
    StatusSettings,
    UpSettings,
)
from streamlearn.config.train import TrainSettings

__all__ = [
    "KAFKA_ENV_PREFIX",
    "LOSSES",
    "MIN_TOKEN_CHARS",
    "MODEL_NAME",
    "BrokerSettings",
    "DlqInspectSettings",
    "DlqReplaySettings",
    "Duration",
    "ProduceSettings",
    "ServeSettings",
    "StatusSettings",
    "StreamName",
    "TrainSettings",
    "UpSettings",
    "command_line",
    "flag",
    "is_flag",
    "kafka_overrides",
]
