"""The learning toolbox: step policy, schedules, losses, class weights, and their state in snapshots."""

import math

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
    trainer = make_trainer("binary", lr=0.1, policy="large", schedule=Schedule("inverse-sqrt", period=64))
    rates = []
    for seed in range(4):
        trainer.step(concept_batch(64, seed=seed))
        rates.append(trainer.optimizer.param_groups[0]["lr"])
    # each step is taken at the rate of the records learned before it: 0, 64, 128, 192
    assert rates == pytest.approx([0.1 / math.sqrt(1 + k) for k in range(4)])


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
