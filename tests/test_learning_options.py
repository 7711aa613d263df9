"""The learning toolbox: step policy, schedules, losses, class weights, and their state in snapshots."""

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch.nn import functional

from streamlearn.config import TrainSettings
from streamlearn.models import ModelSpec, build_model
from streamlearn.records import FeatureSpec, LabelSpec
from streamlearn.train.losses import Loss, LossSettings
from streamlearn.train.optim import Schedule

from .conftest import concept_batch


@pytest.mark.parametrize(
    ("policy", "pressed", "steps"),
    [("auto", False, 8), ("auto", True, 1), ("small", True, 8), ("large", False, 1)],
)
def test_the_step_policy_takes_small_steps_only_while_no_batch_waits(make_trainer, policy, pressed, steps):
    trainer = make_trainer("binary", policy=policy, sub_batch=32)
    result = trainer.step(concept_batch(256), pressed=lambda: pressed)
    assert result.steps == steps and result.records == 256 and trainer.steps == steps


def test_auto_takes_the_rest_of_a_batch_in_one_step_once_the_next_one_waits(make_trainer):
    trainer = make_trainer("binary", policy="auto", sub_batch=32)
    asked = []

    def pressed() -> bool:  # the next batch arrives while the third step is taken
        asked.append(True)
        return len(asked) > 3

    assert trainer.step(concept_batch(256), pressed).steps == 4  # three of 32, then 160 at once


def test_small_steps_learn_more_from_the_same_records_than_one_step(make_trainer):
    def accuracy(policy: str) -> float:
        trainer = make_trainer("binary", arch="mlp", lr=0.01, policy=policy)
        for seed in range(12):
            trainer.step(concept_batch(256, seed=seed))
        return trainer.scores.faded_accuracy[1000]

    assert accuracy("small") > accuracy("large") + 0.02


def test_a_failing_step_keeps_the_steps_before_it_and_nothing_of_its_own(make_trainer, monkeypatch):
    trainer = make_trainer("binary", policy="small", sub_batch=32)
    calls = []
    per_record = trainer.loss.per_record

    def fails_third(scores, labels):
        calls.append(len(labels))
        if len(calls) == 3:
            return per_record(scores, labels) * float("inf")
        return per_record(scores, labels)

    monkeypatch.setattr(trainer.loss, "per_record", fails_third)
    batch = concept_batch(256)
    result = trainer.step(batch)
    assert (result.records, result.steps, result.learned) == (64, 2, False)
    assert trainer.learned == 64 and trainer.model.normalizer.count.item() == 64
    assert trainer.scores.records == 64  # only what was learned is scored
    assert len(result.errors) == 64


@pytest.mark.parametrize(
    ("name", "at", "factor"),
    [
        ("constant", 123_456, 1.0),
        ("inverse-sqrt", 0, 1.0),
        ("inverse-sqrt", 30_000, 0.5),
        ("cyclic", 0, 0.1),
        ("cyclic", 5_000, 0.55),
        ("cyclic", 10_000, 1.0),
        ("cyclic", 20_000, 0.1),
        ("cosine-restarts", 0, 1.0),
        ("cosine-restarts", 5_000, 0.55),
        ("cosine-restarts", 9_999, 0.1),
        ("cosine-restarts", 10_000, 1.0),
    ],
)
def test_schedules_give_the_documented_factors(name, at, factor):
    assert Schedule(name, period=10_000, floor=0.1).factor(at) == pytest.approx(factor, abs=1e-6)


def test_the_trainer_steps_at_the_scheduled_rate_counted_in_records(make_trainer):
    trainer = make_trainer(
        "binary", lr=0.1, policy="large", sub_batch=64, schedule=Schedule("inverse-sqrt", period=64)
    )
    rates = []
    for seed in range(4):
        trainer.step(concept_batch(64, seed=seed))
        rates.append(trainer.optimizer.param_groups[0]["lr"])
    # each step is taken at the rate of the records learned before it: 0, 64, 128, 192
    assert rates == pytest.approx([0.1 / math.sqrt(1 + k) for k in range(4)])


