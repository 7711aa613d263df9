"""How many bytes the label join's state adds to every snapshot's training file, with many
predictions waiting for their labels.

    PYTHONPATH=service python bench/bench_join_state.py --pending 100000
    PYTHONPATH=service python bench/bench_join_state.py --pending 400 --string-bytes 900000

Feeds `--pending` prediction-log entries (UUID ids, 10 numbers, and one string of
`--string-bytes` in a multi-valued feature when given) and no labels, then prints the size of
the join's state (the training file's `join.state` tensor) and what waits.
"""

import argparse
import time
import uuid

import orjson

from streamlearn.records import LabelSpec
from streamlearn.train.labeljoin import LabelJoin


class Entry:
    """A prediction-log message, as the join reads one."""

    def __init__(self, offset: int, value: bytes) -> None:
        self._offset, self._value = offset, value

    def topic(self) -> str:
        return "predictions"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--string-bytes", type=int, default=0)
    args = parser.parse_args()
    now = int(time.time() * 1000)
    join = LabelJoin("predictions", "labels", "m", LabelSpec.create("binary"), 3_600_000, idle_ms=None)
    features: dict[str, object] = {f"x{i}": i * 0.37 for i in range(10)}
    if args.string_bytes:
        features["tags"] = ["t" * args.string_bytes]
    sent = 0
    for start in range(0, args.pending, 1_000):
        batch = []
        for offset in range(start, min(start + 1_000, args.pending)):
            entry = {"id": str(uuid.uuid4()), "ts": now, "model": "m", "version": 1, "features": features,
                     "prediction": 0}  # fmt: skip
            value = orjson.dumps(entry)
            sent += len(value)
            batch.append(Entry(offset, value))
        join.feed(batch, 0)
    began = time.perf_counter()
    state = join.state()
    took = time.perf_counter() - began
    waiting = join.pending()["predictions"]
    print(
        orjson.dumps(
            {
                "entries": args.pending,
                "entry_bytes": sent // max(args.pending, 1),
                "waiting": waiting,
                "evicted": join.summary()["counts"]["evicted"],
                "state_bytes": len(state),
                "state_bytes_per_waiting": round(len(state) / max(waiting, 1), 1),
                "state_seconds": round(took, 3),
            }
        ).decode()
    )


if __name__ == "__main__":
    main()
