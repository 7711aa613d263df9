"""`streamlearn status`: the dashboard's picture (learning, drift, health, serving) in a terminal."""

import math
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, float]


def scrape(url: str) -> Samples | None:
    """Samples of a /metrics page as {'name{labels}': value}; None when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            text = response.read().decode()
    except OSError:
        return None
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def get_json(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            data: dict[str, Any] = orjson.loads(response.read())
            return data
    except (OSError, orjson.JSONDecodeError):
        return None


def matching(samples: Samples, name: str) -> dict[str, float]:
    """{labels: value} of every sample of one metric name."""
    return {
        key[len(name) :]: value for key, value in samples.items() if key == name or key.startswith(name + "{")
    }


def total(samples: Samples, name: str) -> float:
    return sum(matching(samples, name).values())


def quantile(samples: Samples, name: str, q: float) -> float | None:
    """A quantile of a histogram since start, interpolated within its buckets (as histogram_quantile)."""
    buckets: dict[float, float] = {}
    for labels, value in matching(samples, name + "_bucket").items():
        edge = float(labels.split('le="')[1].split('"')[0])  # float("+Inf") is inf
        buckets[edge] = buckets.get(edge, 0.0) + value
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
        loss = [t.get(f'streamlearn_prequential_loss{{window="{w}"}}') for w in (1000, 10000)]
        acc = [t.get(f'streamlearn_prequential_accuracy_ratio{{window="{w}"}}') for w in (1000, 10000)]
        lines += [
            "LEARNING",
            f"  records learned   {total(t, 'streamlearn_records_trained_total'):,.0f}"
            f"   ({_number(t.get('streamlearn_records_per_second'), ',.0f')}/s)",
            f"  prequential loss  last 1k {_number(loss[0])}   last 10k {_number(loss[1])}",
            f"  accuracy          last 1k {_number(acc[0], '.3f')}   last 10k {_number(acc[1], '.3f')}",
            "DRIFT",
            "  scores            "
            + "   ".join(f"{k[11:-2]} {v:.3g}" for k, v in matching(t, "streamlearn_drift_score").items()),
            "  detections        "
            + "   ".join(
                f"{k[11:-2]} {v:.0f}" for k, v in matching(t, "streamlearn_drift_detections_total").items()
            ),
            f"  feature PSI (max) {_number(t.get('streamlearn_feature_drift_psi_max'), '.3f')}"
            f"   KS (max) {_number(t.get('streamlearn_feature_drift_ks_max'), '.3f')}"
            f"   label {_number(t.get('streamlearn_label_drift_score'), '.3f')}",
            "PIPELINE",
            f"  consumer lag      {total(t, 'streamlearn_consumer_lag_records'):,.0f} records",
            "  invalid records   "
            + (
                "   ".join(
                    f"{k[9:-2]} {v:.0f}"
                    for k, v in matching(t, "streamlearn_records_invalid_total").items()
                    if v
                )
                or "none"
            ),
            f"  snapshot          v{_number(t.get('streamlearn_snapshot_version'), '.0f')}"
            f", written {_number(t.get('streamlearn_snapshot_age_seconds'), '.1f')} s ago"
            f", {total(t, 'streamlearn_snapshot_failures_total'):.0f} failed writes",
            f"  Kafka errors      {total(t, 'streamlearn_kafka_errors_total'):.0f}",
        ]
    if server is None:
        lines.append("server: not reachable")
    else:
        s = server
        requests = matching(s, "streamlearn_predict_requests_total")
        errors = sum(v for k, v in requests.items() if 'code="4' in k or 'code="5' in k)
        served = matching(s, "streamlearn_served_model_version")
        latency = [quantile(s, "streamlearn_predict_latency_seconds", p / 100) for p in (50, 95, 99)]
        lines += [
            "SERVING",
            f"  ready             {'yes' if s.get('streamlearn_server_ready') else 'no'}"
            + "".join(f"   {k[8:-2]} v{v:.0f}" for k, v in served.items()),
            f"  predict requests  {sum(requests.values()):,.0f}   errors {errors:,.0f}",
            "  latency (since start)  "
            + "   ".join(
                f"p{p} {_number(v and v * 1000, '.1f')} ms"
                for p, v in zip((50, 95, 99), latency, strict=True)
            ),
        ]
    return "\n".join(lines)


def show(
    trainer_url: str, server_url: str, watch: bool, interval_s: float, stopped: Callable[[], bool]
) -> bool:
    """Print the status (again every interval with watch); False when neither process answers."""
    while True:
        trainer = scrape(trainer_url.rstrip("/") + "/metrics")
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
