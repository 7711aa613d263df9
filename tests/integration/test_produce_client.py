"""`streamlearn produce --predict-url` against a real server and broker: each label follows a
served and logged prediction, in the same partition, once, after the delays asked for."""

import math

import orjson
import pytest

from streamlearn.config import ProduceSettings
from streamlearn.dev.client import play
from streamlearn.dev.streams import records

from ..conftest import wait_for
from ..live_server import live_server, write_trained_model
from .conftest import read_topic

MURMUR2_M, MURMUR2_SEED = 0x5BD1E995, 0x9747B28C


def murmur2(data: bytes) -> int:
    """The Java client's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), unsigned."""
    n = len(data)
    h = (MURMUR2_SEED ^ n) & 0xFFFFFFFF
    for i in range(0, n - n % 4, 4):
        k = (int.from_bytes(data[i : i + 4], "little") * MURMUR2_M) & 0xFFFFFFFF
        k = ((k ^ (k >> 24)) * MURMUR2_M) & 0xFFFFFFFF
        h = ((h * MURMUR2_M) & 0xFFFFFFFF) ^ k
    tail = data[n - n % 4 :]
    if len(tail) >= 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h = ((h ^ tail[0]) * MURMUR2_M) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * MURMUR2_M) & 0xFFFFFFFF
    return h ^ (h >> 15)


def java_partition(key: bytes, partitions: int) -> int:
    """The partition the Java client's default partitioner gives a key."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


@pytest.mark.parametrize(
    ("key", "partition"),
    [(b"", 681), (b"a", 524), (b"ab", 434), (b"abc", 107), (b"123456789", 566), (b"\x00 ", 742)],
)
def test_the_murmur2_here_is_the_java_clients(key, partition):
    assert java_partition(key, 1000) == partition  # values the Java client gives


def test_each_label_follows_its_logged_prediction_in_the_same_partition(bootstrap, make_topic, tmp_path):
    partitions, n, loss, mean_delay_s = 3, 400, 0.2, 0.1
    log_topic, labels_topic = make_topic(partitions), make_topic(partitions)
    snapshots = tmp_path / "snapshots"
    write_trained_model(snapshots)
    flags = ("--bootstrap-servers", bootstrap, "--prediction-log-topic", log_topic)
    with live_server(snapshots, tmp_path / "server.log", *flags) as base:
        settings = ProduceSettings(
            stream="sea", bootstrap=bootstrap, predict_url=base, labels_topic=labels_topic, count=n,
            rate=2000, label_delay_s=mean_delay_s, label_loss=loss,
        )  # fmt: skip
        tally = play(settings)
        logged = wait_for(lambda: _read(bootstrap, log_topic, n), 30, 0.2, what=f"{n} logged predictions")
    assert tally.asked == tally.served == n and tally.labels_dropped == 0
    labels = _read(bootstrap, labels_topic, tally.labels_published)
    assert labels is not None and len(labels) == tally.labels_published  # each label once

    # the share of labels: binomial, n trials of 1 - loss
    spread = 5 * math.sqrt(n * loss * (1 - loss))
    assert n * (1 - loss) - spread <= len(labels) <= n * (1 - loss) + spread

    # each label joins its prediction: same id, same partition, both where murmur2 puts the id
    truth = {_rounded(r["features"]): r["label"] for r in _first(n + 50)}
    for prediction_id, (partition, label) in labels.items():
        assert prediction_id in logged
        log_partition, prediction = logged[prediction_id]
        assert partition == log_partition == java_partition(prediction_id.encode(), partitions)
        assert label["id"] == prediction_id and label["label"] == truth[_rounded(prediction["features"])]
    assert {p for p, _v in logged.values()} == set(range(partitions))

    # the delays: from the server's receive time to the label's, never negative, their mean near
    # the mean asked for (an exponential's sd is its mean; a few ms of requests and polling on top)
    delays_s = [(label["ts"] - logged[i][1]["ts"]) / 1000 for i, (_p, label) in labels.items()]
    assert min(delays_s) >= 0
    mean = sum(delays_s) / len(delays_s)
    assert abs(mean - mean_delay_s) <= 5 * mean_delay_s / math.sqrt(len(delays_s)) + 0.02


def _read(bootstrap: str, topic: str, count: int) -> dict[str, tuple[int, dict]] | None:
    """{key: (partition, value)} of the topic once it holds `count` messages (each key once)."""
    messages = read_topic(bootstrap, topic)
    if len(messages) < count:
        return None
    found = {m.key().decode(): (m.partition(), orjson.loads(m.value())) for m in messages}
    assert len(found) == len(messages), "a key published twice"
    return found


def _first(n: int) -> list[dict]:
    stream = records("sea", 0, 5000)
    return [next(stream) for _ in range(n)]


def _rounded(features: list[float]) -> tuple[float, ...]:
    return tuple(round(x, 4) for x in features)  # the server logs float32s: 4 decimals recover them
