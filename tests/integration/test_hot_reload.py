"""Hot reload under concurrent requests, against a real `streamlearn serve` process."""

import functools
import subprocess
import sys
import threading

import httpx
import pytest
import torch

from streamlearn.dev.broker import free_port
from streamlearn.models import ModelSpec
from streamlearn.records import FeatureSpec, LabelSpec
from streamlearn.snapshots import LocalSnapshotStore

from ..conftest import concept_batch, wait_for, write_snapshot
from ..test_server import trained

SPEC = ModelSpec(LabelSpec.create("regression"), FeatureSpec(3), "linear")
INSTANCE = [[1.5, -2.0, 0.25]]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlearn", "serve", "--snapshot-dir", str(tmp_path), "--port", str(port),
         "--reload-interval-s", "0.05", "--log-level", "warning"],
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(base + "/healthz"), 30, what="server up")
    yield base, LocalSnapshotStore(tmp_path)
    process.terminate()
    assert process.wait(30) == 0


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _served(responses: list[tuple[int, dict]], version: int) -> bool:
    return any(body.get("model_version") == version for _, body in responses[-20:])


def test_no_request_fails_or_mixes_versions_while_snapshots_swap(server):
    base, store = server
    trainer = trained(SPEC)
    expected: dict[int, float] = {}

    def publish_version() -> None:
        snapshot = write_snapshot(store, "default", trainer, records=len(expected))
        expected[snapshot.version] = trainer.model.predict_batch(torch.tensor(INSTANCE)).values.item()
        trainer.step(concept_batch(64, "regression", seed=snapshot.version))

    publish_version()
    wait_for(lambda: httpx.get(base + "/readyz").status_code == 200, 30, what="ready")
    responses: list[tuple[int, dict]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=base, timeout=10) as http:
            while not stop.is_set():
                response = http.post("/v1/models/default:predict", json={"instances": INSTANCE})
                responses.append((response.status_code, response.json()))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    for _ in range(15):
        publish_version()
        wait_for(functools.partial(_served, responses, max(expected)), 30, what="the new version served")
    stop.set()
    for thread in clients:
        thread.join(30)

    assert len(responses) > 100
    assert all(code == 200 for code, _ in responses), {code for code, _ in responses}
    seen_versions = {body["model_version"] for _, body in responses}
    assert len(seen_versions) >= 10  # the swaps really happened under load
    for _, body in responses:
        # each answer is exactly what its own version predicts: no mix of two versions
        assert body["predictions"][0] == pytest.approx(expected[body["model_version"]], rel=1e-5, abs=1e-6)
