"""Many trainer processes learning one model in lockstep: torch.distributed, launched by torchrun.

With WORLD_SIZE > 1 (`torchrun --nproc-per-node N -m streamlearn train ...`) rank r owns the
partitions p of the topic with p mod N == r, read with assign() at the snapshot's offsets, and
every rank runs the same rounds, in the same order:
1. agree: one all_reduce per poll says how many rounds to learn, whether any rank's stream is
   pressing (the step policy), whether to stop, and whether rank 0 wants a snapshot;
2. gather: each rank's share of a round (the raw record values, with their positions) is
   all_gathered, so every rank holds the round's global micro-batch, in rank order;
3. learn: every rank decodes and tests the global batch and updates the normalizer, category
   counts, drift detectors and prequential scores from it (so they are the same everywhere and
   describe the whole model); each optimizer step's forward and backward are split over the
   ranks and their gradients all_reduced (`Reducer`), then clipped and checked, so every rank
   applies the same update and holds the same weights;
4. checkpoint: at a round boundary each rank contributes its partitions' offsets, dead-letter
   marks and a digest of its weights; rank 0 checks the digests agree and writes one snapshot;
   then every rank commits its own offsets.
A collective that fails (a peer died, or none answered within --collective-timeout-s) ends the
process with EXIT_PEER_LOST: torchrun then restarts the group and every rank resumes from the
newest snapshot. Only the loop thread issues collectives, so their order is the same on every rank.
"""

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import numpy as np
import orjson
import torch
import torch.distributed as dist
import xxhash
from torch import Tensor

from streamlearn.errors import ConfigError
from streamlearn.train.partitions import Consumed

log = logging.getLogger("streamlearn.train")

EXIT_PEER_LOST = 3  # a collective failed: the group must restart from the newest snapshot
# Starting takes longer than a round may: loading the newest snapshot, finding the dead letters a
# crashed run sent. Until every rank is ready, the ranks wait this long for each other.
START_TIMEOUT_S = 600.0
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks, from torchrun's environment (one rank without it)."""

    rank: int = 0
    size: int = 1
    local_size: int = 1
    local_rank: int = 0  # its place among the ranks on this host (its GPU, with CUDA)

    @classmethod
    def from_env(cls) -> "World":
        try:
            size = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
            local_rank = int(os.environ.get("LOCAL_RANK", str(rank % local_size)))
        except ValueError:
            raise ConfigError(
                "WORLD_SIZE, RANK, LOCAL_WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)"
            ) from None
        if (
            size < 1
            or not 0 <= rank < size
            or not 1 <= local_size <= size
            or not 0 <= local_rank < local_size
        ):
            raise ConfigError(f"rank {rank} of a world of {size} ({local_size} local) is impossible")
        return cls(rank, size, local_size, local_rank)

    def owned(self, partitions: int) -> list[int]:
        """The partitions of a topic with `partitions` of them that this rank reads."""
        return [p for p in range(partitions) if p % self.size == self.rank]


@dataclass(frozen=True)
class Agreement:
    """What all ranks decided together before a poll's rounds."""

    rounds: int  # rounds to learn now, the same on every rank
    pressed: bool  # some rank's stream is backed up: the step policy takes large steps
    stop: bool  # some rank was asked to stop: all checkpoint and leave
    due: bool  # rank 0 wants a snapshot after these rounds


class Shared:
    """A record another rank consumed, as the learning path sees a message: its value and position."""

    __slots__ = ("_offset", "_partition", "_topic", "_value")

    def __init__(self, topic: str, partition: int, offset: int, value: bytes | None) -> None:
        self._topic, self._partition, self._offset, self._value = topic, partition, offset, value

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value


