"""Every error Streamlearn raises on purpose descends from StreamlearnError.

The CLI prints a StreamlearnError as one line and exits non-zero; the server maps the
request-level ones to 4xx responses in one place (server.py).
"""

from enum import StrEnum


class StreamlearnError(Exception):
    """Root of Streamlearn's own errors: the message is written for the user."""


class ConfigError(StreamlearnError):
    """A setting has a value that cannot work."""


class BrokerUnavailable(StreamlearnError):
    """The Kafka bootstrap servers could not be reached."""


class KafkaOperationError(StreamlearnError):
    """A Kafka operation (commit, produce, topic creation) failed for good."""


class BrokerBinaryMissing(StreamlearnError):
    """The embedded broker's binary cannot be found."""


class SnapshotError(StreamlearnError):
    """A snapshot cannot be written or read."""


class SnapshotStoreUnavailable(StreamlearnError):
    """The snapshot store (an object store, say) cannot be reached: retry, never fall back."""


class SnapshotMismatch(SnapshotError):
    """A snapshot does not fit the model or data it is being loaded into."""


class ModelNotFound(StreamlearnError):
    """No snapshot exists for the requested model name."""


class ModelNotReady(StreamlearnError):
    """The server has not loaded any snapshot yet."""


class VersionConflict(StreamlearnError):
    """A version cannot be served as asked: it does not load, or there is no earlier one to roll back to."""


class BadRequest(StreamlearnError):
    """A prediction request does not fit the served model."""


class MalformedBody(BadRequest):
    """A request body is not JSON at all."""


class UnsupportedMediaType(BadRequest):
    """A request body is declared as something other than uncompressed JSON."""


class InvalidReason(StrEnum):
    """Why a record was rejected: a bounded set, used as a metric label and a DLQ header."""

    EMPTY = "empty"
    TOO_LARGE = "too_large"
    NOT_UTF8 = "not_utf8"
    BAD_JSON = "bad_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FEATURES = "missing_features"
    BAD_FEATURES = "bad_features"
    WRONG_LENGTH = "wrong_length"
    FEATURE_MISMATCH = "feature_mismatch"
    WRONG_KIND = "wrong_kind"  # a number where a category belongs, or the other way round
    TOO_MANY_CATEGORIES = "too_many_categories"  # a list longer than --max-categories
    CATEGORY_TOO_LONG = "category_too_long"  # a category of more than MAX_CATEGORY_BYTES bytes
    NON_FINITE = "non_finite"
    MISSING_LABEL = "missing_label"
    BAD_LABEL = "bad_label"
    UNKNOWN_CLASS = "unknown_class"
    BAD_WEIGHT = "bad_weight"
    BAD_JOIN_FIELD = "bad_join_field"  # a prediction-log entry or label without a valid id, ts or version
    INTERNAL_ERROR = "internal_error"  # decoding or learning it raised an exception nobody foresaw


class InvalidRecord(StreamlearnError):
    """One record (or one predict instance) breaks the record contract."""

    def __init__(self, reason: InvalidReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
