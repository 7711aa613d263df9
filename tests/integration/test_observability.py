"""The dashboard and alert rules against a real Prometheus scraping a real trainer and server."""

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from streamlearn.dev.broker import free_port
from streamlearn.dev.streams import INVALID_VALUES, records

from ..conftest import wait_for
from .conftest import publish

DEPLOY = Path(__file__).parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamlearn.json"
CATEGORICAL_ONLY = {"streamlearn_category_unseen_ratio"}  # panels with data only for categorical features
# with data only while the trainer joins labels (--labels-topic): this stack learns complete events
JOIN_ONLY = ("streamlearn_served_labelled_total", "streamlearn_join_pending")


@pytest.fixture(scope="module")
def prometheus_binaries() -> tuple[str, str]:
    """promtool and prometheus from Debian's package, installed when missing."""
    if not (shutil.which("promtool") and shutil.which("prometheus")):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
            check=True,
            env=env,
            timeout=900,
        )
    return str(shutil.which("promtool")), str(shutil.which("prometheus"))


def test_promtool_accepts_the_config_and_the_rules(prometheus_binaries):
    promtool, _ = prometheus_binaries
    checks = [
        ("config", DEPLOY / "prometheus" / name) for name in ("prometheus.yml", "prometheus-compose.yml")
    ]
    for check, path in [*checks, ("rules", RULES)]:
        result = subprocess.run(
            [promtool, "check", check, str(path)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def rule_queries() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    annotations = json.loads(DASHBOARD.read_text())["annotations"]["list"]
    return [rule["expr"] for group in groups for rule in group["rules"]] + [a["expr"] for a in annotations]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(streamlearn_[a-z_]+|up)\b(?!\s*\()", expr))


@pytest.fixture(scope="module")
def stack(bootstrap, prometheus_binaries, tmp_path_factory):
    """A trainer with drifting, partly invalid data, a server, and Prometheus scraping both every second."""
    root = tmp_path_factory.mktemp("observability")
    topic = f"observability-{free_port()}"
    values = []
    for i, record in enumerate(itertools.islice(records("sea", seed=5, drift_every=3000), 9000)):
        values.append(INVALID_VALUES[i % len(INVALID_VALUES)] if i % 50 == 49 else orjson.dumps(record))
    publish(bootstrap, topic, values)
    trainer_port, server_port, prometheus_port = free_port(), free_port(), free_port()
    base = [sys.executable, "-m", "streamlearn"]
    processes = [
        subprocess.Popen([*base, "train", "--bootstrap", bootstrap, "--topic", topic, "--task", "binary",
                          "--snapshot-dir", str(root / "snapshots"), "--metrics-port", str(trainer_port),
                          "--drift-window", "1000", "--drift-per-feature", "--log-level", "error"]),
        subprocess.Popen([*base, "serve", "--snapshot-dir", str(root / "snapshots"),
                          "--port", str(server_port), "--log-level", "error",
                          "--bootstrap-servers", bootstrap]),
    ]  # fmt: skip
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "streamlearn-trainer",
                "static_configs": [{"targets": [f"127.0.0.1:{trainer_port}"]}],
            },
            {"job_name": "streamlearn-server", "static_configs": [{"targets": [f"127.0.0.1:{server_port}"]}]},
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    processes.append(
        subprocess.Popen(
            [prometheus_binaries[1], f"--config.file={root / 'prometheus.yml'}",
             f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{prometheus_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    )  # fmt: skip
    urls = {
        "trainer": f"http://127.0.0.1:{trainer_port}",
        "server": f"http://127.0.0.1:{server_port}",
        "prometheus": f"http://127.0.0.1:{prometheus_port}",
    }
    yield urls
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        process.wait(60)


def ready(server: str) -> bool:
    try:
        return httpx.get(server + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(prometheus: str, expr: str) -> dict:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", f"{expr}: {body.get('error')}"
    return body["data"]


def serve_traffic(server: str) -> None:
    with httpx.Client(base_url=server, timeout=10) as http:
        for i in range(20):
            http.post("/v1/models/default:predict", json={"instances": [[1.0, 2.0, 3.0]] * (1 + i % 3)})
        http.post("/v1/models/default:predict", json={"instances": [[1.0]]})  # a 422


def test_every_dashboard_and_rule_query_works_on_real_data(stack):
    prometheus = stack["prometheus"]
    wait_for(lambda: ready(stack["server"]), 90, what="a served snapshot")
    wait_for(
        lambda: len(query(prometheus, "up == 1")["result"]) == 2, 60, interval_s=0.5, what="both targets up"
    )
    wait_for(
        lambda: query(prometheus, "streamlearn_feature_drift_psi_max")["result"],
        90,
        interval_s=0.5,
        what="drift",
    )
    # Requests spread over several scrapes, so that rate() has two samples to work with.
    in_rate = "sum(rate(streamlearn_predict_requests_total[1m])) > 0"
    wait_for(
        lambda: serve_traffic(stack["server"]) or query(prometheus, in_rate)["result"],
        60,
        1.0,
        what="traffic",
    )

    drift = wait_for(
        lambda: (httpx.get(stack["server"] + "/v1/models/default").json().get("drift") or {}).get(
            "top_drifting_features"
        ),
        60,
        what="drift in the model status",
    )
    assert {feature["name"] for feature in drift} == {"f0", "f1", "f2"}
    assert query(prometheus, "count(streamlearn_feature_drift_psi)")["result"][0]["value"][1] == "3"

    for expr in dashboard_queries():
        if expr in CATEGORICAL_ONLY or any(name in expr for name in JOIN_ONLY):  # no series to show here
            query(prometheus, expr)
            continue
        wait_for(lambda e=expr: query(prometheus, e)["result"], 30, interval_s=0.5, what=f"data for {expr}")
    for expr in rule_queries():
        query(prometheus, expr)  # parses and evaluates
        for name in metric_names(expr):
            assert query(prometheus, f'count({{__name__="{name}"}})')["result"], f"{expr}: no metric {name}"


def test_status_shows_learning_drift_health_and_serving(stack):
    wait_for(lambda: ready(stack["server"]), 90, what="a served snapshot")
    serve_traffic(stack["server"])
    result = subprocess.run(
        [sys.executable, "-m", "streamlearn", "status",
         "--trainer", stack["trainer"], "--server", stack["server"]],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for section in ("LEARNING", "DRIFT", "PIPELINE", "SERVING"):
        assert section in result.stdout
    assert re.search(r"records learned\s+[1-9]", result.stdout)
    assert re.search(r"accuracy\s+last 1k 0\.\d{3}", result.stdout)
    assert re.search(r"invalid records\s+\w+ \d", result.stdout)
    assert "ready             yes" in result.stdout and "default v" in result.stdout
    assert re.search(r"latency \(since start\)\s+p50 \d+\.\d ms", result.stdout)
