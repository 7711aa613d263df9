"""The `streamlearn` command: parses flags into settings and calls the modules that do the work.

Flags are generated from the settings models in config/, so every flag is documented once
and is also an environment variable. User errors print one line and exit non-zero.
"""

import argparse
import logging
import os
import signal
import sys
import threading
import typing
from collections.abc import Callable
from typing import Any, NoReturn

from pydantic import BaseModel, ValidationError

from streamlearn import __version__
from streamlearn.config import (
    BrokerSettings,
    DlqInspectSettings,
    DlqReplaySettings,
    ProduceSettings,
    ServeSettings,
    StatusSettings,
    TrainSettings,
    UpSettings,
    flag,
    is_flag,
)
from streamlearn.errors import ConfigError, StreamlearnError

log = logging.getLogger("streamlearn")
# their INFO lines are noise: where credentials came from, a line per HTTP request of the demo client
QUIET_LIBRARIES = ("aiobotocore", "botocore", "s3fs", "fsspec", "httpx")


class UsageError(Exception):
    """The command line itself is wrong (unknown flag, missing command)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _stop_event() -> threading.Event:
    """An event set by SIGINT or SIGTERM; the handlers only set it."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def run_broker(settings: BrokerSettings) -> int:
    from streamlearn.dev.broker import EmbeddedBroker

    stop = _stop_event()
    broker = EmbeddedBroker(settings.broker_host, settings.broker_port, settings.broker_bin)
    broker.start(output=None)
    print(f"embedded Kafka-compatible broker listening on {broker.bootstrap} (memory storage; Ctrl-C stops)")
    try:
        while not stop.wait(0.5):
            if broker.process is not None and broker.process.poll() is not None:
                print(f"the broker exited with code {broker.process.returncode}", file=sys.stderr)
                return 1
    finally:
        broker.stop()
    return 0


def run_train(settings: TrainSettings) -> int:
    from prometheus_client import CollectorRegistry

    from streamlearn import kafka
    from streamlearn.dev.broker import ensure_port_free
    from streamlearn.metrics import TrainerMetrics
    from streamlearn.models import known_architecture
    from streamlearn.snapshots import open_store
    from streamlearn.train.lockstep import World
    from streamlearn.train.pipeline import Pipeline
    from streamlearn.train.telemetry import serve_metrics

    try:  # checked here, not in the settings: the settings never import the models (torch)
        known_architecture(settings.arch)
    except ConfigError as exc:
        raise UsageError(f"streamlearn train: --arch: {exc}") from None
    stop = _stop_event()  # first: a signal during start-up ends the trainer cleanly too
    open_store(settings.snapshot_dir).ensure_writable()
    # Under torchrun each rank serves its metrics on the port + its rank on this host (LOCAL_RANK):
    # ranks on one host do not collide, and a rank per pod keeps the port its manifest names.
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if World.from_env().size > 1 else 0
    port = settings.metrics_port + local_rank if settings.metrics_port else 0
    if port:
        ensure_port_free(settings.metrics_host, port, "trainer metrics")
    kafka.check_reachable(settings.bootstrap, settings.kafka, settings.connect_timeout_s)
    registry = CollectorRegistry()
    pipeline = Pipeline(settings, TrainerMetrics(registry))
    pipeline.restore()
    if port:
        serve_metrics(port, settings.metrics_host, registry)  # idle connections time out
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, pipeline.stop)
    if stop.is_set():
        if pipeline.lockstep is None:
            return 0
        pipeline.stop()  # the other ranks are starting too: the first round tells them to stop
    pipeline.run()
    return 0


