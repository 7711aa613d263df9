"""`streamlearn status`: the dashboard's picture (learning, drift, health, serving) in a terminal."""

import math
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

Samples = list[Sample]


def scrape(url: str) -> Samples | None:
    """The samples of a /metrics page, labels parsed; None when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            text = response.read().decode()
    except OSError:
        return None
    return parse(text)


def scrape_ranks(urls: str) -> Samples | None:
    """The samples of every rank of one trainer (comma-separated base URLs, rank 0 first), in one
    list: counters and lags add up over the ranks, and what describes the model is rank 0's (the
    other ranks do not export it). None when rank 0 does not answer."""
    ranks = [scrape(url.strip().rstrip("/") + "/metrics") for url in urls.split(",") if url.strip()]
    if not ranks or ranks[0] is None:
        return None
    return [sample for samples in ranks if samples is not None for sample in samples]


def parse(text: str) -> Samples:
    """The samples of a Prometheus text page, with their labels as dicts."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def get_json(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            data: dict[str, Any] = orjson.loads(response.read())
            return data
    except (OSError, orjson.JSONDecodeError):
        return None


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of the sample with this name and exactly these labels, if there is one."""
    return next((s.value for s in samples if s.name == name and s.labels == labels), None)


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """{value of `label`: value} over the samples of one name, summed over their other labels."""
    values: dict[str, float] = {}
    for sample in samples:
        if sample.name == name and label in sample.labels:
            key = sample.labels[label]
            values[key] = values.get(key, 0.0) + sample.value
    return values


def total(samples: Samples, name: str) -> float:
    return sum(sample.value for sample in samples if sample.name == name)


def quantile(samples: Samples, name: str, q: float) -> float | None:
    """A quantile of a histogram since start, interpolated within its buckets (as histogram_quantile)."""
    edges = by_label(samples, name + "_bucket", "le")
    buckets = {float(edge): count for edge, count in edges.items()}  # float("+Inf") is inf
    if not buckets or buckets.get(math.inf, 0.0) == 0:
        return None
    rank, lower, below = q * buckets[math.inf], 0.0, 0.0
    for bound in sorted(buckets):
        count = buckets[bound]
        if count >= rank:
            if bound == math.inf:
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return None


def _number(value: float | None, fmt: str = ".4g") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def render(trainer: Samples | None, server: Samples | None) -> str:
    lines = []
    if trainer is None:
        lines.append("trainer: not reachable")
    else:
        t = trainer
        loss = [value(t, "streamlearn_prequential_loss", window=w) for w in ("1000", "10000")]
        acc = [value(t, "streamlearn_prequential_accuracy_ratio", window=w) for w in ("1000", "10000")]
        lines += [
            "LEARNING",
            f"  records learned   {total(t, 'streamlearn_records_trained_total'):,.0f}"
            f"   ({_number(value(t, 'streamlearn_records_per_second'), ',.0f')}/s)",
            f"  prequential loss  last 1k {_number(loss[0])}   last 10k {_number(loss[1])}",
            f"  accuracy          last 1k {_number(acc[0], '.3f')}   last 10k {_number(acc[1], '.3f')}",
            "DRIFT",
            "  scores            "
            + "   ".join(
                f"{k} {v:.3g}" for k, v in by_label(t, "streamlearn_drift_score", "detector").items()
            ),
            "  detections        "
            + "   ".join(
                f"{k} {v:.0f}"
                for k, v in by_label(t, "streamlearn_drift_detections_total", "detector").items()
            ),
            f"  feature PSI (max) {_number(value(t, 'streamlearn_feature_drift_psi_max'), '.3f')}"
            f"   KS (max) {_number(value(t, 'streamlearn_feature_drift_ks_max'), '.3f')}"
            f"   label {_number(value(t, 'streamlearn_label_drift_score'), '.3f')}",
            "PIPELINE",
            f"  consumer lag      {total(t, 'streamlearn_consumer_lag_records'):,.0f} records",
            "  invalid records   "
            + (
                "   ".join(
                    f"{k} {v:.0f}"
                    for k, v in by_label(t, "streamlearn_records_invalid_total", "reason").items()
                    if v
                )
                or "none"
            ),
            f"  snapshot          v{_number(value(t, 'streamlearn_snapshot_version'), '.0f')}"
            f", written {_number(value(t, 'streamlearn_snapshot_age_seconds'), '.1f')} s ago"
            f", {total(t, 'streamlearn_snapshot_failures_total'):.0f} failed writes",
            f"  Kafka errors      {total(t, 'streamlearn_kafka_errors_total'):.0f}",
            *_label_join(t),
        ]
    if server is None:
        lines.append("server: not reachable")
    else:
        s = server
        codes = by_label(s, "streamlearn_predict_requests_total", "code")
        errors = sum(v for code, v in codes.items() if code.startswith(("4", "5")))
        served = by_label(s, "streamlearn_served_model_version", "model")
        latency = [quantile(s, "streamlearn_predict_latency_seconds", p / 100) for p in (50, 95, 99)]
        lines += [
            "SERVING",
            f"  ready             {'yes' if value(s, 'streamlearn_server_ready') else 'no'}"
            + "".join(f"   {model} v{v:.0f}" for model, v in served.items()),
            *_versions(s),
            f"  predict requests  {sum(codes.values()):,.0f}   errors {errors:,.0f}",
            "  latency (since start)  "
            + "   ".join(
                f"p{p} {_number(v and v * 1000, '.1f')} ms"
                for p, v in zip((50, 95, 99), latency, strict=True)
            ),
        ]
    return "\n".join(lines)


def _label_join(t: Samples) -> list[str]:
    """The label join's lines, when the trainer joins (--labels-topic)."""
    pending = by_label(t, "streamlearn_join_pending", "side")
    if not pending:
        return []
    outcomes = by_label(t, "streamlearn_join_outcomes_total", "outcome")
    delays = [quantile(t, "streamlearn_label_delay_seconds", q) for q in (0.5, 0.99)]
    labelled = by_label(t, "streamlearn_served_labelled_total", "model_version")
    correct = by_label(t, "streamlearn_served_correct_total", "model_version")
    squared = by_label(t, "streamlearn_served_squared_error_total", "model_version")
    newest = sorted(labelled, key=int, reverse=True)[:3]
    scores = [
        f"v{v} {(correct[v] if v in correct else squared.get(v, 0.0)) / labelled[v]:.3f} "
        f"({labelled[v]:,.0f} labels)"
        for v in newest
        if labelled[v]
    ]
    return [
        "LABEL JOIN",
        "  outcomes          "
        + ("   ".join(f"{k} {v:,.0f}" for k, v in outcomes.items() if v) or "none yet"),
        f"  waiting           {pending.get('predictions', 0):,.0f} predictions"
        f"   {pending.get('labels', 0):,.0f} labels",
        f"  coverage          {_number(value(t, 'streamlearn_join_coverage_ratio'), '.3f')} (last 1k)"
        f"   label delay p50 {_number(delays[0], '.3g')} s   p99 {_number(delays[1], '.3g')} s",
        f"  served {'accuracy' if correct else 'sq. error'}   " + ("   ".join(scores) or "no labels yet"),
    ]


