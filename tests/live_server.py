"""A real `streamlearn serve` process on a free loopback port, serving a freshly trained model."""

import contextlib
import resource
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from streamlearn.dev.broker import free_port
from streamlearn.models import build_model
from streamlearn.snapshots import LocalSnapshotStore
from streamlearn.train.optim import OptimizerSettings, make_optimizer
from streamlearn.train.trainer import Trainer, pick_device

from .conftest import concept_batch, make_spec, wait_for, write_snapshot


def write_trained_model(snapshot_dir: Path, name: str = "default") -> None:
    """A binary classifier on 3 features, trained a little, as the snapshot of `name`."""
    model = build_model(make_spec("binary", 3, "linear", classes=("no", "yes")))
    trainer = Trainer(model, make_optimizer(model, OptimizerSettings("adam", 0.05)), pick_device("cpu"))
    for seed in range(3):
        trainer.step(concept_batch(64, "binary", 3, seed=seed))
    write_snapshot(LocalSnapshotStore(snapshot_dir), name, trainer, records=192)


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def live_server(
    snapshot_dir: Path, log_path: Path, *flags: str, open_files: tuple[int, int] | None = None
) -> Iterator[str]:
    """Run the server until the block ends; its output goes to `log_path`; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "streamlearn", "serve", "--snapshot-dir", str(snapshot_dir)]
    limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, open_files)) if open_files else None
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, "--port", str(port), *flags], stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: process.poll() is not None or _ready(base), 60, what="the server to be ready")
        assert process.poll() is None, log_path.read_text()
        yield base
    finally:
        process.terminate()
        process.wait(10)