@pytest.mark.parametrize(("sub_batch", "factor"), [(256, 1.0), (64, 2.0), (8, 4.0)])
def test_a_larger_step_takes_a_square_root_scaled_rate_up_to_four_times(make_trainer, sub_batch, factor):
    trainer = make_trainer("binary", lr=0.01, policy="large", sub_batch=sub_batch)
    trainer.step(concept_batch(256))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * factor)


def test_focal_loss_and_label_smoothing_follow_their_formulas():
    scores = torch.tensor([[2.0], [-1.0], [0.5]])
    labels = torch.tensor([1.0, 1.0, 0.0])
    focal = Loss("binary", 1, LossSettings(loss="focal", focal_gamma=2.0), torch.device("cpu"))
    p = torch.sigmoid(scores.squeeze(1))
    p_true = torch.where(labels == 1, p, 1 - p)
    assert torch.allclose(focal.per_record(scores, labels), -((1 - p_true) ** 2) * torch.log(p_true))

    logits = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.3, 0.1]])
    targets = torch.tensor([0, 2])
    smooth = Loss("multiclass", 3, LossSettings(label_smoothing=0.3), torch.device("cpu"))
    log_p = functional.log_softmax(logits, dim=1)
    wanted = torch.full((2, 3), 0.1)
    wanted[torch.arange(2), targets] += 0.7
    assert torch.allclose(smooth.per_record(logits, targets.float()), -(wanted * log_p).sum(1))

    huber = Loss("regression", 1, LossSettings(loss="huber", huber_delta=1.0), torch.device("cpu"))
    assert huber.per_record(torch.tensor([[0.5], [3.0]]), torch.zeros(2)).tolist() == [0.125, 2.5]


def test_balanced_weights_give_every_class_the_same_total_weight():
    loss = Loss("binary", 1, LossSettings(class_weighting="balanced"), torch.device("cpu"))
    labels = torch.tensor([1.0] * 10 + [0.0] * 90)
    weights = loss.weights(labels, torch.ones(100))
    assert weights[labels == 1].sum().item() == pytest.approx(weights[labels == 0].sum().item())
    assert weights[0].item() == pytest.approx(5.0)  # 1 / (2 * 0.1)
    assert loss.class_counts.sum().item() == 0  # counted only once learned
    loss.learned(labels)
    assert loss.class_counts.tolist() == [90.0, 10.0]


def test_every_option_survives_a_snapshot_and_continues_exactly(make_trainer):
    options = dict(
        policy="small",
        sub_batch=16,
        schedule=Schedule("cyclic", period=300),
        l1=1e-4,
    )

    def trainer():
        loss = Loss("binary", 1, LossSettings(loss="focal", class_weighting="balanced"), torch.device("cpu"))
        return make_trainer("binary", arch="mlp", loss=loss, **options)

    batches = [concept_batch(128, seed=seed) for seed in range(6)]
    original = trainer()
    for batch in batches[:3]:
        original.step(batch)
    original.respond_to_drift("boost-lr")
    tensors, meta = original.state()
    resumed = trainer()
    resumed.restore(tensors, meta)
    assert (resumed.learned, resumed.steps, resumed.boost_left) == (384, 24, 2000)
    assert torch.equal(resumed.loss.class_counts, original.loss.class_counts)
    for batch in batches[3:]:
        assert original.step(batch).loss == resumed.step(batch).loss
    for a, b in zip(original.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_dropout_is_part_of_the_mlp_and_off_while_testing():
    spec = ModelSpec(LabelSpec.create("binary"), FeatureSpec(3), "mlp", {"hidden": [16], "dropout": 0.5})
    model = build_model(spec)
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    model.eval()
    x = torch.randn(8, 3)
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"task": "regression", "loss": "focal"}, "does not fit --task regression"),
        ({"task": "binary", "label_smoothing": 0.1}, "multiclass cross-entropy only"),
        ({"task": "binary", "nesterov": True}, "--nesterov needs"),
        ({"task": "regression", "class_weighting": "balanced"}, "needs classes"),
    ],
)
def test_options_that_do_not_fit_the_task_are_refused(flags, message):
    with pytest.raises(ValidationError, match=message):
        TrainSettings(**flags)


