"""The command line: help for every flag, and user errors as one line with a non-zero exit."""

import socket
import subprocess
import sys

import pytest

from streamlearn.cli import COMMANDS, build_parser, main


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamlearn", *args], capture_output=True, text=True, timeout=timeout
    )


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
        (["train", "--task", "binary", "--bogus", "1"], "unrecognized arguments: --bogus"),
        (["serve", "--port", "70000"], "--port: Input should be less than or equal to 65535"),
        (["produce", "--stream", "nope"], "--stream: Input should be"),
        ([], "choose a command"),
        (["launch"], "invalid choice"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_an_unreachable_broker_is_one_line_and_exit_1(tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    result = run_cli(
        "train",
        "--task",
        "binary",
        "--bootstrap",
        f"127.0.0.1:{port}",
        "--snapshot-dir",
        str(tmp_path),
        "--metrics-port",
        "0",
    )
    assert result.returncode == 1
    assert f"cannot reach Kafka at 127.0.0.1:{port}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_unwritable_snapshot_dir_is_one_line_and_exit_1(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_cli("train", "--task", "binary", "--snapshot-dir", str(blocker / "snaps"))
    assert result.returncode == 1
    assert "is not writable" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_missing_bucket_is_one_line_and_exit_1(s3_endpoint):
    result = run_cli("train", "--task", "binary", "--snapshot-dir", "s3://no-such-bucket-here/snapshots")
    assert result.returncode == 1
    assert "s3://no-such-bucket-here/snapshots is not writable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--port", str(port), "--snapshot-dir", str(tmp_path))
    assert result.returncode == 1
    assert f"cannot use 127.0.0.1:{port} for the prediction server" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_environment_variables_feed_the_flags(monkeypatch):
    monkeypatch.setenv("STREAMLEARN_LR", "-3")
    result = run_cli("train", "--task", "binary")
    assert result.returncode == 2 and "--lr" in result.stderr


def test_parser_builds_every_command():
    parser = build_parser()
    args = vars(parser.parse_args(["train", "--task", "binary", "--hidden", "8,8"]))
    assert args == {"command": "train", "task": "binary", "hidden": "8,8"}
