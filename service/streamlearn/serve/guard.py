"""Defences against hostile HTTP clients at the connection: a bound on open ones, header and body deadlines.

uvicorn has no header or body read timeout, and its own concurrency limit counts a connection
only once its headers are complete, so slow clients can hold every file descriptor. The guard
wraps uvicorn's h11 protocol per connection: beyond `max_connections` a new connection gets a
canned 503 and is closed at once; a header block (ending in a blank line) must arrive within
`header_timeout_s` or the client gets a 408; a body must arrive within `body_timeout_s` of its
headers. The app answers a late body with a 408 itself (middleware.BodyLimits); the guard
closes the connection a moment later in case the app is not reading.
"""

import asyncio
import json
import logging
import resource
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

from streamlearn.metrics import ServerMetrics

log = logging.getLogger("streamlearn.serve")

FD_RESERVE = 128  # descriptors kept for all but client sockets (snapshot files, S3, logs)
MAX_ACCEPT_BATCH = 2048  # uvicorn's default backlog: asyncio accepts up to that many at once
LISTEN_QUEUE = 2048  # connections the kernel holds until accepted: no descriptors used yet
BODY_GRACE_S = 1.0  # the app answers 408 at the body deadline; the guard closes this much later
LINGER_S = 1.0  # how long a refused connection may still send before it is closed
MAX_LINGERING = 64  # beyond this many lingering connections, close at once
MAX_HEAD_BYTES = 64 * 1024  # h11 refuses header blocks over 16 KiB itself; stop tracking beyond
OVERLOADED = "too many open connections; retry shortly"


@dataclass(frozen=True)
class Capacity:
    """What the open-file limit leaves room for: open connections, and sockets accepted at once."""

    connections: int
    accept_batch: int


