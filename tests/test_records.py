"""The record contract: what decodes, and why what does not is rejected."""

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamlearn.decoding import RecordDecoder
from streamlearn.errors import InvalidReason
from streamlearn.records import FeatureSpec, LabelSpec

BINARY = LabelSpec.create("binary")
THREE = FeatureSpec(3)


def decode_one(value: bytes | None, labels: LabelSpec = BINARY, features: FeatureSpec | None = THREE):
    return RecordDecoder(labels, features, max_bytes=200).decode([value])


def test_valid_records_become_float32_arrays():
    batch = RecordDecoder(BINARY).decode(
        [b'{"features": [1, 2.5, -3], "label": true, "weight": 2}', b'{"features": [0, 0, 0], "label": 0}']
    )
    assert batch.features.dtype == np.float32 and batch.features.shape == (2, 3)
    assert batch.features[0].tolist() == [1.0, 2.5, -3.0]
    assert batch.labels.tolist() == [1.0, 0.0]
    assert batch.weights.tolist() == [2.0, 1.0]
    assert batch.rejected == []


def test_first_valid_record_fixes_the_feature_length():
    decoder = RecordDecoder(BINARY)
    batch = decoder.decode([b'{"features": [1, 2], "label": 1}', b'{"features": [1, 2, 3], "label": 1}'])
    assert decoder.features == FeatureSpec(2)
    assert len(batch) == 1
    assert batch.rejected[0].index == 1 and batch.rejected[0].reason == InvalidReason.WRONG_LENGTH


def test_an_invalid_first_record_does_not_fix_the_feature_length():
    decoder = RecordDecoder(BINARY)
    decoder.decode([b'{"features": [1, 2], "label": "maybe"}', b'{"features": [1, 2, 3], "label": 1}'])
    assert decoder.features == FeatureSpec(3)


def test_dict_features_follow_the_sorted_keys_of_the_first_record():
    decoder = RecordDecoder(BINARY)
    batch = decoder.decode(
        [b'{"features": {"b": 2, "a": 1}, "label": 1}', b'{"features": {"a": 5, "b": 6}, "label": 0}']
    )
    assert decoder.features == FeatureSpec(2, ("a", "b"))
    assert batch.features.tolist() == [[1.0, 2.0], [5.0, 6.0]]


def test_dict_features_follow_given_feature_names():
    decoder = RecordDecoder(BINARY, FeatureSpec(2, ("y", "x")))
    batch = decoder.decode([b'{"features": {"x": 1, "y": 2}, "label": 1}'])
    assert batch.features.tolist() == [[2.0, 1.0]]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, InvalidReason.EMPTY),
        (b"", InvalidReason.EMPTY),
        (b'{"features": [1, 2, 3], "label": 1, "pad": "' + b"x" * 300 + b'"}', InvalidReason.TOO_LARGE),
        (b"\xff\xfe\x00garbage", InvalidReason.NOT_UTF8),
        (b'{"features": [1, 2, 3], "label": 1', InvalidReason.BAD_JSON),
        (b"null", InvalidReason.NOT_AN_OBJECT),
        (b"[1, 2, 3]", InvalidReason.NOT_AN_OBJECT),
        (b'{"label": 1}', InvalidReason.MISSING_FEATURES),
        (b'{"features": null, "label": 1}', InvalidReason.MISSING_FEATURES),
        (b'{"features": "1,2,3", "label": 1}', InvalidReason.BAD_FEATURES),
        (b'{"features": [1, "2", 3], "label": 1}', InvalidReason.BAD_FEATURES),
        (b'{"features": [1, true, 3], "label": 1}', InvalidReason.BAD_FEATURES),
        (b'{"features": [[1], [2], [3]], "label": 1}', InvalidReason.BAD_FEATURES),
        (b'{"features": [1, 2], "label": 1}', InvalidReason.WRONG_LENGTH),
        (b'{"features": {"a": 1}, "label": 1}', InvalidReason.FEATURE_MISMATCH),
        (b'{"features": [1, NaN, 3], "label": 1}', InvalidReason.NON_FINITE),
        (b'{"features": [1, Infinity, 3], "label": 1}', InvalidReason.NON_FINITE),
        (b'{"features": [1, 1e999, 3], "label": 1}', InvalidReason.NON_FINITE),
        (b'{"features": [1, 2, 3]}', InvalidReason.MISSING_LABEL),
        (b'{"features": [1, 2, 3], "label": null}', InvalidReason.MISSING_LABEL),
        (b'{"features": [1, 2, 3], "label": 2}', InvalidReason.UNKNOWN_CLASS),
        (b'{"features": [1, 2, 3], "label": "yes"}', InvalidReason.UNKNOWN_CLASS),
        (b'{"features": [1, 2, 3], "label": [1]}', InvalidReason.BAD_LABEL),
        (b'{"features": [1, 2, 3], "label": 1, "weight": -1}', InvalidReason.BAD_WEIGHT),
        (b'{"features": [1, 2, 3], "label": 1, "weight": "heavy"}', InvalidReason.BAD_WEIGHT),
        (b"[" * 100_000 + b"]" * 100_000, InvalidReason.TOO_LARGE),
    ],
)
def test_invalid_records_are_rejected_with_their_reason(value, reason):
    batch = decode_one(value)
    assert len(batch) == 0
    assert [r.reason for r in batch.rejected] == [reason]


