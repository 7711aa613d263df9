"""Versions you control: pins, unpins and rollbacks through the admin API, the promotion gate,
and both kept in the store across restarts and replicas."""

import shutil

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from streamlearn.cli import main
from streamlearn.config import ServeSettings
from streamlearn.serve.app import create_app
from streamlearn.serve.gate import PromotionGate, recent_loss
from streamlearn.snapshots import LocalSnapshotStore

from .conftest import wait_for, write_snapshot
from .test_server import BINARY, trained

TOKEN = "s3cret-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
INSTANCE = {"instances": [[1.0, 2.0, 3.0]]}


@pytest.fixture
def store(tmp_path):
    return LocalSnapshotStore(tmp_path, keep=3)


def publish(store, loss: float | None = None, name: str = "default") -> int:
    """A new snapshot of `name` whose recent prequential loss is `loss`."""
    trainer = trained(BINARY, steps=2)
    if loss is not None:
        trainer.scores.faded_loss[1000] = loss
    return write_snapshot(store, name, trainer, records=128).version


def serve(store, **settings) -> TestClient:
    values = {"snapshot_dir": store.root, "reload_interval_s": 0.02, **settings}
    return TestClient(create_app(ServeSettings(**values), CollectorRegistry()))


def served_version(client: TestClient, name: str = "default") -> int | None:
    response = client.post(f"/v1/models/{name}:predict", json=INSTANCE)
    return response.json()["model_version"] if response.status_code == 200 else None