def fit_open_files(wanted: int) -> Capacity:
    """Raise the soft open-file limit toward the hard one; how many connections then fit below it.

    asyncio accepts up to `accept_batch` sockets per loop turn and closes a refused one a few
    turns later, so some 4 x accept_batch descriptors can be in use beyond the open connections.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted + 4 * MAX_ACCEPT_BATCH + MAX_LINGERING + FD_RESERVE
    if hard != resource.RLIM_INFINITY:
        target = min(hard, target)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    batch = min(MAX_ACCEPT_BATCH, max(16, soft // 16))
    fitting = max(soft - 4 * batch - MAX_LINGERING - FD_RESERVE, soft // 4)
    if fitting < wanted:
        log.warning(
            "--max-connections %d lowered to %d to fit the open-file limit (%d)", wanted, fitting, soft
        )
    return Capacity(min(wanted, fitting), batch)


def deepen_listen_queues(servers: Iterable[asyncio.Server]) -> None:
    """Let the kernel queue LISTEN_QUEUE connections, though asyncio accepts fewer per turn.

    asyncio listens with the backlog it accepts per turn; a short queue would make a burst of
    clients wait a second for their SYN to be retried.
    """
    for server in servers:
        for sock in server.sockets:
            with sock.dup() as listener:  # the same socket: listen() again just resizes its queue
                listener.listen(LISTEN_QUEUE)


def canned_response(status: int, reason: str, error: str, *extra: str) -> bytes:
    """A complete HTTP/1.1 response with a JSON error body that closes the connection."""
    body = json.dumps({"error": error}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", *extra]
    head += [f"content-length: {len(body)}", "connection: close", "", ""]
    return "\r\n".join(head).encode("ascii") + body


class RequestFraming:
    """Follows where each request's header block and body end in a connection's byte stream.

    Phases: HEADERS (waiting for a header block to end), BODY (Content-Length bytes to come),
    IDLE (between requests), UNFRAMED (a chunked or unparseable request: no longer followed).
    """

    HEADERS, BODY, IDLE, UNFRAMED = "headers", "body", "idle", "unframed"

    def __init__(self) -> None:
        self.phase = self.HEADERS  # the first request's deadline runs from the connection's start
        self.requests = 1  # requests begun, so a new request's phase is told from the last one's
        self._head = bytearray()
        self._remaining = 0

    def feed(self, data: bytes) -> None:
        while data and self.phase != self.UNFRAMED:
            if self.phase == self.BODY:
                taken = min(len(data), self._remaining)
                self._remaining -= taken
                data = data[taken:]
                if not self._remaining:
                    self.phase = self.IDLE
                continue
            if self.phase == self.IDLE:
                self.phase, self.requests = self.HEADERS, self.requests + 1
            data = self._feed_head(data)

    def _feed_head(self, data: bytes) -> bytes:
        search_from = max(0, len(self._head) - 3)
        self._head += data
        end = self._head.find(b"\r\n\r\n", search_from)
        if end < 0:
            if len(self._head) > MAX_HEAD_BYTES:
                self.phase = self.UNFRAMED
            return b""
        rest = bytes(self._head[end + 4 :])
        length = _body_length(bytes(self._head[:end]))
        self._head.clear()
        if length is None:
            self.phase = self.UNFRAMED
        else:
            self._remaining = length
            self.phase = self.BODY if length else self.IDLE
        return rest


def _body_length(head: bytes) -> int | None:
    """The Content-Length of a header block; None for a chunked or unreadable one."""
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            if not value.strip().isdigit():
                return None
            length = int(value.strip())
    return length


class ConnectionGuard:
    """Server-wide state of the guard: the limits, the open connections, and its counters."""

    def __init__(
        self, max_connections: int, header_timeout_s: float, body_timeout_s: float, metrics: ServerMetrics
    ) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.metrics = metrics
        self.open = 0
        self.lingering = 0
        metrics.open_connections.set_function(lambda: self.open)

    def protocol_class(self) -> type[asyncio.Protocol]:
        """The class to pass as uvicorn.Config(http=...): h11, with this guard around each connection."""
        return type("GuardedH11Protocol", (GuardedConnection,), {"guard": self})


class GuardedConnection(asyncio.Protocol):
    """One connection: uvicorn's H11Protocol inside, deadlines and the connection bound around it."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: Any = None) -> None:
        self.inner = H11Protocol(config=config, server_state=server_state, app_state=app_state, _loop=_loop)
        self.loop: asyncio.AbstractEventLoop = _loop or asyncio.get_event_loop()
        self.framing = RequestFraming()
        self.transport: asyncio.Transport | None = None
        self.accepted = self.closing = self.lingering = False
        self._timer: asyncio.TimerHandle | None = None
        self._timed: tuple[str, int] = ("", 0)  # the (phase, request) the timer was set for

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        guard = self.guard
        if guard.open >= guard.max_connections:
            guard.metrics.connections_rejected.inc()
            log.warning("refused a connection with 503: %d connections are open", guard.open)
            self._refuse(canned_response(503, "Service Unavailable", OVERLOADED, "retry-after: 1"))
            return
        guard.open += 1
        self.accepted = True
        self.inner.connection_made(transport)
        self._set_timer()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # a refused or timed-out client: read and drop, so closing does not reset it
        self.framing.feed(data)
        self._set_timer()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if not self.closing:
            self.inner.eof_received()
        return None  # as uvicorn's h11 protocol: the client's end closes the connection

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.lingering:
            self.guard.lingering -= 1
        if self.accepted:
            self.guard.open -= 1
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.accepted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.accepted:
            self.inner.resume_writing()

    def _set_timer(self) -> None:
        """Start the deadline of the phase the connection is in, once per phase of each request."""
        phase = (self.framing.phase, self.framing.requests)
        if phase == self._timed or self.closing:
            return
        self._timed = phase
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if phase[0] == RequestFraming.HEADERS:
            self._timer = self.loop.call_later(self.guard.header_timeout_s, self._headers_late)
        elif phase[0] in (RequestFraming.BODY, RequestFraming.UNFRAMED):
            self._timer = self.loop.call_later(self.guard.body_timeout_s + BODY_GRACE_S, self._body_late)

    def _headers_late(self) -> None:
        self.guard.metrics.request_timeouts.labels("headers").inc()
        log.warning("answered 408: request headers took over %gs", self.guard.header_timeout_s)
        late = f"request headers not received within {self.guard.header_timeout_s:g}s"
        self._refuse(canned_response(408, "Request Timeout", late))

    def _body_late(self) -> None:
        assert self.transport is not None
        if self.framing.phase == RequestFraming.BODY:  # the app would have answered 408 by now
            self.guard.metrics.request_timeouts.labels("body").inc()
            log.warning("closed a connection: request body took over %gs", self.guard.body_timeout_s)
        self.closing = True
        self.transport.close()

    def _refuse(self, response: bytes) -> None:
        """Answer and close, reading on for a moment so the client gets the answer, not a reset."""
        assert self.transport is not None
        self.closing = True
        self.transport.write(response)
        if self.guard.lingering >= MAX_LINGERING or not self.transport.can_write_eof():
            self.transport.close()
            return
        try:
            self.transport.write_eof()
        except OSError:  # the client is gone already
            self.transport.close()
            return
        self.lingering = True
        self.guard.lingering += 1
        self._timer = self.loop.call_later(LINGER_S, self.transport.close)