def test_deeply_nested_junk_is_bad_json_or_bad_features_never_a_crash():
    value = b'{"features": ' + b"[" * 5000 + b"]" * 5000 + b', "label": 1}'
    batch = RecordDecoder(BINARY, FeatureSpec(3), max_bytes=1_000_000).decode([value])
    assert [r.reason for r in batch.rejected] in ([InvalidReason.BAD_JSON], [InvalidReason.BAD_FEATURES])


@pytest.mark.parametrize(
    ("labels", "value", "expected"),
    [
        (LabelSpec.create("regression"), -2.5, -2.5),
        (LabelSpec.create("binary"), True, 1),
        (LabelSpec.create("binary"), 0, 0),
        (LabelSpec.create("binary", ("no", "yes")), "yes", 1),
        (LabelSpec.create("multiclass", num_classes=4), 3, 3),
        (LabelSpec.create("multiclass", num_classes=4), 2.0, 2),
        (LabelSpec.create("multiclass", ("a", "b", "c")), "c", 2),
        (LabelSpec.create("multiclass", ("a", "b", "c")), 1, 1),
    ],
)
def test_labels_map_to_the_tasks_targets(labels, value, expected):
    assert labels.value(value) == expected


@pytest.mark.parametrize(
    ("labels", "value", "reason"),
    [
        (LabelSpec.create("regression"), "3.0", InvalidReason.BAD_LABEL),
        (LabelSpec.create("regression"), True, InvalidReason.BAD_LABEL),
        (LabelSpec.create("binary"), 0.5, InvalidReason.BAD_LABEL),
        (LabelSpec.create("multiclass", num_classes=3), 3, InvalidReason.UNKNOWN_CLASS),
        (LabelSpec.create("multiclass", num_classes=3), -1, InvalidReason.UNKNOWN_CLASS),
        (LabelSpec.create("multiclass", ("a", "b")), "z", InvalidReason.UNKNOWN_CLASS),
        (LabelSpec.create("multiclass", num_classes=3), True, InvalidReason.BAD_LABEL),
    ],
)
def test_labels_that_do_not_fit_the_task_are_rejected(labels, value, reason):
    from streamlearn.errors import InvalidRecord

    with pytest.raises(InvalidRecord) as caught:
        labels.value(value)
    assert caught.value.reason == reason


def test_multiclass_labels_are_int64_class_indices():
    decoder = RecordDecoder(LabelSpec.create("multiclass", ("a", "b", "c")))
    batch = decoder.decode([b'{"features": [1], "label": "c"}', b'{"features": [2], "label": 0}'])
    assert batch.labels.dtype == np.int64 and batch.labels.tolist() == [2, 0]


