"""Learning a micro-batch so that no one record can stop learning: a poison record is isolated.

A bug of ours must never turn one record into an outage: a batch whose decoding or learning
raises an exception nobody foresaw is bisected until the record that raises is found, and that
record is dead-lettered as internal_error; the others are learned. So is a batch holding a
record whose loss or gradient is not finite; records learned before the step that met it stay
learned, and only the rest is bisected.
"""

import logging
from collections.abc import Callable, Sequence
from typing import Generic

from streamlearn.decoding import DecodedBatch, Rejected
from streamlearn.errors import ConfigError, InvalidReason
from streamlearn.train.partitions import M
from streamlearn.train.telemetry import RateLimitedLog

MAX_INTERNAL_ERRORS = 1000  # unforeseen exceptions in a row: then it is not one record but the code


class Isolator(Generic[M]):
    """Decodes and learns micro-batches, bisecting a failing one down to the record at fault."""

    def __init__(
        self,
        decode: Callable[[list[bytes | None]], DecodedBatch],
        learn: Callable[[DecodedBatch], int],
        reject: Callable[[M, Rejected], None],
        learned: Callable[[list[M]], None] | None = None,
        limited: RateLimitedLog | None = None,
    ) -> None:
        self.decode = decode
        self.learn_batch = learn  # the valid records learned, in order (fewer: a step met a non-finite)
        self.reject = reject  # dead-letters a record, once
        self.learned = learned  # told which records were learned, in message order
        self.limited = limited or RateLimitedLog()
        self.internal_errors = 0  # unforeseen exceptions in a row, while isolating their records

    def learn(self, messages: Sequence[M], decoded: DecodedBatch | None = None) -> None:
        """Learn the records (decoding them unless `decoded`); dead-letter the invalid ones."""
        try:
            batch = decoded if decoded is not None else self.decode([m.value() for m in messages])
            learned = self.learn_batch(batch) if len(batch) else 0
            rejected = batch.rejected
        except ConfigError:
            raise  # a setting that cannot work (--init-from of another shape) is no record's fault
        except Exception as exc:
            self.internal_errors += 1
            if self.internal_errors > MAX_INTERNAL_ERRORS:  # not one record: the code or the device
                raise
            if len(messages) == 1:
                self.limited.log(
                    logging.ERROR, f"internal-{type(exc).__name__}", "learning a record failed", exc_info=exc
                )
                detail = f"{type(exc).__name__}: {exc}"[:300]
                self.reject(messages[0], Rejected(0, InvalidReason.INTERNAL_ERROR, detail))
                return
            rejected, learned = [], 0  # any record may be the one
        self._go_on(messages, rejected, learned)

    def _go_on(self, messages: Sequence[M], rejected: list[Rejected], learned: int) -> None:
        """Report what was learned and refused; learn or bisect the records after the first not learned."""
        # valid records are learned in message order: `cut` is the message of the first one not learned
        every = learned == len(messages) - len(rejected)
        refused = {r.index for r in rejected}
        cut = len(messages) if every else message_of_row(len(messages), refused, learned)
        if cut == len(messages):
            self.internal_errors = 0
        if self.learned is not None:
            self.learned([m for i, m in enumerate(messages[:cut]) if i not in refused])
        for r in rejected:  # sent once the records before them went through, so never twice
            if r.index < cut:
                self.reject(messages[r.index], r)
        rest = messages[cut:]
        if not rest:
            return
        if learned > 0:  # progress: the records not learned are tried again as a batch of their own
            self.learn(rest)
        elif len(rest) == 1:
            detail = "the loss or gradient is not finite for this record"
            self.reject(rest[0], Rejected(0, InvalidReason.NON_FINITE, detail))
        else:  # nothing learned: find the record responsible
            middle = len(rest) // 2
            self.learn(rest[:middle])
            self.learn(rest[middle:])


def message_of_row(n_messages: int, rejected: set[int], row: int) -> int:
    """The index of the message holding valid row `row` (n_messages when there is no such row)."""
    seen = 0
    for index in range(n_messages):
        if index in rejected:
            continue
        if seen == row:
            return index
        seen += 1
    return n_messages