def _versions(s: Samples) -> list[str]:
    """A line per model that is pinned or whose newer snapshots the promotion gate holds back."""
    pinned = by_label(s, "streamlearn_pinned_model_version", "model")
    held = by_label(s, "streamlearn_promotion_held_version", "model")
    held_s = by_label(s, "streamlearn_promotion_held_seconds", "model")
    following = sum(by_label(s, "streamlearn_announcements_following", "topic").values())
    lines = [f"  new snapshots     {'announced (Kafka)' if following else 'polled from the store'}"]
    for model in sorted(set(pinned) | set(held)):
        if pinned.get(model):
            lines.append(f"  {model:<17} pinned to v{pinned[model]:.0f}")
        if held.get(model):
            lines.append(
                f"  {model:<17} HELD: the promotion gate holds v{held[model]:.0f} back "
                f"for {held_s.get(model, 0):.0f}s (worse recent loss)"
            )
    return lines


def show(
    trainer_url: str, server_url: str, watch: bool, interval_s: float, stopped: Callable[[], bool]
) -> bool:
    """Print the status (again every interval with watch); False when neither process answers."""
    while True:
        trainer = scrape_ranks(trainer_url)
        server = scrape(server_url.rstrip("/") + "/metrics")
        text = render(trainer, server)
        if watch:
            print("\033[2J\033[H" + time.strftime("%H:%M:%S ") + "streamlearn status\n" + text, flush=True)
        else:
            print(text)
        if not watch or stopped():
            return trainer is not None or server is not None
        deadline = time.monotonic() + interval_s
        while time.monotonic() < deadline and not stopped():
            time.sleep(0.1)
