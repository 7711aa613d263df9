"""`streamlearn status`: the terminal picture read from the trainer's and the server's /metrics."""

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from streamlearn.dev.status import by_label, parse, quantile, render, value
from streamlearn.metrics import ServerMetrics, TrainerMetrics


def page(metrics: TrainerMetrics | ServerMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_label_values_are_read_by_name_not_by_position():
    trainer = TrainerMetrics(CollectorRegistry())
    trainer.drift_score.labels("page_hinkley").set(0.5)
    trainer.drift_detections.labels("adwin").inc(3)
    trainer.records_invalid.labels("bad_json").inc(2)
    trainer.prequential_accuracy.labels("1000").set(0.875)
    samples = parse(page(trainer))
    assert by_label(samples, "streamlearn_drift_score", "detector") == {"page_hinkley": 0.5}
    assert value(samples, "streamlearn_prequential_accuracy_ratio", window="1000") == 0.875
    assert value(samples, "streamlearn_prequential_accuracy_ratio", window="10000") is None
    text = render(samples, None)
    assert "page_hinkley 0.5" in text and "adwin 3" in text and "bad_json 2" in text
    assert "last 1k 0.875" in text and "server: not reachable" in text


def test_serving_counts_errors_by_status_code_and_shows_each_model():
    server = ServerMetrics(CollectorRegistry())
    for code, count in (("200", 7), ("422", 2), ("503", 1)):
        server.predict_requests.labels("fraud", code).inc(count)
    server.served_version.labels("fraud").set(12)
    server.ready.set(1)
    for seconds in (0.001, 0.002, 0.02, 0.2):
        server.predict_latency.labels("fraud").observe(seconds)
    samples = parse(page(server))
    text = render(None, samples)
    assert "predict requests  10   errors 3" in text
    assert "ready             yes   fraud v12" in text
    # Two of four observations fall in the 1-2.5 ms bucket: the median is at its upper edge.
    assert quantile(samples, "streamlearn_predict_latency_seconds", 0.5) == pytest.approx(0.0025)
    assert "trainer: not reachable" in text


def test_serving_shows_pins_holds_and_how_new_snapshots_arrive():
    server = ServerMetrics(CollectorRegistry())
    server.served_version.labels("fraud").set(12)
    server.pinned_version.labels("fraud").set(12)
    server.promotion_held.labels("churn").set(40)
    server.promotion_held_seconds.labels("churn").set(95)
    server.promotion_held.labels("fraud").set(0)
    text = render(None, parse(page(server)))
    assert "new snapshots     polled from the store" in text
    assert "fraud             pinned to v12" in text
    assert "churn             HELD: the promotion gate holds v40 back for 95s" in text
    assert "fraud             HELD" not in text
    server.following.labels("streamlearn.snapshots").set(1)
    assert "announced (Kafka)" in render(None, parse(page(server)))


def test_the_label_join_shows_outcomes_coverage_delays_and_served_accuracy_per_version():
    trainer = TrainerMetrics(CollectorRegistry())
    assert "LABEL JOIN" not in render(parse(page(trainer)), None)  # not joining: no such section
    trainer.join_outcomes.labels("joined").inc(900)
    trainer.join_outcomes.labels("expired").inc(100)
    trainer.join_pending.labels("predictions").set(42)
    trainer.join_pending.labels("labels").set(3)
    trainer.join_coverage.set(0.9)
    for version, (n, right) in {"7": (100, 80), "8": (50, 45)}.items():
        trainer.served_labelled.labels(version).inc(n)
        trainer.served_correct.labels(version).inc(right)
    for seconds in (2, 3, 400):
        trainer.label_delay.observe(seconds)
    text = render(parse(page(trainer)), None)
    assert "joined 900   expired 100" in text and "42 predictions   3 labels" in text
    assert "coverage          0.900" in text
    assert "served accuracy   v8 0.900 (50 labels)   v7 0.800 (100 labels)" in text


def test_the_ranks_of_one_trainer_add_up_and_the_model_is_rank_0s():
    from prometheus_client import start_http_server

    from streamlearn.dev.broker import free_port
    from streamlearn.dev.status import scrape_ranks, total

    ranks, servers, urls = [TrainerMetrics(CollectorRegistry()) for _ in range(2)], [], []
    for rank, metrics in enumerate(ranks):
        metrics.records_invalid.labels("bad_json").inc(2 + rank)
        metrics.records_consumed.inc(100 * (rank + 1))
        port = free_port()
        servers.append(start_http_server(port, "127.0.0.1", metrics.registry)[0])
        urls.append(f"http://127.0.0.1:{port}")
    ranks[0].records_trained.inc(300)  # every rank learns every record; rank 0 alone exports it
    ranks[0].prequential_accuracy.labels("1000").set(0.9)
    try:
        samples = scrape_ranks(",".join(urls))
        assert samples is not None
        assert total(samples, "streamlearn_records_consumed_total") == 300
        assert by_label(samples, "streamlearn_records_invalid_total", "reason")["bad_json"] == 5
        assert total(samples, "streamlearn_records_trained_total") == 300
        assert value(samples, "streamlearn_prequential_accuracy_ratio", window="1000") == 0.9
        assert scrape_ranks(f"http://127.0.0.1:{free_port()},{urls[1]}") is None  # rank 0 must answer
    finally:
        for server in servers:
            server.shutdown()