def test_specs_round_trip_through_dicts():
    spec = FeatureSpec(2, ("a", "b"))
    assert FeatureSpec.from_dict(spec.to_dict()) == spec
    labels = LabelSpec.create("multiclass", ("x", "y", "z"))
    assert LabelSpec.from_dict(labels.to_dict()) == labels


def test_a_given_length_takes_its_names_from_the_first_dict_record():
    decoder = RecordDecoder(BINARY, FeatureSpec(2))
    batch = decoder.decode(
        [b'{"features": {"z": 1, "a": 2}, "label": 1}', b'{"features": {"a": 3, "z": 4}, "label": 0}']
    )
    assert decoder.features == FeatureSpec(2, ("a", "z"))
    assert batch.features.tolist() == [[2.0, 1.0], [3.0, 4.0]]


def test_a_given_length_still_rejects_dicts_of_another_size():
    decoder = RecordDecoder(BINARY, FeatureSpec(3))
    batch = decoder.decode([b'{"features": {"a": 1}, "label": 1}'])
    assert [r.reason for r in batch.rejected] == [InvalidReason.FEATURE_MISMATCH]
    assert not decoder.fixed


HUGE = "9" * 400  # a JSON integer no float can hold: Python's json gives an int, isfinite overflows


@pytest.mark.parametrize(
    ("labels", "value", "reason"),
    [
        (BINARY, f'{{"features": [1, {HUGE}, 3], "label": 1}}', InvalidReason.NON_FINITE),
        (BINARY, f'{{"features": [1, -{HUGE}, 3], "label": 1}}', InvalidReason.NON_FINITE),
        (BINARY, f'{{"features": [1, 2, 3], "label": {HUGE}}}', InvalidReason.NON_FINITE),
        (
            LabelSpec.create("regression"),
            f'{{"features": [1, 2, 3], "label": {HUGE}}}',
            InvalidReason.NON_FINITE,
        ),
        (
            LabelSpec.create("multiclass", num_classes=3),
            f'{{"features": [1, 2, 3], "label": {HUGE}}}',
            InvalidReason.NON_FINITE,
        ),
        (BINARY, f'{{"features": [1, 2, 3], "label": 1, "weight": {HUGE}}}', InvalidReason.BAD_WEIGHT),
        (BINARY, '{"features": [1, 1e308, 3], "label": 1}', InvalidReason.NON_FINITE),
        (BINARY, '{"features": [1, 3.5e38, 3], "label": 1}', InvalidReason.NON_FINITE),
        (BINARY, '{"features": [1, -3.5e38, 3], "label": 1}', InvalidReason.NON_FINITE),
        (LabelSpec.create("regression"), '{"features": [1, 2, 3], "label": 1e300}', InvalidReason.NON_FINITE),
        (BINARY, '{"features": [1, 2, 3], "label": 1, "weight": 1e39}', InvalidReason.BAD_WEIGHT),
    ],
)
def test_numbers_beyond_float32_are_rejected_never_raised(labels, value, reason):
    batch = RecordDecoder(labels, THREE, max_bytes=10_000).decode([value.encode()])
    assert [r.reason for r in batch.rejected] == [reason]


def test_edge_numbers_within_float32_are_learned():
    values = [
        b'{"features": [-0.0, 5e-324, 3.4e38], "label": 1}',
        b'{"features": [1e-45, -3.4e38, 0], "label": 0}',
    ]
    batch = RecordDecoder(BINARY, THREE).decode(values)
    assert batch.rejected == []
    assert np.isfinite(batch.features).all()
    assert batch.features[0, 2] == np.float32(3.4e38)


def test_a_key_given_twice_takes_its_last_value():
    batch = RecordDecoder(BINARY, THREE).decode(
        [b'{"features": [9, 9, 9], "label": 0, "features": [1, 2, 3], "label": 1}']
    )
    assert batch.features.tolist() == [[1.0, 2.0, 3.0]]
    assert batch.labels.tolist() == [1.0]


# -- the record contract under arbitrary input (property-based) ------------------------------------


class _Pairs(list):
    """A JSON object written pair by pair, duplicates kept."""


