"""Lockstep pieces without Kafka: the world from torchrun's environment, deterministic rounds,
and the split step: two gloo ranks hold identical weights, equal to one process's within float32."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from streamlearn.decoding import DecodedBatch
from streamlearn.errors import ConfigError
from streamlearn.models import build_model
from streamlearn.train.lockstep import Lockstep, World
from streamlearn.train.optim import OptimizerSettings, make_optimizer
from streamlearn.train.order import PartitionRounds
from streamlearn.train.trainer import Trainer

from .conftest import concept_batch, make_spec


class Msg:
    def __init__(self, partition: int, offset: int) -> None:
        self._p, self._o = partition, offset

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def value(self) -> bytes:
        return b"{}"


def test_the_world_comes_from_torchruns_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    world = World.from_env()
    assert (world.rank, world.size) == (1, 3) and world.owned(7) == [1, 4]
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ConfigError, match="impossible"):
        World.from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="integers"):
        World.from_env()
    for name in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name)
    assert World.from_env() == World(0, 1, 1)


def test_a_round_holds_the_same_records_whatever_order_they_arrive_in():
    def rounds(arrival: list[Msg]) -> list[list[tuple[int, int]]]:
        order = PartitionRounds[Msg](2)
        order.assigned([("t", 0), ("t", 2)])
        taken: list[list[tuple[int, int]]] = []
        for message in arrival:
            order.batches([message])
            ready, blocked = order.ready()
            for _ in range(min(ready, blocked if blocked is not None else ready)):
                taken.append([(m.partition(), m.offset()) for m in order.take()])
        order.reached_end(("t", 0), 4)
        order.reached_end(("t", 2), 3)
        assert order.ready() == (1, 1)  # partition 0 still holds a whole round
        taken.append([(m.partition(), m.offset()) for m in order.take()])
        assert order.ready() == (0, None)  # both at their end: this rank never holds a round back
        return taken

    messages = [Msg(0, o) for o in range(4)] + [Msg(2, o) for o in range(3)]
    expected = [[(0, 0), (0, 1), (2, 0), (2, 1)], [(0, 2), (0, 3)]]  # partition 2's tail waits for more
    assert rounds(messages) == expected
    assert rounds(messages[4:] + messages[:4]) == expected
    assert (
        rounds([m for pair in zip(messages[:3], messages[4:], strict=True) for m in pair] + [messages[3]])
        == expected
    )


def _model_and_trainer(reducer=None) -> Trainer:
    torch.manual_seed(0)
    model = build_model(make_spec(arch="mlp", n_features=4))
    return Trainer(model, make_optimizer(model, OptimizerSettings()), torch.device("cpu"), 1.0,
                   policy="small", sub_batch=5, reducer=reducer)  # fmt: skip


def _batch() -> DecodedBatch:
    batch = concept_batch(23, n_features=4)
    batch.weights[:] = np.random.default_rng(1).uniform(0.5, 2, 23)  # a weighted mean, not a plain one
    return batch


def _rank(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    lockstep = Lockstep(World(rank, 2, 2), 30, torch.device("cpu"))
    trainer = _model_and_trainer(lockstep.reducer)
    for _ in range(3):  # steps of 5: the last one (3 records) leaves a share of 1 and 2
        trainer.step(_batch())
    torch.save({k: v for k, v in trainer.model.state().items()}, Path(out) / f"rank{rank}.pt")
    lockstep.close()


def test_two_ranks_hold_the_same_weights_as_each_other_and_as_one_process():
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_rank, args=(str(Path(directory) / "store"), directory), nprocs=2, join=True)
        ranks = [torch.load(Path(directory) / f"rank{r}.pt") for r in range(2)]
    one = _model_and_trainer()
    for _ in range(3):
        one.step(_batch())
    alone = one.model.state()
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), name  # bit for bit
        torch.testing.assert_close(tensor, alone[name], rtol=1e-4, atol=1e-5)
    untrained = _model_and_trainer().model.state()
    assert any(not torch.equal(alone[name], untrained[name]) for name in alone)  # it did learn


def test_a_partition_far_ahead_of_a_held_round_is_paused_until_drained():
    from streamlearn.train.order import BUFFER_RECORDS

    order = PartitionRounds[Msg](10)
    order.assigned([("t", 0), ("t", 2)])
    order.batches([Msg(0, o) for o in range(BUFFER_RECORDS)])  # partition 2 has sent nothing yet
    assert order.ready() == (BUFFER_RECORDS // 10, 0) and order.flow() == ([("t", 0)], [])
    order.batches([Msg(2, o) for o in range(BUFFER_RECORDS // 2 + 1000)])
    _, blocked = order.ready()
    assert blocked == (BUFFER_RECORDS // 2 + 1000) // 10
    for _ in range(blocked):
        order.take()
    assert order.flow() == ([], [("t", 0)]) and order.paused == 0  # drained to half: read again


def test_a_partition_whose_end_lies_past_its_last_record_is_at_its_end():
    order = PartitionRounds[Msg](2)
    order.assigned([("t", 0)])
    order.batches([Msg(0, 0), Msg(0, 1), Msg(0, 2)])  # then a transaction's commit marker at 3
    order.reached_end(("t", 0), 4)
    assert order.ready() == (1, 1)
    order.take()
    assert order.ready() == (0, None)  # never holds the other ranks back for its odd record
    order.batches([Msg(0, 5)])  # a record after the end reported: reading again
    assert order.ready() == (1, 1)
    order.take()
    assert order.ready() == (0, 0)