def learner_for(tmp_path, **settings):
    from prometheus_client import CollectorRegistry

    from streamlearn.metrics import TrainerMetrics
    from streamlearn.train.learner import Learner
    from streamlearn.train.telemetry import Telemetry

    s = TrainSettings(task="binary", snapshot_dir=str(tmp_path), metrics_port=0, **settings)
    labels = LabelSpec.create("binary")
    return Learner(s, labels, torch.device("cpu"), Telemetry(TrainerMetrics(CollectorRegistry())))


def regions(n: int, flipped: bool, seed: int):
    """Two concepts on disjoint regions: x0 < 0 labels by x1 > 0; x0 > 0 by x1 < 0."""
    from streamlearn.decoding import DecodedBatch

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    x[:, 0] = np.abs(x[:, 0]) * (1 if flipped else -1)
    y = ((x[:, 1] > 0) != flipped).astype(np.float32)
    return DecodedBatch(x, y, np.ones(n, np.float32))


def test_replay_reduces_forgetting_of_a_concept_that_recurs(tmp_path):
    def accuracy_on_first_concept_after_second(**options) -> float:
        learner = learner_for(tmp_path, arch="mlp", hidden=(32,), step_policy="small", **options)
        features = FeatureSpec(3)
        for seed in range(20):
            learner.learn(regions(128, flipped=False, seed=seed), features)
        for seed in range(20, 60):
            learner.learn(regions(128, flipped=True, seed=seed), features)
        held_out = regions(2000, flipped=False, seed=99)
        predicted = learner.trainer.model.predict_batch(torch.from_numpy(held_out.features)).values
        return float((predicted.numpy() == held_out.labels).mean())

    without = accuracy_on_first_concept_after_second()
    with_replay = accuracy_on_first_concept_after_second(replay_records=2000, replay_ratio=1.0)
    assert with_replay > without + 0.1, (without, with_replay)


def test_the_reservoir_is_a_uniform_sample_and_resumes_exactly():
    from streamlearn.train.replay import Reservoir

    reservoir = Reservoir(capacity=1000, ratio=0.5, seed=3)
    values = np.arange(20_000, dtype=np.float32)
    for start in range(0, 20_000, 250):
        part = values[start : start + 250]
        reservoir.add(part[:, None], part, np.ones_like(part))
    kept = reservoir.labels
    assert reservoir.size == 1000 and len(np.unique(kept)) == 1000
    assert abs(kept.mean() - 10_000) < 600  # the mean of a uniform sample (sd about 183)
    assert abs((kept < 10_000).mean() - 0.5) < 0.06
    tensors, meta = reservoir.state()
    resumed = Reservoir(capacity=1000, ratio=0.5, seed=0)
    resumed.load_state(tensors, meta)
    assert np.array_equal(reservoir.sample(64)[1], resumed.sample(64)[1])
    assert reservoir.sample(64)[0].shape == (32, 1)


def snapshot_of(learner, tmp_path, name="source"):
    from streamlearn.snapshots import LocalSnapshotStore

    store = LocalSnapshotStore(tmp_path)
    tensors, content = learner.content({})
    store.save(name, tensors, content)
    return f"{tmp_path}/{name}"


