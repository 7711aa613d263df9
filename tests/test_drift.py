"""Drift detectors at default settings, checked on streams with known drift points."""

import itertools
import json

import numpy as np
import orjson
import pytest

from streamlearn.decoding import RecordDecoder
from streamlearn.dev.streams import records
from streamlearn.models import ModelSpec, build_model
from streamlearn.records import LabelSpec
from streamlearn.train.drift import Adwin, DriftMonitor, PageHinkley
from streamlearn.train.optim import OptimizerSettings, make_optimizer
from streamlearn.train.trainer import Trainer, pick_device

BATCH = 256
DELAY_BOUND = 2 * BATCH  # records after an abrupt switch of the error rate 0.1 -> 0.4
STATIONARY = 500_000  # records of a stationary stream with no false alarm allowed


def batches(stream: np.ndarray):
    for start in range(0, len(stream), BATCH):
        yield start + BATCH, stream[start : start + BATCH]


@pytest.mark.parametrize("detector", [Adwin, PageHinkley])
@pytest.mark.parametrize("seed", range(5))
def test_an_abrupt_rise_in_errors_is_detected_within_the_bound(detector, seed):
    rng = np.random.default_rng(seed)
    stream = np.concatenate([rng.random(20_000) < 0.1, rng.random(5_000) < 0.4]).astype(float)
    det = detector()
    fired = [end for end, chunk in batches(stream) if det.update(chunk)]
    assert fired, "no detection"
    assert 20_000 < fired[0] <= 20_000 + DELAY_BOUND


@pytest.mark.parametrize("detector", [Adwin, PageHinkley])
def test_no_false_alarm_on_a_long_stationary_stream(detector):
    rng = np.random.default_rng(42)
    stream = (rng.random(STATIONARY) < 0.2).astype(float)
    det = detector()
    assert sum(det.update(chunk) for _, chunk in batches(stream)) == 0


def test_covariate_shift_is_reported_with_the_drifting_feature_on_top():
    rng = np.random.default_rng(0)
    monitor = DriftMonitor(["a", "b", "c"], "binary", window=1000)
    labels, errors = np.zeros(BATCH), np.zeros(BATCH)
    for _ in range(20):
        report = monitor.update(rng.normal(size=(BATCH, 3)), labels, errors)
    assert report.feature_psi_max is not None and report.feature_psi_max < 0.1 and not report.feature_drift
    shifted = []
    for _ in range(10):
        x = rng.normal(size=(BATCH, 3))
        x[:, 1] += 1.5
        shifted.append(monitor.update(x, labels, errors))
    detected = [r for r in shifted if r.feature_drift]
    assert detected and detected[0].top_features[0][0] == "b"
    assert monitor.detections["feature_psi"] == 1  # then the new distribution is the reference


def test_a_change_of_class_priors_is_label_drift():
    rng = np.random.default_rng(1)
    monitor = DriftMonitor(["x"], "multiclass", n_classes=3, window=1000)
    x, errors = np.zeros((BATCH, 1)), np.zeros(BATCH)
    for _ in range(10):
        assert not monitor.update(x, rng.integers(0, 3, BATCH), errors).label_drift
    reports = [monitor.update(x, rng.choice(3, BATCH, p=[0.8, 0.1, 0.1]), errors) for _ in range(10)]
    assert any(r.label_drift for r in reports)


def test_concept_drift_in_the_sea_stream_is_caught_after_the_switch_and_not_before():
    info_labels = LabelSpec.create("binary")
    decoder = RecordDecoder(info_labels)
    stream = [orjson.dumps(r) for r in itertools.islice(records("sea", seed=3, drift_every=10_000), 20_000)]
    trainer = None
    monitor = DriftMonitor(["x0", "x1", "x2"], "binary")
    detections = []
    for start in range(0, len(stream), BATCH):
        batch = decoder.decode(stream[start : start + BATCH])
        if trainer is None:
            model = build_model(ModelSpec(info_labels, decoder.features, "mlp", {"hidden": [32]}))
            trainer = Trainer(
                model, make_optimizer(model, OptimizerSettings("adam", 0.01)), pick_device("cpu")
            )
        result = trainer.step(batch)
        report = monitor.update(batch.features, batch.labels, result.errors)
        detections += [(start + BATCH, name) for name in report.concept]
    warm = 3_000  # the first concept is being learned until about here: a falling error is no drift
    assert not [d for d in detections if warm < d[0] <= 10_000], detections
    assert [d for d in detections if 10_000 < d[0] <= 10_000 + 2_000], detections


def _drift_monitor() -> DriftMonitor:
    slots = np.array([0, 0, 1])  # three category slots: two of feature "m", one of "t"
    return DriftMonitor(["a", "b"], "binary", window=400, categories=(("m", "t"), slots, 64))


def _drift_batch(rng: np.random.Generator, shift: float) -> tuple[np.ndarray, ...]:
    n = 50  # a histogram bins 100 records at once and warms up on 400: 17 batches leave 50 pending
    features = rng.normal(shift, 1.0, (n, 2))
    labels = (rng.random(n) < 0.3 + shift / 10).astype(np.float32)
    errors = (rng.random(n) < 0.2).astype(np.float32)
    categories = rng.integers(-1, 40 + int(10 * shift), (n, 3))
    return features, labels, errors, categories


def test_drift_state_restores_the_histograms_mid_window_and_detects_as_if_never_stopped() -> None:
    rng = np.random.default_rng(7)
    batches = [_drift_batch(rng, 0.0 if i < 15 else 2.0) for i in range(40)]
    first = _drift_monitor()
    for batch in batches[:17]:  # past the warm-up, with records pending in both histograms
        first.update(*batch)
    arrays, meta = first.state()
    assert {k for k in arrays if k.startswith(("features.", "categories."))} == {
        "features.edges", "features.reference", "features.recent", "features.pending",
        "categories.seen", "categories.unseen", "categories.rows", "categories.reference",
        "categories.recent", "categories.pending",
    }  # fmt: skip
    second = _drift_monitor()
    second.load_state({k: v.copy() for k, v in arrays.items()}, json.loads(json.dumps(meta)))
    for batch in batches[17:]:
        one, two = first.update(*batch), second.update(*batch)
        assert one == two
    assert first.detections == second.detections and first.detections.get("feature_psi", 0) > 0
    after_one, after_two = first.state()[0], second.state()[0]
    assert after_one.keys() == after_two.keys()
    assert all(np.array_equal(after_one[k], after_two[k]) for k in after_one)
