"""Log lines that a client, a stream or a broker could repeat without end, let through at most once
per interval with a count of those held back. The server's per-request loggers and every process's
Kafka clients (kafka.py) use this one filter."""

import logging
import threading
import time
from collections.abc import Callable, Hashable


def by_template(record: logging.LogRecord) -> Hashable:
    """A record's logger and the first line of its message template (its arguments vary)."""
    return record.name, str(record.msg).split("\n", 1)[0][:200]


class RateLimitFilter(logging.Filter):
    """Lets each key (by default, each message template) through at most once per `interval_s`,
    saying how many it held back."""

    def __init__(
        self,
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        key: Callable[[logging.LogRecord], Hashable] = by_template,
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self.key = key
        self._lock = threading.Lock()
        self._seen: dict[Hashable, tuple[float, int]] = {}  # key -> (shown at, held back)

    def filter(self, record: logging.LogRecord) -> bool:
        key = self.key(record)
        now = self.clock()
        with self._lock:
            shown_at, held = self._seen.get(key, (float("-inf"), 0))
            if now - shown_at < self.interval_s:
                self._seen[key] = (shown_at, held + 1)
                return False
            if len(self._seen) > 1000:  # templates are bounded in practice; never grow without end
                self._seen.clear()
            self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} [{held} more like this in the last {now - shown_at:.0f}s not logged]"
        return True
