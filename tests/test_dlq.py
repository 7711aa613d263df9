"""Dead letters: what a letter holds when the record is too large to keep whole."""

import hashlib

from streamlearn.train.dlq import (
    H_OMITTED,
    H_REASON,
    H_TOPIC,
    H_VALUE_BYTES,
    H_VALUE_SHA256,
    MAX_KEPT_KEY_BYTES,
    Letter,
    header,
)


def test_a_letter_without_its_value_keeps_our_headers_and_the_values_fingerprint():
    value = b"x" * 2_000_000
    letter = Letter(b"key-1", value, [("trace", b"t1"), (H_TOPIC, b"events"), (H_REASON, b"too_large")])

    small = letter.without_value()

    assert small.value is None and small.key == b"key-1" and not small.whole
    assert header(small.headers, "trace") is None  # the original headers may be what was too large
    assert header(small.headers, H_TOPIC) == "events" and header(small.headers, H_REASON) == "too_large"
    assert header(small.headers, H_VALUE_BYTES) == "2000000"
    assert header(small.headers, H_VALUE_SHA256) == hashlib.sha256(value).hexdigest()
    assert header(small.headers, H_OMITTED) == "value,headers"


def test_a_key_too_large_to_keep_is_left_out_as_well():
    letter = Letter(b"k" * (MAX_KEPT_KEY_BYTES + 1), None, [(H_REASON, b"empty")])

    small = letter.without_value()

    assert small.key is None
    assert header(small.headers, H_OMITTED) == "value,key,headers"
    assert header(small.headers, H_VALUE_BYTES) == "0"