class Lockstep:
    """The collectives of one rank; every call must be made by every rank, in the same order."""

    def __init__(self, world: World, timeout_s: float, device: torch.device) -> None:
        self.world = world
        self.rank, self.size = world.rank, world.size
        try:
            if not dist.is_initialized():  # the default group: the start-up's collectives
                start = max(timeout_s, START_TIMEOUT_S)
                dist.init_process_group(
                    "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                    store=_store(world, start),
                    rank=world.rank,
                    world_size=world.size,
                    timeout=timedelta(seconds=start),
                )
            # the rounds' collectives: a peer that does not answer within timeout_s is lost
            self.group = dist.new_group(timeout=timedelta(seconds=timeout_s))
        except Exception as exc:  # the others never came: torchrun restarts the group
            self.lost("joining the group", exc)
        self.device = device
        self.reducer = Reducer(self)
        if device.type == "cpu":  # the same CPU kernels on every rank: the same float rounding
            threads = torch.tensor([-torch.get_num_threads()])
            self._collective("agreeing on threads", lambda: _all_reduce_max(threads, None))
            torch.set_num_threads(-int(threads))
        log.info("rank %d of %d: lockstep over %s", self.rank, self.size, dist.get_backend())

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- the rounds -----------------------------------------------------------------------------

    def agree(self, ready: int, blocked: int | None, pressed: bool, stop: bool, due: bool) -> Agreement:
        """How many rounds all ranks learn now.

        `ready`: the rounds this rank has records for. `blocked`: with --deterministic, the rounds
        it can take part in before it must wait for more records, so that a round holds the same
        records however they arrived; None when it never holds a round back (its partitions are
        at their end, or without --deterministic: a rank with nothing adds an empty share).
        """
        never = 1 << 40
        values = [ready, -(never if blocked is None else blocked), int(pressed), int(stop), int(due)]
        if self.rank != 0:
            values[4] = 0  # the snapshot interval is rank 0's to keep
        reduced = torch.tensor(values, dtype=torch.int64)
        self._collective("agree", lambda: _all_reduce_max(reduced, self.group))
        most, fewest_blocked = int(reduced[0]), -int(reduced[1])
        return Agreement(min(most, fewest_blocked), bool(reduced[2]), bool(reduced[3]), bool(reduced[4]))

    def gather_records(self, mine: Sequence[Consumed]) -> list[Sequence[Consumed]]:
        """Every rank's share of a round, in rank order; this rank's is `mine` itself."""
        header = np.array(
            [[m.partition(), m.offset(), len(m.value() or b""), m.value() is None] for m in mine],
            dtype=np.int64,
        ).reshape(-1, 4)
        topics = orjson.dumps([m.topic() for m in mine])
        payload = b"".join(m.value() or b"" for m in mine)
        blobs = self.gather_bytes([header.tobytes(), topics, payload])
        shares: list[Sequence[Consumed]] = []
        for rank, (head, names, data) in enumerate(blobs):
            if rank == self.rank:
                shares.append(mine)
                continue
            rows = np.frombuffer(head, dtype=np.int64).reshape(-1, 4)
            ends = np.cumsum(rows[:, 2])
            records = []
            for (partition, offset, length, none), topic, end in zip(
                rows, orjson.loads(names), ends, strict=True
            ):
                value = None if none else data[end - length : end]
                records.append(Shared(topic, int(partition), int(offset), value))
            shares.append(records)
        return shares

    def same(self, what: str, *values: int) -> None:
        """End the group unless every rank has these values: a check that a round went alike
        everywhere (an exception only one rank met, say) before anything of it is snapshotted."""
        both = torch.tensor([*values, *(-v for v in values)], dtype=torch.int64)
        self._collective(what, lambda: _all_reduce_max(both, self.group))
        n = len(values)
        if any(int(both[i]) != -int(both[n + i]) for i in range(n)):
            self.lost(what, RuntimeError(f"the ranks disagree: this rank has {list(values)}"))

    def ready(self) -> None:
        """Wait for every rank to be started (within START_TIMEOUT_S), before the first round."""
        self._collective("waiting for the ranks to start", lambda: dist.barrier())

    def gather_json(self, value: Any, at_start: bool = False) -> list[Any]:
        """Every rank's JSON-able value, in rank order (JSON, never pickle)."""
        return [orjson.loads(parts[0]) for parts in self.gather_bytes([orjson.dumps(value)], at_start)]

    def broadcast_json(self, value: Any, at_start: bool = False) -> Any:
        """Rank 0's value, on every rank."""
        return self.gather_json(value if self.rank == 0 else None, at_start)[0]

    def gather_bytes(self, parts: list[bytes], at_start: bool = False) -> list[list[bytes]]:
        """Every rank's byte strings (as many on each), in rank order: two collectives."""
        group = None if at_start else self.group
        lengths = torch.tensor([len(p) for p in parts], dtype=torch.int64)
        everyone = [torch.empty_like(lengths) for _ in range(self.size)]
        self._collective("gather", lambda: dist.all_gather(everyone, lengths, group=group))
        longest = max(int(t.sum()) for t in everyone)
        mine = torch.zeros(max(longest, 1), dtype=torch.uint8)
        if lengths.sum():
            mine[: int(lengths.sum())] = torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)
        blobs = [torch.empty_like(mine) for _ in range(self.size)]
        self._collective("gather", lambda: dist.all_gather(blobs, mine, group=group))
        result = []
        for size, blob in zip(everyone, blobs, strict=True):
            data, out, start = blob.numpy().tobytes(), [], 0
            for length in size.tolist():
                out.append(data[start : start + length])
                start += length
            result.append(out)
        return result

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """The sum over ranks, in place (dense or sparse)."""
        self._collective("all_reduce", lambda: dist.all_reduce(tensor, group=self.group))
        return tensor

    def _collective(self, what: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except Exception as exc:  # the group is unusable after a failed collective
            self.lost(what, exc)

    def lost(self, what: str, exc: BaseException) -> NoReturn:
        """End this rank: torchrun restarts the group, which resumes from the newest snapshot."""
        first = (str(exc).splitlines() or [""])[0]
        log.error(
            "rank %d: %s failed (%s: %s); a peer has died or is stuck: exiting so the group restarts "
            "from the newest snapshot", self.rank, what, type(exc).__name__, first,
        )  # fmt: skip
        logging.shutdown()
        sys.stderr.flush()
        os._exit(EXIT_PEER_LOST)


class Reducer:
    """Splits each optimizer step over the ranks and sums their gradients (the Trainer's seam)."""

    def __init__(self, lockstep: Lockstep) -> None:
        self.lockstep = lockstep
        self.rank, self.size = lockstep.rank, lockstep.size

    def share(self, n: int) -> slice:
        """This rank's rows of a step of `n` (contiguous, in rank order; possibly none)."""
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def reduce(
        self, parameters: Sequence[torch.nn.Parameter], sparse: set[int], loss: Tensor, raised: bool
    ) -> Tensor:
        """Sum every parameter's gradient and the loss over the ranks (`sparse`: the ids of those
        learned with sparse gradients); a rank whose share raised makes every rank raise, so
        nothing is applied anywhere."""
        dense = [p for p in parameters if p.requires_grad and id(p) not in sparse]
        flat = [torch.zeros_like(p).reshape(-1) if p.grad is None else p.grad.reshape(-1) for p in dense]
        flags = torch.tensor([float(raised)], dtype=loss.dtype, device=loss.device)
        buffer = torch.cat([*flat, loss.detach().reshape(1).to(flags.dtype), flags])
        self.lockstep.all_reduce(buffer)
        if buffer[-1].item():
            raise RuntimeError("an optimizer step raised on one of the ranks")
        start = 0
        for p in dense:
            n = p.numel()
            p.grad = buffer[start : start + n].view_as(p).to(p.dtype)
            start += n
        for p in parameters:
            if p.requires_grad and id(p) in sparse:
                grad = p.grad if p.grad is not None else _empty_sparse(p)
                # through gloo on the CPU: NCCL has no sparse all_reduce
                summed = self.lockstep.all_reduce(grad.coalesce().cpu()).coalesce()
                p.grad = summed.to(p.device)
        return buffer[-2]


def _empty_sparse(p: torch.nn.Parameter) -> Tensor:
    indices = torch.empty((1, 0), dtype=torch.int64, device=p.device)
    values = torch.empty((0, *p.shape[1:]), dtype=p.dtype, device=p.device)
    return torch.sparse_coo_tensor(indices, values, p.shape)


def _all_reduce_max(tensor: Tensor, group: Any) -> Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def _store(world: World, timeout_s: float) -> dist.Store:
    """The rendezvous store. Where the workers share torchrun's own store (one host), the keys of
    a group that failed are still in it after a restart and would break the new group's start
    (pytorch#135712): a prefix of the restart count keeps each run's apart. Across hosts each host
    counts its own restarts, so there each run needs a store of its own, as
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 makes it (README, Scaling out)."""
    store, _, _ = next(
        dist.rendezvous("env://", world.rank, world.size, timeout=timedelta(seconds=timeout_s))
    )
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store
    return dist.PrefixStore(f"streamlearn/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def digest(tensors: dict[str, Tensor]) -> str:
    """A hash of tensors' names and bytes: equal on two ranks exactly when their weights are."""
    h = xxhash.xxh3_64()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(
            tensors[name].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return h.hexdigest()
