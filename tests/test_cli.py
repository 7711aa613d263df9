"""The command line: help for every flag, and user errors as one line with a non-zero exit.

The error paths run `main()` in this process; two tests run the real `python -m streamlearn`.
"""

import signal
import socket
import subprocess
import sys

import pytest

from streamlearn.cli import COMMANDS, build_parser, main


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamlearn", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(autouse=True)
def signal_handlers_kept():
    """Commands install SIGINT/SIGTERM handlers; put pytest's back after each test."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture
def cli(capsys):
    """Run `streamlearn ARGS` in this process: its exit code and its stderr."""

    def run(*args: str) -> tuple[int, str]:
        code = main(list(args))
        return code, capsys.readouterr().err

    return run


def closed_port() -> int:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        return closed.getsockname()[1]


def one_line(stderr: str) -> bool:
    return len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_documents_every_setting_and_its_variable(command, capsys):
    model = COMMANDS[command][0]
    with pytest.raises(SystemExit) as exited:
        main([*command.split(), "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in model.model_fields:
        if name == "kafka":
            continue
        assert "--" + name.replace("_", "-") in text
        assert f"STREAMLEARN_{name.upper()}" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train"], "--task is required"),
        (["train", "--task", "binary", "--lr", "-1"], "--lr: Input should be greater than 0"),
        (
            ["train", "--task", "binary", "--batch-size", "lots"],
            "--batch-size: Input should be a valid integer",
        ),
        (["train", "--task", "weird"], "--task: Input should be"),
        (  # before any connection: the broker named does not exist
            ["train", "--task", "binary", "--arch", "nope", "--bootstrap", "127.0.0.1:1"],
            "--arch: unknown architecture 'nope'; known: linear, mlp",
        ),
        (["train", "--task", "binary", "--bogus", "1"], "unrecognized arguments: --bogus"),
        (["serve", "--port", "70000"], "--port: Input should be less than or equal to 65535"),
        (["produce", "--stream", "nope"], "--stream: Input should be"),
        (["dlq", "inspect", "--dlq-topic", ""], "--dlq-topic: name the dead-letter topic"),
        (["up", "--metrics-port", "0"], "--metrics-port 0 would hide the trainer's progress"),
        ([], "choose a command"),
        (["launch"], "invalid choice"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(cli, args, message):
    code, stderr = cli(*args)
    assert code == 2
    assert message in stderr
    assert one_line(stderr)


def test_an_unreachable_broker_is_one_line_and_exit_1(cli, tmp_path):
    port = closed_port()
    code, stderr = cli(
        "train",
        "--task",
        "binary",
        "--bootstrap",
        f"127.0.0.1:{port}",
        "--connect-timeout-s",
        "0.5",
        "--snapshot-dir",
        str(tmp_path),
        "--metrics-port",
        "0",
    )
    assert code == 1
    assert f"cannot reach Kafka at 127.0.0.1:{port} within 0.5s" in stderr
    assert one_line(stderr)


def test_an_unwritable_snapshot_dir_is_one_line_and_exit_1(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, stderr = cli("train", "--task", "binary", "--snapshot-dir", str(blocker / "snaps"))
    assert code == 1
    assert "is not writable" in stderr and one_line(stderr)


def test_a_missing_bucket_is_one_line_and_exit_1(cli, s3_endpoint):
    code, stderr = cli("train", "--task", "binary", "--snapshot-dir", "s3://no-such-bucket-here/snapshots")
    assert code == 1
    assert "s3://no-such-bucket-here/snapshots is not writable" in stderr
    assert one_line(stderr)


def test_a_port_in_use_is_one_line_and_exit_1(cli, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, stderr = cli("serve", "--port", str(port), "--snapshot-dir", str(tmp_path))
    assert code == 1
    assert f"cannot use 127.0.0.1:{port} for the prediction server" in stderr
    assert one_line(stderr)


def test_environment_variables_feed_the_flags(cli, monkeypatch):
    monkeypatch.setenv("STREAMLEARN_LR", "-3")
    code, stderr = cli("train", "--task", "binary")
    assert code == 2 and "--lr" in stderr


def test_the_entry_point_reports_a_usage_error_as_one_line_and_exit_2():
    result = run_cli("train", "--task", "binary", "--bogus", "1")
    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr and one_line(result.stderr)


def test_the_entry_point_reports_a_failure_as_one_line_and_exit_1():
    trainer, server = (f"http://127.0.0.1:{closed_port()}" for _ in range(2))
    result = run_cli("status", "--trainer", trainer, "--server", server)
    assert result.returncode == 1
    assert f"neither the trainer ({trainer}) nor the server ({server}) answers" in result.stderr
    assert one_line(result.stderr)


def test_parser_builds_every_command():
    parser = build_parser()
    args = vars(parser.parse_args(["train", "--task", "binary", "--hidden", "8,8"]))
    assert args == {"command": "train", "task": "binary", "hidden": "8,8"}