def test_a_warm_start_begins_at_the_source_models_accuracy_and_records_its_origin(tmp_path):
    features = FeatureSpec(3)
    source = learner_for(tmp_path / "a", arch="mlp")
    for seed in range(30):
        source.learn(concept_batch(128, seed=seed), features)
    location = snapshot_of(source, tmp_path / "a")

    started = learner_for(tmp_path / "b", arch="mlp", init_from=location)
    fresh = learner_for(tmp_path / "c", arch="mlp")
    batch = concept_batch(512, seed=1000)
    started.learn(batch, features)
    fresh.learn(batch, features)
    assert started.trainer.scores.accuracy > 0.9 > fresh.trainer.scores.accuracy
    _, content = started.content({})
    assert content.origin["snapshot"] == location and content.origin["version"] == 1


def test_frozen_layers_do_not_move_and_the_rest_learns(tmp_path):
    learner = learner_for(tmp_path, arch="mlp", hidden=(8, 8), freeze=("layers.0",))
    learner.learn(concept_batch(64), FeatureSpec(3))
    before = {k: v.clone() for k, v in learner.trainer.model.state_dict().items()}
    learner.learn(concept_batch(256, seed=1), FeatureSpec(3))
    after = learner.trainer.model.state_dict()
    assert torch.equal(before["layers.0.weight"], after["layers.0.weight"])
    assert torch.equal(before["layers.0.bias"], after["layers.0.bias"])
    assert not torch.equal(before["layers.2.weight"], after["layers.2.weight"])


def test_a_warm_start_of_another_shape_or_an_unknown_layer_is_a_one_line_error(tmp_path):
    from streamlearn.errors import ConfigError

    source = learner_for(tmp_path / "a", arch="mlp", hidden=(4,))
    source.learn(concept_batch(64), FeatureSpec(3))
    location = snapshot_of(source, tmp_path / "a")
    with pytest.raises(ConfigError, match=r"--init-from .*do not fit"):
        learner_for(tmp_path / "b", arch="mlp", init_from=location).learn(concept_batch(64), FeatureSpec(3))
    with pytest.raises(ConfigError, match=r"--freeze layers\.9: no such layer; the model has layers\.0"):
        learner_for(tmp_path / "c", arch="mlp", freeze=("layers.9",)).learn(concept_batch(64), FeatureSpec(3))


def test_a_reservoir_resumed_with_more_room_fills_it_before_replacing_and_never_replays_empty_slots():
    from streamlearn.train.replay import Reservoir

    small = Reservoir(capacity=100, ratio=1.0, seed=1)
    values = np.arange(1, 501, dtype=np.float32)  # no zero: an empty slot would show as 0
    small.add(values[:, None], values, np.ones_like(values))
    larger = Reservoir(capacity=300, ratio=1.0, seed=1)
    larger.load_state(*small.state())
    assert larger.size == 100
    more = np.arange(501, 601, dtype=np.float32)
    larger.add(more[:, None], more, np.ones_like(more))
    assert larger.size == 200 and set(more) <= set(larger.labels[:200])
    assert (larger.sample(5000)[1] > 0).all()


