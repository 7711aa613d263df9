"""The prediction-log entry: the server's encoding, the label join's parse, one id limit."""

import numpy as np
import orjson
import pytest

from streamlearn.errors import InvalidReason, InvalidRecord
from streamlearn.logentry import MAX_ID_CHARS, PredictionEntry
from streamlearn.serve import dataplane
from streamlearn.train.joinrecord import parsed


def served_entry(**changes) -> PredictionEntry:
    """An entry as the server builds it: numpy features and probabilities."""
    fields = {
        "id": "req-1:0",
        "ts": 1_700_000_000_123,
        "model": "m",
        "version": 3,
        "features": np.array([1.5, -2.0], np.float32),
        "prediction": "cat",
        "probabilities": np.array([0.25, 0.75], np.float32),
    }
    return PredictionEntry(**{**fields, **changes})


def test_an_entry_encoded_by_the_server_parses_back_equal_in_the_join() -> None:
    entry = served_entry()
    value = entry.encode()
    assert list(orjson.loads(value)) == [
        "id",
        "ts",
        "model",
        "version",
        "features",
        "prediction",
        "probabilities",
    ]
    back = PredictionEntry.parse(parsed(value, 1 << 20), "m")
    expected = served_entry(features=[1.5, -2.0], probabilities=[0.25, 0.75])
    assert back == expected


def test_a_regression_entry_has_no_probabilities_field_and_round_trips() -> None:
    entry = served_entry(prediction=0.5, probabilities=None, features=[1.0, 2.0])
    assert "probabilities" not in orjson.loads(entry.encode())
    assert PredictionEntry.parse(parsed(entry.encode(), 1 << 20), "m") == entry


def test_ids_up_to_the_one_limit_the_server_truncates_to_are_joined() -> None:
    assert dataplane.MAX_ID_CHARS is MAX_ID_CHARS
    longest = served_entry(id="x" * MAX_ID_CHARS, features=[1.0], probabilities=None)
    assert PredictionEntry.parse(orjson.loads(longest.encode()), "m") == longest
    with pytest.raises(InvalidRecord) as refused:
        PredictionEntry.parse(orjson.loads(served_entry(id="x" * (MAX_ID_CHARS + 1)).encode()), "m")
    assert refused.value.reason == InvalidReason.BAD_JOIN_FIELD


def test_another_models_entry_is_skipped_before_its_features_and_version_are_checked() -> None:
    assert PredictionEntry.parse({"id": "a", "ts": 1, "model": "other", "version": "v1"}, "m") is None
    with pytest.raises(InvalidRecord) as refused:
        PredictionEntry.parse({"id": "a", "ts": 1, "model": "m", "version": 2}, "m")
    assert refused.value.reason == InvalidReason.MISSING_FEATURES


def test_the_ts_check_comes_before_the_model_and_the_features() -> None:
    def too_late(ts: int) -> int:
        raise InvalidRecord(InvalidReason.BAD_JOIN_FIELD, f"ts {ts} is ahead")

    with pytest.raises(InvalidRecord, match="ts 5 is ahead"):
        PredictionEntry.parse({"id": "a", "ts": 5.0, "model": "other"}, "m", too_late)
