"""Factory fixtures shared by the unit tests."""

import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import fsspec
import numpy as np
import pytest

from streamlearn.config import TrainSettings
from streamlearn.decoding import DecodedBatch
from streamlearn.dev.broker import free_port
from streamlearn.models import ModelSpec, build_model
from streamlearn.records import FeatureSpec, LabelSpec
from streamlearn.train.optim import OptimizerSettings, make_optimizer
from streamlearn.train.trainer import Trainer, pick_device


def make_spec(task: str = "binary", n_features: int = 3, arch: str = "linear", **labels) -> ModelSpec:
    if task == "multiclass" and not labels:
        labels = {"num_classes": 3}
    label_spec = LabelSpec.create(task, **labels)
    settings = TrainSettings(task="binary", arch=arch, hidden=(16,))  # each architecture's defaults
    return ModelSpec.create(label_spec, FeatureSpec(n_features), arch, settings)


def concept_batch(n: int, task: str = "binary", n_features: int = 3, seed: int = 0) -> DecodedBatch:
    """A learnable concept: a fixed linear rule on standard-normal features (scaled and shifted)."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(n, n_features))
    score = raw @ np.linspace(1.0, -1.0, n_features)
    if task == "regression":
        labels = (3 * score + 1).astype(np.float32)
    elif task == "binary":
        labels = (score > 0).astype(np.float32)
    else:
        labels = np.digitize(score, [-0.5, 0.5]).astype(np.int64)
    features = (raw * 10 + 100).astype(np.float32)  # far from standardized: the normalizer must work
    return DecodedBatch(features, labels, np.ones(n, dtype=np.float32))


# Subprocesses the tests start run in a temporary directory (below): a relative PYTHONPATH
# (PYTHONPATH=service) must still name the code under test there.
if os.environ.get("PYTHONPATH"):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        os.path.abspath(entry) for entry in os.environ["PYTHONPATH"].split(os.pathsep) if entry
    )


@pytest.fixture(scope="session", autouse=True)
def _session_elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Session and module fixtures (servers, brokers) run outside the checkout too."""
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _hermetic(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test, and every command it starts, runs in its own empty directory (not its tmp_path,
    which it may list): defaults relative to the working directory (snapshots/, .streamlearn/) are
    never the checkout's, nor another test's."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture
def make_trainer() -> Callable[..., Trainer]:
    def factory(
        task: str = "binary", arch: str = "linear", lr: float = 0.05, optimizer: str = "adam", **kw
    ) -> Trainer:
        model = build_model(make_spec(task, arch=arch))
        return Trainer(
            model, make_optimizer(model, OptimizerSettings(optimizer, lr)), pick_device("cpu"), **kw
        )

    return factory


def write_snapshot(store, name: str, trainer: Trainer, records: int = 0, offsets=None):
    """Write a snapshot exactly as the pipeline does."""
    from streamlearn.train.checkpoint import snapshot_content

    tensors, meta = snapshot_content(trainer, records, offsets or {}, {"test": True})
    return store.save(name, tensors, meta)


def wait_for(condition, timeout_s: float = 30.0, interval_s: float = 0.05, what: str = "condition"):
    """Poll `condition` until it returns something truthy; fail after `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


def start_s3_server() -> tuple[subprocess.Popen, str]:
    """moto's S3 in server mode on a free loopback port, answering; and its URL."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(f"{url}/moto-api/"), 60, what="the S3 server")
    return server, url


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A local S3-compatible server (moto in server mode) on a free loopback port.

    The AWS variables point this process, and the processes it starts, at it.
    """
    server, url = start_s3_server()
    env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL_S3": url}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield url
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.terminate()
        server.wait(10)


def new_bucket() -> str:
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
    return bucket


@pytest.fixture
def s3_url(s3_endpoint) -> str:
    """s3://<a new bucket>/snapshots on the local S3 server."""
    return f"s3://{new_bucket()}/snapshots"