def test_dropout_draws_resume_exactly_after_a_restart():
    from streamlearn.train.optim import OptimizerSettings, make_optimizer
    from streamlearn.train.trainer import Trainer

    def trainer():
        spec = ModelSpec(LabelSpec.create("binary"), FeatureSpec(3), "mlp", {"hidden": [16], "dropout": 0.5})
        model = build_model(spec)
        optimizer = make_optimizer(model, OptimizerSettings())
        return Trainer(model, optimizer, torch.device("cpu"), policy="small", sub_batch=16)

    batches = [concept_batch(64, seed=seed) for seed in range(4)]
    original = trainer()
    for batch in batches[:2]:
        original.step(batch)
    tensors, meta = original.state()
    for batch in batches[2:]:  # the uninterrupted run
        original.step(batch)
    torch.manual_seed(12345)  # a new process: the generator is wherever it is
    resumed = trainer()
    resumed.restore(tensors, meta)
    for batch in batches[2:]:
        resumed.step(batch)
    for a, b in zip(original.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_snapshot_learned_with_other_frozen_layers_is_refused(tmp_path):
    from streamlearn.errors import SnapshotMismatch

    learner = learner_for(tmp_path, arch="mlp", hidden=(8, 8), freeze=("layers.2",))
    learner.learn(concept_batch(64), FeatureSpec(3))
    tensors, meta = learner.trainer.state()
    other = learner_for(tmp_path, arch="mlp", hidden=(8, 8), freeze=("layers.0",))
    other.learn(concept_batch(8), FeatureSpec(3))
    with pytest.raises(SnapshotMismatch, match="keep --freeze as it was"):
        other.trainer.restore(tensors, meta)


def test_freezing_everything_is_a_one_line_error(tmp_path):
    from streamlearn.errors import ConfigError

    learner = learner_for(tmp_path, arch="linear", freeze=("linear",))
    with pytest.raises(ConfigError, match="nothing would be left to learn"):
        learner.learn(concept_batch(8), FeatureSpec(3))


def test_a_warm_start_reads_a_snapshots_own_weights_file(tmp_path):
    source = learner_for(tmp_path / "a", arch="mlp")
    source.learn(concept_batch(256), FeatureSpec(3))
    location = snapshot_of(source, tmp_path / "a")
    weights = f"{location}/000000000001/weights.safetensors"
    started = learner_for(tmp_path / "b", arch="mlp", init_from=weights)
    started.learn(concept_batch(8), FeatureSpec(3))
    assert started.origin["file"] == weights and len(started.origin["sha256"]) == 64


def test_focal_loss_with_a_small_gamma_keeps_gradients_finite_for_confident_predictions():
    for task, scores, labels in (
        ("binary", torch.tensor([[40.0], [-40.0]], requires_grad=True), torch.tensor([1.0, 0.0])),
        ("multiclass", torch.tensor([[40.0, -40.0, 0.0]], requires_grad=True), torch.tensor([0.0])),
    ):
        loss = Loss(task, scores.shape[1], LossSettings(loss="focal", focal_gamma=0.5), torch.device("cpu"))
        loss.per_record(scores, labels).sum().backward()
        assert torch.isfinite(scores.grad).all(), task


def test_a_restart_detects_and_responds_to_drift_exactly_as_an_uninterrupted_run(tmp_path):
    from streamlearn.snapshots import LocalSnapshotStore

    def flipped(seed: int):
        batch = concept_batch(200, seed=seed)
        if seed >= 20:  # the concept inverts: a detection, and a boost, follow
            batch.labels[:] = 1 - batch.labels
        return batch

    features = FeatureSpec(3)
    settings = dict(arch="mlp", hidden=(16,), on_drift="boost-lr", replay_records=500, step_policy="small")
    original = learner_for(tmp_path / "a", **settings)
    store = LocalSnapshotStore(tmp_path / "store")
    for seed in range(23):  # 4,600 records: the detectors saw 3 chunks of 1,200; 1,000 wait
        original.learn(flipped(seed), features)
    tensors, content = original.content({})
    saved = store.save("m", tensors, content)
    for seed in range(23, 40):
        original.learn(flipped(seed), features)

    resumed = learner_for(tmp_path / "b", **settings)
    resumed.restore(store.load("m", saved.version), features)
    assert len(resumed.unwatched) == 1 and len(resumed.unwatched[0][1]) == 1000  # 6 batches since 3,600
    for seed in range(23, 40):
        resumed.learn(flipped(seed), features)
    assert [e["records_learned"] for e in original.events] == [e["records_learned"] for e in resumed.events]
    assert any(e["records_learned"] > 4600 for e in original.events)  # a detection after the restart
    for a, b in zip(
        original.trainer.model.state_dict().values(), resumed.trainer.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