def metric(client: TestClient, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_the_admin_api_is_absent_without_a_token(store):
    publish(store)
    with serve(store) as client:
        wait_for(lambda: served_version(client) == 1)
        answer = client.post("/admin/models/default/rollback", headers=AUTH)
        assert answer.status_code == 404 and "error" in answer.json()
        assert not any(path.startswith("/admin") for path in client.get("/openapi.json").json()["paths"])


def test_the_admin_api_refuses_a_missing_or_wrong_token(store):
    publish(store), publish(store)
    with serve(store, admin_token=TOKEN) as client:
        wait_for(lambda: served_version(client) == 2)
        missing = client.post("/admin/models/default/rollback")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert "Bearer" in missing.json()["error"]
        for wrong in (TOKEN[:-1], TOKEN + "x", "", "x" * len(TOKEN)):
            answer = client.post(
                "/admin/models/default/rollback", headers={"Authorization": f"Bearer {wrong}"}
            )
            assert answer.status_code in (401, 403) and "error" in answer.json(), wrong
        basic = client.post("/admin/models/default/rollback", headers={"Authorization": f"Basic {TOKEN}"})
        assert basic.status_code == 401
        assert served_version(client) == 2  # nothing changed


def test_pin_holds_a_version_until_unpinned_and_rollback_goes_back_one(store):
    for _ in range(3):
        publish(store)
    with serve(store, admin_token=TOKEN) as client:
        wait_for(lambda: served_version(client) == 3)
        pinned = client.post("/admin/models/default/pin", json={"version": 1}, headers=AUTH)
        assert pinned.status_code == 200, pinned.json()
        assert pinned.json() == {"name": "default", "served": 1, "pinned": 1, "versions": [1, 2, 3]}
        assert served_version(client) == 1 and metric(client, "streamlearn_pinned_model_version") == 1
        publish(store)  # v4 appears, and is not served while pinned
        wait_for(lambda: 4 in client.get("/v1/models/default/versions").json()["versions"])
        client.get("/healthz")  # a poll or two later, still v1
        assert served_version(client) == 1
        assert client.get("/v1/models/default").json()["pinned"] == 1

        unpinned = client.post("/admin/models/default/unpin", headers=AUTH)
        assert unpinned.status_code == 200 and unpinned.json()["pinned"] is None
        assert served_version(client) == 4 and metric(client, "streamlearn_pinned_model_version") == 0

        rolled = client.post("/admin/models/default/rollback", headers=AUTH)
        assert rolled.status_code == 200, rolled.json()
        assert rolled.json()["served"] == 1 and rolled.json()["pinned"] == 1  # v1 was served before v4
        assert served_version(client) == 1
        again = client.post("/admin/models/default/rollback", headers=AUTH)  # further back: none left
        assert again.status_code == 409 and served_version(client) == 1


def test_admin_errors_are_json_with_their_status(store):
    publish(store)
    with serve(store, admin_token=TOKEN) as client:
        wait_for(lambda: served_version(client) == 1)
        absent = client.post("/admin/models/default/pin", json={"version": 9}, headers=AUTH)
        assert absent.status_code == 404 and "no version 9" in absent.json()["error"]
        unknown = client.post("/admin/models/nope/pin", json={"version": 1}, headers=AUTH)
        assert unknown.status_code == 404 and "error" in unknown.json()
        invalid = client.post("/admin/models/default/pin", json={"version": 0}, headers=AUTH)
        assert invalid.status_code == 422 and "error" in invalid.json()
        first = client.post("/admin/models/default/rollback", headers=AUTH)
        assert first.status_code == 409 and "earlier" in first.json()["error"]


@pytest.mark.parametrize(
    "body",
    [{"version": True}, {"version": "1"}, {"version": 1.0}, {"version": 1, "force": True}, {"version": None}],
)
def test_a_pin_takes_a_json_integer_version_and_nothing_else(store, body):
    publish(store)
    publish(store)
    with serve(store, admin_token=TOKEN) as client:
        wait_for(lambda: served_version(client) == 2)
        refused = client.post("/admin/models/default/pin", json=body, headers=AUTH)
        assert refused.status_code == 422 and "error" in refused.json()
        assert client.get("/v1/models/default").json()["pinned"] is None
        assert served_version(client) == 2


def test_a_pin_survives_a_restart_is_shared_by_replicas_and_is_never_pruned(store):
    for _ in range(3):
        publish(store)
    with serve(store, admin_token=TOKEN) as first, serve(store) as second:
        wait_for(lambda: served_version(first) == 3 and served_version(second) == 3)
        assert first.post("/admin/models/default/pin", json={"version": 2}, headers=AUTH).status_code == 200
        wait_for(lambda: served_version(second) == 2, what="the other replica to follow the pin")
    for _ in range(4):  # keep=3: v2 would be long gone were it not pinned
        publish(store)
    assert 2 in store.versions("default") and store.versions("default")[-1] == 7
    with serve(store) as restarted:
        wait_for(lambda: served_version(restarted) is not None)
        assert served_version(restarted) == 2


def predictions(client: TestClient) -> tuple[int, list]:
    answer = client.post("/v1/models/default:predict", json=INSTANCE).json()
    return answer["model_version"], answer["predictions"]


def test_replicas_agree_after_the_served_version_is_deleted(store):
    """A deleted version's number is never published again: a replica that kept the deleted
    weights and a fresh one never both answer with one number and different predictions."""
    for _ in range(3):
        publish(store)
    with serve(store) as running:
        wait_for(lambda: served_version(running) == 3)
        shutil.rmtree(store.root / "default" / f"{3:012d}")  # an operator deletes the served version
        assert running.get("/healthz").status_code == 200 and served_version(running) == 3  # keeps it
        assert publish(store) == 4  # a different model, under a new number
        wait_for(lambda: served_version(running) == 4, what="the running replica to take v4")
        with serve(store) as fresh:
            wait_for(lambda: served_version(fresh) == 4, what="a fresh replica to serve v4")
            assert predictions(fresh) == predictions(running)


def test_the_gate_holds_a_worse_snapshot_and_promotes_a_good_one(store):
    publish(store, loss=0.30)
    with serve(store, promotion_tolerance=0.05) as client:
        wait_for(lambda: served_version(client) == 1)
        publish(store, loss=0.50)  # much worse: held
        wait_for(lambda: client.get("/v1/models/default").json()["held"] is not None, what="a hold")
        status = client.get("/v1/models/default").json()
        assert status["version"] == 1 and status["held"]["version"] == 2
        assert status["held"]["candidate_loss"] == pytest.approx(0.50)
        assert status["held"]["served_loss"] == pytest.approx(0.30)
        assert served_version(client) == 1
        assert metric(client, "streamlearn_promotion_held_version") == 2
        assert metric(client, "streamlearn_promotion_held_seconds") >= 0
        assert store.serving_state("default").held_against == 1

    with serve(store, promotion_tolerance=0.05) as restarted:  # the hold survives a restart
        wait_for(lambda: restarted.get("/v1/models/default").json().get("held") is not None)
        assert served_version(restarted) == 1
        publish(store, loss=0.31)  # within 5% of the served 0.30: promoted
        wait_for(lambda: served_version(restarted) == 3, what="the promotion")
        assert restarted.get("/v1/models/default").json()["held"] is None
        assert metric(restarted, "streamlearn_promotion_held_version") == 0
        assert metric(restarted, "streamlearn_promotion_held_seconds") == 0
    assert store.serving_state("default").held_against is None


def test_turning_the_gate_off_lets_a_held_version_go(store):
    publish(store, loss=0.30)
    with serve(store, promotion_tolerance=0.05) as client:
        wait_for(lambda: served_version(client) == 1)
        publish(store, loss=0.50)
        wait_for(lambda: store.serving_state("default").held_against == 1, what="a hold kept")
    with serve(store) as ungated:
        wait_for(lambda: served_version(ungated) == 2, what="the newest served without the gate")
    assert store.serving_state("default").held_against is None


def test_without_the_gate_every_snapshot_is_served(store):
    publish(store, loss=0.30)
    with serve(store) as client:
        wait_for(lambda: served_version(client) == 1)
        publish(store, loss=5.0)
        wait_for(lambda: served_version(client) == 2)


def test_the_gate_compares_recent_prequential_losses(store):
    publish(store, loss=0.2), publish(store, loss=0.2099), publish(store, loss=0.2101)
    metas = [store.meta("default", version) for version in (1, 2, 3)]
    gate = PromotionGate(0.05)
    assert recent_loss(metas[0]) == pytest.approx(0.2)
    assert gate.judge(metas[1], metas[0]).promote
    verdict = gate.judge(metas[2], metas[0])
    assert not verdict.promote and "worse than the served" in verdict.reason
    assert PromotionGate(0.0).judge(metas[0], metas[0]).promote


def test_admin_token_settings_are_checked(tmp_path, capsys):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert ServeSettings(admin_token_file=token_file).admin_secret == TOKEN
    assert TOKEN not in repr(ServeSettings(admin_token=TOKEN))
    assert "admin_token" not in ServeSettings(admin_token=TOKEN).model_dump()
    for flags, message in [
        (["--admin-token", "short"], "at least 16 characters"),
        (["--admin-token", TOKEN, "--admin-token-file", str(token_file)], "not both"),
        (["--admin-token-file", str(tmp_path / "missing")], "cannot read the admin token file"),
        (["--promotion-tolerance", "-1"], "--promotion-tolerance"),
    ]:
        assert main(["serve", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and TOKEN not in err


def test_a_corrupt_serving_file_prunes_nothing_and_keeps_the_pin_served(store):
    for _ in range(3):
        publish(store)
    with serve(store, admin_token=TOKEN) as client:
        wait_for(lambda: served_version(client) == 3)
        assert client.post("/admin/models/default/pin", json={"version": 1}, headers=AUTH).status_code == 200
        (store.root / "default" / "serving.json").write_text("{not json")
        for _ in range(3):  # keep=3, and the pin is unreadable: nothing may be pruned
            publish(store)
        assert store.versions("default") == [1, 2, 3, 4, 5, 6]
        wait_for(lambda: 6 in client.get("/v1/models/default/versions").json()["versions"])
        assert served_version(client) == 1  # the pin last read still holds
        assert metric(client, "streamlearn_pinned_model_version") == 1


def test_hostile_announcements_are_refused_before_they_reach_the_store():
    from streamlearn.announcements import decode

    assert decode(b'{"model": "default", "version": 3}') is not None
    for value in (
        b'{"model": "../elsewhere/evil", "version": 1}',
        b'{"model": "/etc", "version": 1}',
        b'{"model": "default", "version": 0}',
        b'{"model": "default", "version": 99999999999999999999}',
        b'{"model": "default", "version": "3"}',
        b"\xff\xfe",
        None,
    ):
        assert decode(value) is None, value


def test_the_gate_ignores_training_metadata_it_cannot_read(store):
    version = publish(store, loss=0.3)
    meta = store.meta("default", version)
    for training in ({"prequential": None}, {"prequential": {"faded_loss": {"1000": "x"}}}, {"x": 1}, None):
        assert recent_loss(meta.model_copy(update={"training": training})) is None
    assert (
        recent_loss(meta.model_copy(update={"training": {"prequential": {"faded_loss": {"1000": 1e400}}}}))
        is None
    )
