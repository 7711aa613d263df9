"""The isolator: one record that breaks decoding or learning is dead-lettered, the rest learned."""

from dataclasses import dataclass

import numpy as np
import pytest

from streamlearn.decoding import DecodedBatch, Rejected
from streamlearn.errors import ConfigError, InvalidReason
from streamlearn.train import isolate
from streamlearn.train.isolate import Isolator


@dataclass(frozen=True)
class Record:
    offset_: int
    value_: bytes

    def topic(self) -> str:
        return "events"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self.offset_

    def value(self) -> bytes:
        return self.value_


def decode(values: list[bytes | None]) -> DecodedBatch:
    """Each value an integer: a row holding it; b"bad" is refused, as the contract refuses."""
    rows = [int(v) for v in values if v != b"bad"]
    rejected = [Rejected(i, InvalidReason.BAD_JSON, "bad") for i, v in enumerate(values) if v == b"bad"]
    n = len(rows)
    features = np.array(rows, dtype=np.float32).reshape(n, 1)
    return DecodedBatch(features, np.zeros(n, np.float32), np.ones(n, np.float32), rejected)


class Model:
    """Learns rows in order: raises on a `raising` row; stops before a `non_finite` one."""

    def __init__(self, raising: set[int] = frozenset(), non_finite: set[int] = frozenset()) -> None:
        self.raising, self.non_finite = raising, non_finite
        self.rows: list[int] = []

    def learn(self, batch: DecodedBatch) -> int:
        rows = [int(x) for x in batch.features[:, 0]]
        if self.raising & set(rows):
            raise RuntimeError("a bug of ours")
        for n, row in enumerate(rows):
            if row in self.non_finite:
                return n
            self.rows.append(row)
        return len(rows)


def run(values: list[bytes], model: Model) -> tuple[list[tuple[int, str]], list[int]]:
    refused: list[tuple[int, str]] = []
    told: list[int] = []
    isolator = Isolator(
        decode, model.learn, lambda m, r: refused.append((m.offset(), r.reason.value)),
        lambda records: told.extend(m.offset() for m in records),
    )  # fmt: skip
    isolator.learn([Record(i, v) for i, v in enumerate(values)])
    return refused, told


def test_a_record_that_makes_learning_raise_is_found_by_bisection_and_the_rest_learned():
    model = Model(raising={13})
    refused, told = run([b"%d" % i for i in range(32)], model)
    assert refused == [(13, "internal_error")]
    assert model.rows == [i for i in range(32) if i != 13]  # in order, each once
    assert told == model.rows


def test_a_record_whose_step_is_not_finite_is_dead_lettered_and_those_before_it_stay_learned():
    model = Model(non_finite={5})
    refused, _ = run([b"%d" % i for i in range(8)], model)
    assert refused == [(5, "non_finite")]
    assert model.rows == [0, 1, 2, 3, 4, 6, 7]


def test_records_the_contract_refuses_are_dead_lettered_once_in_order():
    model = Model(raising={6})
    refused, _ = run([b"0", b"bad", b"2", b"3", b"bad", b"5", b"6", b"7"], model)
    assert sorted(refused) == [(1, "bad_json"), (4, "bad_json"), (6, "internal_error")]
    assert len(refused) == len(set(refused))
    assert model.rows == [0, 2, 3, 5, 7]


def test_a_setting_that_cannot_work_is_no_records_fault():
    def misconfigured(batch: DecodedBatch) -> int:
        raise ConfigError("--init-from has another shape")

    isolator = Isolator(decode, misconfigured, lambda m, r: None)
    with pytest.raises(ConfigError):
        isolator.learn([Record(0, b"1"), Record(1, b"2")])


def test_failing_on_every_record_is_not_one_records_fault(monkeypatch):
    monkeypatch.setattr(isolate, "MAX_INTERNAL_ERRORS", 20)
    model = Model(raising=set(range(64)))
    with pytest.raises(RuntimeError, match="a bug of ours"):
        run([b"%d" % i for i in range(64)], model)
