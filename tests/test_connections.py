"""Hostile HTTP clients: slow headers and bodies, too many connections, quiet logs, fast recovery."""

import contextlib
import json
import logging
import selectors
import socket
import threading
import time

import httpx
import pytest

from streamlearn.serve import guard
from streamlearn.serve.guard import RequestFraming, fit_open_files
from streamlearn.serve.middleware import RateLimitFilter

from .conftest import wait_for
from .live_server import live_server, write_trained_model

PREDICT_HEAD = b"POST /v1/models/default:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"


def record(message: str, *args: object, name: str = "uvicorn.error") -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, message, args, None)


def test_the_log_filter_lets_each_template_through_once_per_interval():
    now = [0.0]
    limiter = RateLimitFilter(interval_s=5.0, clock=lambda: now[0])
    assert limiter.filter(record("client %s left", "a"))
    assert not limiter.filter(record("client %s left", "b"))  # same template, other arguments
    assert limiter.filter(record("another message"))
    assert limiter.filter(record("client %s left", "c", name="asyncio"))  # another logger
    now[0] = 4.9
    assert not limiter.filter(record("client %s left", "d"))
    now[0] = 5.0
    shown = record("client %s left", "e")
    assert limiter.filter(shown)
    assert shown.getMessage() == "client e left [2 more like this in the last 5s not logged]"
    assert limiter.filter(record("client %s left", "f")) is False


def test_framing_follows_pipelined_requests_and_split_header_ends():
    framing = RequestFraming()
    assert (framing.phase, framing.requests) == ("headers", 1)
    framing.feed(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r")
    assert framing.phase == "headers"
    framing.feed(b"\n12")
    assert framing.phase == "body"
    framing.feed(b"345GET / HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r\n")
    assert (framing.phase, framing.requests) == ("headers", 3)
    framing.feed(b"host: x\r\n\r\n")
    assert framing.phase == "idle"
    framing.feed(b"P")
    assert (framing.phase, framing.requests) == ("headers", 4)


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
    ],
)
def test_framing_stops_following_a_chunked_or_unreadable_request(head):
    framing = RequestFraming()
    framing.feed(head + b"5\r\nhello\r\n")
    assert framing.phase == "unframed"


def test_the_connection_limit_fits_below_the_open_file_limit(monkeypatch):
    limits = {"now": (256, 512)}
    monkeypatch.setattr(guard.resource, "getrlimit", lambda _: limits["now"])
    monkeypatch.setattr(guard.resource, "setrlimit", lambda _, value: limits.update(now=value))
    # 512 descriptors: 32 accepted at once (4 x 32 in flight), 64 lingering, 128 kept: 192 left.
    assert fit_open_files(1000) == guard.Capacity(connections=192, accept_batch=32)
    assert limits["now"] == (512, 512)  # the soft limit raised to the hard one
    limits["now"] = (1024, 1_000_000)
    assert fit_open_files(1000) == guard.Capacity(connections=1000, accept_batch=586)
    assert limits["now"] == (1000 + 4 * 2048 + 64 + 128, 1_000_000)  # raised only as far as needed


class Tricklers:
    """Connections that send `opening` at once, then one byte of `drip` each every `pace_s`."""

    def __init__(self, port: int, count: int, opening: bytes, drip: bytes = b"", pace_s: float = 0.2) -> None:
        self.sockets = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
        for sock in self.sockets:
            if opening:
                sock.sendall(opening)
        self.drip, self.pace_s = drip, pace_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        if drip:
            self._thread.start()

    def _trickle(self) -> None:
        position = 0
        while not self._stop.wait(self.pace_s):
            byte = self.drip[position % len(self.drip) : position % len(self.drip) + 1]
            for sock in self.sockets:
                with contextlib.suppress(OSError):  # closed by the server: what these tests want
                    sock.send(byte)
            position += 1

    def answers(self, timeout_s: float) -> list[bytes]:
        """What the server sent each connection before closing it; fails if one stays open."""
        received = {sock: bytearray() for sock in self.sockets}
        with selectors.DefaultSelector() as selector:
            for sock in self.sockets:
                selector.register(sock, selectors.EVENT_READ)
            deadline = time.monotonic() + timeout_s
            while selector.get_map() and time.monotonic() < deadline:
                for key, _ in selector.select(deadline - time.monotonic()):
                    try:
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    except ConnectionResetError:
                        data = b""
                    received[key.fileobj] += data  # type: ignore[index]
                    if not data:
                        selector.unregister(key.fileobj)
            assert not selector.get_map(), f"{len(selector.get_map())} connections still open"
        return [bytes(answer) for answer in received.values()]

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for sock in self.sockets:
            sock.close()


