"""Records that used to stop the trainer for good: each is now dead-lettered and learning goes on."""

import hashlib
import itertools

import orjson
from confluent_kafka import Producer

from streamlearn import faults
from streamlearn.dev.streams import records
from streamlearn.snapshots import LocalSnapshotStore
from streamlearn.train.dlq import (
    H_MESSAGE,
    H_OMITTED,
    H_REASON,
    H_VALUE_BYTES,
    H_VALUE_SHA256,
    header,
    source_of,
)

from ..conftest import wait_for
from .conftest import read_topic
from .test_delivery import offsets_done

HUGE = b"9" * 400
TWO_MB = b'{"features": [1, 2, 3], "label": 1, "pad": "' + b"x" * 2_000_000 + b'"}'
NEARLY_1MB_INVALID = b'{"features": [1, 2, 3], "label": 1, "pad": "' + b"x" * (999_950 - 44)  # never closed
POISON: dict[str, tuple[bytes, str]] = {
    "huge integer feature": (b'{"features": [1, ' + HUGE + b', 3], "label": 1}', "non_finite"),
    "huge integer label": (b'{"features": [1, 2, 3], "label": ' + HUGE + b"}", "non_finite"),
    "huge integer weight": (b'{"features": [1, 2, 3], "label": 1, "weight": ' + HUGE + b"}", "bad_weight"),
    "beyond float32": (b'{"features": [1, 1e308, 3], "label": 0}', "non_finite"),
    "2 MB": (TWO_MB, "too_large"),
    "999,950 bytes, invalid": (NEARLY_1MB_INVALID, "bad_json"),
    "makes our decoder raise": (b'{"features": [1, 2, 3], "label": 1, "id": "raise-here"}', "internal_error"),
}


def test_poison_records_are_dead_lettered_and_learning_goes_on(
    bootstrap, make_topic, start_trainer, tmp_path, monkeypatch
):
    monkeypatch.setenv("STREAMLEARN_RAISE_ON", "raise-here")  # the decoder raises, as a bug of ours would
    faults._marker.cache_clear()
    topic = make_topic()
    valid = [orjson.dumps(r) for r in itertools.islice(records("sea", seed=4), 60)]
    values = valid[:30] + [value for value, _ in POISON.values()] + valid[30:]
    assert len(NEARLY_1MB_INVALID) == 999_950
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 3_000_000})
    for i, value in enumerate(values):
        producer.produce(topic, value, key=f"key-{i}".encode(), headers=[("trace", f"t{i}".encode())])
    assert producer.flush(30) == 0

    try:
        trainer = start_trainer(topic, task="binary", n_features=3, batch_size=32)  # default record limit
        store = LocalSnapshotStore(tmp_path / "snapshots")
        snapshot = wait_for(lambda: offsets_done(store, topic, {0: len(values)}), 60, what="every offset")
    finally:
        faults._marker.cache_clear()

    assert trainer.thread.is_alive() and trainer.error is None
    assert snapshot.meta.records_trained == len(valid)
    letters = read_topic(bootstrap, f"{topic}.dlq")
    assert [source_of(letter) for letter in letters] == [(topic, 0, 30 + i) for i in range(len(POISON))]
    for letter, (name, (value, reason)) in zip(letters, POISON.items(), strict=True):
        assert header(letter.headers(), H_REASON) == reason, name
        if name == "2 MB":  # too large for any dead-letter topic at the defaults: kept as a fingerprint
            assert letter.value() is None
            assert header(letter.headers(), H_OMITTED) == "value,headers"
            assert header(letter.headers(), H_VALUE_BYTES) == str(len(value))
            assert header(letter.headers(), H_VALUE_SHA256) == hashlib.sha256(value).hexdigest()
        else:
            assert letter.value() == value, name
            assert header(letter.headers(), "trace") is not None, name
    assert header(letters[-1].headers(), H_MESSAGE).startswith("RuntimeError: injected fault")
    assert trainer.metric("streamlearn_records_invalid_total", {"reason": "internal_error"}) == 1
