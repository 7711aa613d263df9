"""The synthetic streams: seeded, contract-following, and drifting where they say."""

import itertools

import numpy as np
import orjson
import pytest

from streamlearn.decoding import RecordDecoder
from streamlearn.dev.streams import STREAMS, records, stream_info
from streamlearn.records import LabelSpec


@pytest.mark.parametrize("name", list(STREAMS))
def test_every_record_follows_the_record_contract(name):
    info = stream_info(name)
    labels = LabelSpec.create(info.task, info.classes, len(info.classes) or None)
    decoder = RecordDecoder(labels)
    values = [orjson.dumps(r) for r in itertools.islice(records(name, seed=1), 500)]
    batch = decoder.decode(values)
    assert batch.rejected == [] and len(batch) == 500
    assert decoder.features.n_features == info.n_features


@pytest.mark.parametrize("name", list(STREAMS))
def test_the_same_seed_gives_the_same_stream(name):
    first = [(r["features"], r["label"]) for r in itertools.islice(records(name, seed=7), 100)]
    second = [(r["features"], r["label"]) for r in itertools.islice(records(name, seed=7), 100)]
    other = [(r["features"], r["label"]) for r in itertools.islice(records(name, seed=8), 100)]
    assert first == second and first != other


def test_sea_changes_its_concept_at_each_drift_point():
    stream = list(itertools.islice(records("sea", seed=0, drift_every=1000), 3000))

    def agreement(chunk, theta):
        return np.mean([(r["features"][0] + r["features"][1] <= theta) == r["label"] for r in chunk])

    assert agreement(stream[:1000], 8.0) == 1.0
    assert agreement(stream[1000:2000], 9.0) == 1.0 and agreement(stream[1000:2000], 8.0) < 0.95
    assert agreement(stream[2000:3000], 7.0) == 1.0