def error_of(answer: bytes, status: int) -> str:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert b"content-type: application/json" in head.lower()
    return str(json.loads(body)["error"])


def served_within(base: str, seconds: float) -> float:
    """Time a normal client takes for a prediction; fails beyond `seconds`."""
    started = time.monotonic()
    response = httpx.post(
        f"{base}/v1/models/default:predict", json={"instances": [[1.0, 2.0, 3.0]]}, timeout=seconds
    )
    assert response.status_code == 200, response.text
    return time.monotonic() - started


def alive_within(base: str, seconds: float) -> float:
    """Time /healthz takes to answer; fails beyond `seconds`."""
    started = time.monotonic()
    assert httpx.get(f"{base}/healthz", timeout=seconds).status_code == 200
    return time.monotonic() - started


def test_slow_clients_are_timed_out_bounded_and_never_flood_the_log(tmp_path):
    write_trained_model(tmp_path / "snapshots")
    log_path = tmp_path / "server.log"
    flags = ("--header-timeout-s", "1", "--body-timeout-s", "1.5")
    # An open-file limit of 1024 leaves room for 1024 - 4 x 64 accepted at once - 64 lingering
    # - 128 kept = 576 connections.
    with live_server(tmp_path / "snapshots", log_path, *flags, open_files=(1024, 1024)) as base:
        port = int(base.rsplit(":", 1)[1])

        # 300 connections trickle their headers or their body, one byte every 0.2 s; 20 more
        # trickle a body nobody reads; 50 send garbage.
        slow_headers = Tricklers(port, 150, b"", drip=PREDICT_HEAD)
        slow_bodies = Tricklers(port, 150, PREDICT_HEAD + b"content-length: 1000\r\n\r\n", drip=b"1")
        unread = Tricklers(
            port, 20, b"GET /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n", drip=b"1"
        )
        garbage = Tricklers(port, 50, b"NOT HTTP AT ALL\r\n\r\n")
        try:
            latencies = [served_within(base, 1.0) for _ in range(5)]
            header_answers = slow_headers.answers(timeout_s=5)
            body_answers = slow_bodies.answers(timeout_s=5)
            unread_answers = unread.answers(timeout_s=5)
            garbage_answers = garbage.answers(timeout_s=5)
        finally:
            for attack in (slow_headers, slow_bodies, unread, garbage):
                attack.close()
        assert all("headers not received within 1s" in error_of(a, 408) for a in header_answers)
        assert all("body not received within 1.5s" in error_of(a, 408) for a in body_answers)
        assert all(a.startswith(b"HTTP/1.1 200") for a in unread_answers)  # then closed at 1.5 + 1 s
        assert all(a.startswith(b"HTTP/1.1 400") for a in garbage_answers)  # h11's own answer
        recoveries = [alive_within(base, 1.0)]

        # 700 idle connections: those beyond the 576 that fit get a 503 at once.
        idle = Tricklers(port, 700, b"")
        try:
            answers = idle.answers(timeout_s=5)
        finally:
            idle.close()
        recoveries.append(alive_within(base, 1.0))
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert len(refused) >= 700 - 576
        assert all("too many open connections" in error_of(a, 503) for a in refused)
        assert all("headers not received" in error_of(a, 408) for a in answers if a not in refused)

        # 100 clients leave halfway through their body.
        leaving = Tricklers(port, 100, PREDICT_HEAD + b"content-length: 1000\r\n\r\n[[1, 2")
        leaving.close()
        recoveries.append(alive_within(base, 1.0))
        metric = "streamlearn_client_disconnects_total 100.0"
        wait_for(lambda: metric in httpx.get(f"{base}/metrics").text, 10, what="100 disconnects counted")

        metrics = httpx.get(f"{base}/metrics").text
    log = log_path.read_text()
    print(
        f"normal client while attacked: max {max(latencies):.3f}s; refused {len(refused)} of 700 "
        f"idle connections; /healthz after each attack {max(recoveries):.3f}s at most; "
        f"{len(log.splitlines())} log lines"
    )
    assert 'streamlearn_request_timeouts_total{phase="body"} 170.0' in metrics
    assert f"streamlearn_connections_rejected_total {float(len(refused))}" in metrics
    assert "--max-connections 1000 lowered to 576" in log
    assert "Traceback" not in log and "Too many open files" not in log
    assert log.count("Invalid HTTP request received") == 1
    assert len(log.splitlines()) < 50, log