JSON_NUMBERS = st.one_of(
    st.integers(min_value=-(10**500), max_value=10**500),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e-300, max_value=1e-300),  # subnormals and signed zeros
    st.sampled_from([1e308, -1e308, 3.4e38, 3.5e38, 2**63, -(2**63) - 1, 2**64]),
)
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.text(max_size=8), JSON_NUMBERS)
# Objects are lists of pairs so that a key can come twice, as it can on the wire.
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.lists(st.tuples(st.sampled_from(["a", "b", "c", "features", "label"]), inner), max_size=5).map(
            _Pairs
        ),
    ),
    max_leaves=20,
)


def _dump(value) -> str:
    """JSON text as a hostile producer may write it: NaN tokens, huge integers, duplicate keys."""
    if isinstance(value, _Pairs):
        return "{" + ",".join(f"{json.dumps(k)}:{_dump(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    if isinstance(value, float):
        return (
            "NaN"
            if math.isnan(value)
            else ("Infinity" if value > 0 else "-Infinity")
            if math.isinf(value)
            else repr(value)
        )
    return json.dumps(value) if not isinstance(value, int) or isinstance(value, bool) else str(value)


FEATURES = st.one_of(
    st.lists(JSON_NUMBERS, min_size=3, max_size=3),
    st.lists(st.tuples(st.sampled_from(["x", "y", "z"]), JSON_NUMBERS), min_size=3, max_size=4).map(_Pairs),
    JSON_VALUES,
)
RECORDS = st.one_of(
    st.tuples(FEATURES, JSON_VALUES, st.one_of(st.none(), JSON_NUMBERS, JSON_VALUES)).map(
        lambda fields: (
            "{"
            + f'"features":{_dump(fields[0])},"label":{_dump(fields[1])}'
            + ("" if fields[2] is None else f',"weight":{_dump(fields[2])}')
            + "}"
        )
    ),
    JSON_VALUES.map(_dump),
).map(str.encode)
VALUES = st.one_of(RECORDS, st.binary(max_size=64), st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n))


@pytest.mark.parametrize(
    "labels",
    [BINARY, LabelSpec.create("regression"), LabelSpec.create("multiclass", ("0", "a", "b"))],
    ids=["binary", "regression", "multiclass"],
)
@pytest.mark.parametrize(
    "features", [THREE, None, FeatureSpec(3, ("x", "y", "z"))], ids=["list", "inferred", "named"]
)
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(st.one_of(VALUES, st.none()), min_size=1, max_size=8))
def test_any_bytes_decode_to_finite_rows_or_a_reason_never_an_exception(labels, features, values):
    batch = RecordDecoder(labels, features, max_bytes=20_000).decode(values)

    assert len(batch) + len(batch.rejected) == len(values)
    assert sorted(r.index for r in batch.rejected) == sorted({r.index for r in batch.rejected})
    assert all(isinstance(r.reason, InvalidReason) and r.detail for r in batch.rejected)
    assert batch.features.dtype == np.float32 and batch.features.shape[0] == len(batch)
    assert np.isfinite(batch.features).all() and np.isfinite(batch.weights).all()
    assert np.isfinite(batch.labels.astype(np.float64)).all()


# -- the batch path and the exact path agree ----------------------------------------------------

NEAR_VALID = st.tuples(
    st.one_of(
        st.lists(JSON_NUMBERS, min_size=2, max_size=4),
        st.lists(st.tuples(st.sampled_from(["x", "y", "z", "w"]), JSON_NUMBERS), min_size=2, max_size=4).map(
            _Pairs
        ),
    ),
    st.one_of(
        st.sampled_from([0, 1, 2, 3, -1, True, False, "a", "b", "0", "c", 1.0, 0.5, None]), JSON_NUMBERS
    ),
    st.one_of(st.none(), JSON_NUMBERS, st.sampled_from([0, 0.0, -0.0, 2.5, True, "1"])),
    # what a producer may put in fields the record contract ignores
    st.one_of(
        JSON_VALUES.map(_dump).map(str.encode),
        st.sampled_from([b'"\xff"', b'"\\ud800"', b"9" * 5000, b"-" + b"9" * 5000, b"1e999", b"NaN"]),
        st.sampled_from([10, 600, 1100, 3000]).map(lambda n: b"[" * n + b"]" * n),
        st.binary(max_size=6).map(lambda junk: b'"' + junk + b'"'),
    ),
).map(
    lambda f: (
        b"{"
        + f'"features":{_dump(f[0])},"label":{_dump(f[1])}'.encode()
        + (b"" if f[2] is None else f',"weight":{_dump(f[2])}'.encode())
        + b',"ts":1,"id":"r","extra":'
        + f[3]
        + b"}"
    )
)