def run_serve(settings: ServeSettings) -> int:
    import os
    import socket

    # numpy's BLAS (small predicts, numpy_forward.py) as torch: requests already run side by side.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(settings.torch_threads))

    import uvicorn

    from streamlearn.dev.broker import ensure_port_free
    from streamlearn.serve.app import create_app
    from streamlearn.serve.guard import ConnectionGuard, deepen_listen_queues, fit_open_files
    from streamlearn.serve.middleware import rate_limit_logs

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            deepen_listen_queues(getattr(self, "servers", ()))

    ensure_port_free(settings.host, settings.port, "prediction server")
    import torch

    torch.set_num_threads(settings.torch_threads)  # torch's default, one per core, thrashes under load
    app = create_app(settings)
    capacity = fit_open_files(settings.max_connections)
    guard = ConnectionGuard(
        capacity.connections, settings.header_timeout_s, settings.body_timeout_s, app.state.metrics
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        backlog=capacity.accept_batch,
        http=guard.protocol_class(),  # uvicorn's h11, with deadlines and a connection bound around it
        ws="none",
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    rate_limit_logs()  # after uvicorn.Config, which configures logging
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then restores the handlers it found and
    # raises the signal again: these no-op handlers let the command end there, with exit code 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    Server(config).run()
    return 0


def run_produce(settings: ProduceSettings) -> int:
    from streamlearn.dev.produce import publish

    stop = _stop_event()
    sent = publish(settings, stopped=stop.is_set)
    if settings.predict_url:
        print(f"published {sent} labels to {settings.labels_topic}")
    else:
        print(f"published {sent} records to {settings.topic}")
    return 0


def run_dlq_inspect(settings: DlqInspectSettings) -> int:
    from streamlearn import kafka
    from streamlearn.train.dlq import describe, read_from

    kafka.check_reachable(settings.bootstrap, settings.kafka, settings.connect_timeout_s)
    topic = settings.dead_letter_topic
    letters = read_from(settings.bootstrap, settings.kafka, topic, limit=settings.limit)
    for message in letters:
        print(describe(message))
    print(f"{len(letters)} dead letters shown from {topic}")
    return 0


def run_dlq_replay(settings: DlqReplaySettings) -> int:
    from streamlearn import kafka
    from streamlearn.train.dlq import replay

    kafka.check_reachable(settings.bootstrap, settings.kafka, settings.connect_timeout_s)
    topic = settings.dead_letter_topic
    count = replay(settings.bootstrap, settings.kafka, topic, settings.to, settings.limit)
    print(f"replayed {count} dead letters from {topic} to {settings.to or 'their source topics'}")
    return 0


def run_status(settings: StatusSettings) -> int:
    from streamlearn.dev.status import show

    stop = _stop_event()
    if not show(settings.trainer, settings.server, settings.watch, settings.interval_s, stop.is_set):
        raise StreamlearnError(
            f"neither the trainer ({settings.trainer}) nor the server ({settings.server}) answers"
        )
    return 0


def run_up(settings: UpSettings) -> int:
    from streamlearn.dev.up import run_up as supervise

    return supervise(settings)


COMMANDS: dict[str, tuple[type[BaseModel], Callable[[Any], int], str]] = {
    "broker": (BrokerSettings, run_broker, "run the embedded Kafka-compatible broker in the foreground"),
    "train": (TrainSettings, run_train, "learn continuously from a topic and write snapshots"),
    "serve": (ServeSettings, run_serve, "serve predictions from the newest snapshots (KServe V1)"),
    "produce": (ProduceSettings, run_produce, "publish a synthetic, drifting demo stream"),
    "up": (
        UpSettings,
        run_up,
        "start the embedded broker (unless --bootstrap), trainer, server (and a demo)",
    ),
    "status": (
        StatusSettings,
        run_status,
        "show learning, drift, pipeline health and serving in the terminal",
    ),
    "dlq inspect": (DlqInspectSettings, run_dlq_inspect, "print the dead letters of a dead-letter topic"),
    "dlq replay": (
        DlqReplaySettings,
        run_dlq_replay,
        "republish dead letters, e.g. after fixing their producer",
    ),
}


def _add_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    for name, field in model.model_fields.items():
        if not is_flag(field):
            continue
        default = "required" if field.is_required() else f"default: {_shown(field.default)}"
        help_text = f"{field.description} [{default}; env STREAMLEARN_{name.upper()}]"
        if field.annotation is bool:
            parser.add_argument(
                flag(name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
            continue
        choices = _choices(field.annotation)
        metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
        parser.add_argument(flag(name), metavar=metavar, default=argparse.SUPPRESS, help=help_text)


def _choices(annotation: Any) -> list[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(arg) for arg in typing.get_args(annotation)]
    return []


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="streamlearn", description="Real-time learning from Kafka streams, served over HTTP."
    )
    parser.add_argument("--version", action="version", version=f"streamlearn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, Any] = {}  # 'dlq' -> its sub-command parsers
    for name, (model, _run, summary) in COMMANDS.items():
        group, _, leaf = name.rpartition(" ")
        if group and group not in groups:
            holder = commands.add_parser(group, help=f"{group} commands", description=f"{group} commands.")
            groups[group] = holder.add_subparsers(dest=f"{group}_command", metavar="COMMAND", required=True)
        sub = (groups[group] if group else commands).add_parser(leaf, help=summary, description=f"{summary}.")
        _add_flags(sub, model)
    return parser


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    if not first["loc"]:
        return message
    name = str(first["loc"][0])
    if first["type"] == "missing":
        return f"{flag(name)} is required (or set STREAMLEARN_{name.upper()})"
    return f"{flag(name)}: {message}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    command = "streamlearn"
    try:
        args = vars(parser.parse_args(argv))
        command = args.pop("command") or ""
        for group in {name.rpartition(" ")[0] for name in COMMANDS} - {""}:
            if command == group:
                command = f"{group} {args.pop(f'{group}_command')}"
        if not command:
            raise UsageError(f"streamlearn: choose a command: {', '.join(COMMANDS)} (see --help)")
        model, run, _summary = COMMANDS[command]
        try:
            settings = model(**args)
        except ValidationError as exc:
            raise UsageError(f"streamlearn {command}: {_one_line(exc)}") from None
        logging.basicConfig(
            level=getattr(settings, "log_level", "info").upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        for chatty in QUIET_LIBRARIES:
            logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
        return run(settings)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StreamlearnError as exc:
        print(f"streamlearn {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
