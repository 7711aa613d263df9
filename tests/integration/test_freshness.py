"""Push-based freshness against a real broker: the trainer announces each snapshot, servers follow
the announcements (and fall back to polling the store when Kafka is away); pins reach every replica."""

import contextlib
import itertools
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson

from streamlearn.announcements import Announcement, decode
from streamlearn.dev.broker import free_port
from streamlearn.dev.streams import records
from streamlearn.snapshots import LocalSnapshotStore

from ..conftest import wait_for
from ..live_server import live_server
from .conftest import publish, read_topic

TOKEN = "announce-token-0123456789"
NO_POLLING = ("--reload-interval-s", "60", "--store-poll-s", "3600")  # only announcements bring news


def _metric(base: str, name: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return float("nan")


def _version(base: str) -> int:
    answer = httpx.post(f"{base}/v1/models/default:predict", json={"instances": [[0.5, 0.5, 0.5]]}, timeout=5)
    return answer.json()["model_version"] if answer.status_code == 200 else 0


def _events(count: int, seed: int = 0) -> list[bytes]:
    return [orjson.dumps(record) for record in itertools.islice(records("sea", seed=seed), count)]


@contextlib.contextmanager
def _servers(snapshots: Path, tmp_path: Path, count: int, *flags: str) -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(live_server(snapshots, tmp_path / f"server-{i}.log", *flags))
            for i in range(count)
        ]


def test_servers_follow_the_trainers_announcements(bootstrap, make_topic, start_trainer, tmp_path):
    topic, announcements = make_topic(), f"announce-{make_topic()}"
    snapshots = tmp_path / "snapshots"
    store = LocalSnapshotStore(snapshots)
    trainer = start_trainer(topic, task="binary", announce_topic=announcements, snapshot_interval_s=0.3)
    publish(bootstrap, topic, _events(200))
    wait_for(lambda: trainer.metric("streamlearn_snapshot_announcements_total", {"outcome": "sent"}) >= 1)
    flags = ("--bootstrap-servers", bootstrap, "--announce-topic", announcements, *NO_POLLING)
    with _servers(snapshots, tmp_path, 2, *flags) as bases:
        for base in bases:
            wait_for(lambda b=base: _metric(b, "streamlearn_announcements_following") == 1, what="following")
        for round in (1, 2):  # the trainer learns, snapshots and announces
            newest = max(store.versions("default"))
            publish(bootstrap, topic, _events(200, seed=round))
            wait_for(lambda n=newest: max(store.versions("default")) > n, what="a new snapshot")
            for base in bases:  # with polling off, only an announcement can bring the newer version
                wait_for(lambda b=base, n=newest: _version(b) > n, what="the announced version served")
        for base in bases:
            assert _metric(base, 'streamlearn_snapshot_serve_delay_seconds_count{source="announcement"}') >= 2
    sent = [decode(message.value()) for message in read_topic(bootstrap, announcements)]
    assert all(isinstance(a, Announcement) and a.model == "default" for a in sent)
    assert [a.version for a in sent] == sorted(a.version for a in sent)  # in publication order
    trainer.stop()


def test_without_kafka_the_server_polls_the_store(tmp_path):
    from ..live_server import write_trained_model

    snapshots = tmp_path / "snapshots"
    write_trained_model(snapshots)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    flags = ("--bootstrap-servers", dead, "--reload-interval-s", "0.05", "--store-poll-s", "3600")
    with live_server(snapshots, tmp_path / "server.log", *flags) as base:
        assert _version(base) == 1
        write_trained_model(snapshots)
        wait_for(lambda: _version(base) == 2, what="a polled version served")
        assert _metric(base, "streamlearn_announcements_following") == 0


def test_a_pin_on_one_replica_reaches_the_others_at_once(bootstrap, make_topic, tmp_path):
    from ..live_server import write_trained_model

    announcements = make_topic()  # as a trainer would have created it
    snapshots = tmp_path / "snapshots"
    for _ in range(3):
        write_trained_model(snapshots)
    flags = ("--bootstrap-servers", bootstrap, "--announce-topic", announcements)
    env_token = ("--admin-token-file", str(tmp_path / "token"))
    (tmp_path / "token").write_text(TOKEN)
    with _servers(snapshots, tmp_path, 2, *flags, *NO_POLLING, *env_token) as bases:
        for base in bases:
            wait_for(lambda b=base: _metric(b, "streamlearn_announcements_following") == 1, what="following")
            assert _version(base) == 3
        answer = httpx.post(
            f"{bases[0]}/admin/models/default/rollback",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
        assert answer.status_code == 200 and answer.json()["pinned"] == 2, answer.text
        wait_for(lambda: _version(bases[1]) == 2, what="the other replica to follow the rollback")
        assert TOKEN not in (tmp_path / "server-0.log").read_text()