@pytest.mark.parametrize(
    "labels",
    [BINARY, LabelSpec.create("binary", ("a", "b")), LabelSpec.create("regression"),
     LabelSpec.create("multiclass", ("0", "a", "b"))],
    ids=["binary", "binary-named", "regression", "multiclass"],
)  # fmt: skip
@pytest.mark.parametrize("features", [THREE, FeatureSpec(3, ("x", "y", "z"))], ids=["list", "named"])
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(NEAR_VALID, min_size=1, max_size=4))
def test_the_batch_path_accepts_only_what_the_exact_path_accepts_and_reads_it_alike(labels, features, values):
    decoder = RecordDecoder(labels, features)
    fast, exact = decoder._decode_fast(values), decoder._decode_exact(values)

    if fast is not None:  # the batch path took the batch: every record is valid and read the same
        assert exact.rejected == []
        for a, b in (
            (fast.features, exact.features),
            (fast.labels, exact.labels),
            (fast.weights, exact.weights),
        ):
            assert a.dtype == b.dtype and np.array_equal(a, b)


def test_the_batch_path_takes_every_common_spelling_of_a_valid_record():
    spellings = [
        (BINARY, "1"),
        (BINARY, "true"),
        (LabelSpec.create("binary", ("a", "b")), '"b"'),
        (LabelSpec.create("regression"), "-2.5e3"),
        (LabelSpec.create("multiclass", num_classes=4), "3"),
    ]
    for labels, label in spellings:
        for features in (THREE, FeatureSpec(3, ("x", "y", "z"))):
            row = "[1, 2.5, -3e9]" if not features.names else '{"z": -3e9, "x": 1, "y": 2.5}'
            value = f'{{"features": {row}, "label": {label}, "weight": 2, "ts": 5}}'.encode()

            batch = RecordDecoder(labels, features)._decode_fast([value, value])

            assert batch is not None, (labels, label, features)
            assert batch.features.tolist() == [[1.0, 2.5, -3e9]] * 2 and batch.weights.tolist() == [2.0] * 2


def test_one_bad_record_sends_its_batch_through_the_per_record_path_with_exact_reasons():
    values = [b'{"features": [1, 2, 3], "label": 1}', b'{"features": [1, true, 3], "label": 0}',
              b'{"features": [1, 2, 3], "label": 7}', b'{"features": [1, 2], "label": 0}']  # fmt: skip

    batch = RecordDecoder(BINARY, THREE).decode(values)

    assert len(batch) == 1
    assert [(r.index, r.reason) for r in batch.rejected] == [
        (1, InvalidReason.BAD_FEATURES), (2, InvalidReason.UNKNOWN_CLASS), (3, InvalidReason.WRONG_LENGTH)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "extra",
    [
        b'"\xff"',
        b'"\xed\xa0\x80"',
        b'"\\ud800"',
        b"9" * 5000,
        b"-" + b"9" * 5000,
        b"1e999",
        b"[" * 3000 + b"]" * 3000,
    ],
    ids=["not-utf8", "surrogate-bytes", "surrogate-escape", "huge-int", "huge-negative", "inf", "deep"],
)
def test_a_field_the_contract_ignores_gets_the_same_verdict_on_both_paths(extra):
    value = b'{"features": [1, 2, 3], "label": 1, "extra": ' + extra + b"}"
    decoder = RecordDecoder(BINARY, THREE)

    fast, exact = decoder._decode_fast([value, value]), decoder._decode_exact([value, value])

    assert fast is None or (exact.rejected == [] and len(fast) == 2), exact.rejected
