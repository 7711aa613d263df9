"""The trainer's /metrics server: idle connections time out, and the threads serving them are bounded."""

import contextlib
import socket
import threading
from collections.abc import Iterator

import httpx
from prometheus_client import CollectorRegistry, Counter

from streamlearn.dev.broker import free_port
from streamlearn.train.telemetry import CONNECTION_THREAD, serve_metrics

from .conftest import wait_for


def connection_threads() -> int:
    """The threads the server runs, one per connection it serves."""
    return sum(t.name == CONNECTION_THREAD for t in threading.enumerate())


@contextlib.contextmanager
def metrics_server(**limits: float) -> Iterator[str]:
    registry = CollectorRegistry()
    Counter("streamlearn_test_things", "Things.", registry=registry).inc()
    port = free_port()
    server = serve_metrics(port, "127.0.0.1", registry, **limits)
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def idle_connections(url: str, count: int) -> list[socket.socket]:
    """`count` connections that send nothing, as a probe or a client that went quiet leaves them."""
    port = int(url.split(":")[2].split("/")[0])
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]


def test_idle_connections_time_out_and_their_threads_end():
    baseline = connection_threads()
    with metrics_server(idle_timeout_s=0.3) as url:
        sockets = idle_connections(url, 20)
        try:
            for sock in sockets:  # the server closes each silent connection
                sock.settimeout(10)
                assert sock.recv(1) == b""
            wait_for(lambda: connection_threads() == baseline, 10, what="the connection threads to end")
            assert "streamlearn_test_things_total 1.0" in httpx.get(url, timeout=5).text
        finally:
            for sock in sockets:
                sock.close()


def test_connections_past_the_limit_are_closed_at_once():
    baseline = connection_threads()
    with metrics_server(idle_timeout_s=30, max_connections=2) as url:
        held = idle_connections(url, 2)
        try:
            wait_for(lambda: connection_threads() == baseline + 2, 10, what="two connection threads")
            (extra,) = idle_connections(url, 1)
            extra.settimeout(10)
            assert extra.recv(1) == b"" and connection_threads() == baseline + 2  # no third thread
            extra.close()
        finally:
            for sock in held:
                sock.close()
        # a closed connection frees its slot: the next scrape is served
        wait_for(lambda: connection_threads() == baseline, 10, what="the held connections' threads to end")
        assert httpx.get(url, timeout=5).status_code == 200
