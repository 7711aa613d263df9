"""Writes dashboards/streamlearn.json: `python deploy/grafana/build_dashboard.py` after editing ROWS."""

import json
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
ROWS = {
    "Learning": [
        ("Prequential loss", "none", [
            ('streamlearn_prequential_loss{window="1000"}', "last 1k {{instance}}"),
            ('streamlearn_prequential_loss{window="10000"}', "last 10k {{instance}}"),
        ]),
        ("Prequential accuracy", "percentunit", [
            ('streamlearn_prequential_accuracy_ratio{window="1000"}', "last 1k {{instance}}"),
            ('streamlearn_prequential_accuracy_ratio{window="10000"}', "last 10k {{instance}}"),
        ]),
        ("Records learned per second", "short", [
            # under torchrun rank 0 exports the model's rate, the other ranks 0
            ('streamlearn_records_per_second * on (instance) group_left streamlearn_trainer_rank{rank="0"}',
             "{{instance}}"),
            ("sum(rate(streamlearn_records_consumed_total[1m]))", "consumed (all trainers)"),
        ]),
        ("Optimizer steps per record (step policy)", "none", [
            (
                "rate(streamlearn_optimizer_steps_total[1m]) / rate(streamlearn_records_trained_total[1m])",
                "{{instance}}",
            ),
        ]),
    ],
    "Drift": [
        ("Concept drift scores", "none", [("streamlearn_drift_score", "{{detector}} {{instance}}")]),
        ("Feature and label drift", "none", [
            ("streamlearn_feature_drift_psi_max", "feature PSI (max) {{instance}}"),
            ("streamlearn_feature_drift_ks_max", "feature KS (max) {{instance}}"),
            ("streamlearn_label_drift_score", "label {{instance}}"),
        ]),
        ("Drift detections (5m)", "short", [
            ("sum by (detector) (increase(streamlearn_drift_detections_total[5m]))", "{{detector}}"),
        ]),
        ("Never-seen categories (share)", "percentunit", [
            ("streamlearn_category_unseen_ratio", "{{feature}} {{instance}}"),
        ]),
    ],
    "Pipeline health": [
        ("Consumer lag", "short", [("sum by (partition) (streamlearn_consumer_lag_records)", "partition {{partition}}")]),
        ("Invalid records per second, by reason", "short", [
            ("sum by (reason) (rate(streamlearn_records_invalid_total[1m]))", "{{reason}}"),
        ]),
        ("Snapshot age", "s", [
            ("streamlearn_snapshot_age_seconds", "written {{instance}}"),
            ("streamlearn_served_snapshot_age_seconds", "served {{model}}"),
        ]),
        ("Served vs trained version", "short", [
            ("max(streamlearn_snapshot_version)", "trained"),
            ("max(streamlearn_served_model_version)", "served"),
        ]),
        ("Records read per second, by trainer rank", "short", [
            ("sum by (rank) (rate(streamlearn_records_consumed_total[1m])"
             " * on (instance) group_left (rank) streamlearn_trainer_rank)", "rank {{rank}}"),
            ("count(streamlearn_trainer_rank)", "ranks up"),
        ]),
        ("Kafka errors and snapshot failures per second", "short", [
            ("sum(rate(streamlearn_kafka_errors_total[1m]))", "Kafka errors"),
            ("sum(rate(streamlearn_snapshot_failures_total[1m]))", "snapshot failures"),
        ]),
    ],
    "Serving": [
        ("Predict requests per second", "reqps", [
            ("sum by (code) (rate(streamlearn_predict_requests_total[1m]))", "{{code}}"),
        ]),
        ("Predict latency", "s", [
            (f"histogram_quantile({q}, sum by (le) (rate(streamlearn_predict_latency_seconds_bucket[1m])))", f"p{p}")
            for q, p in ((0.5, 50), (0.95, 95), (0.99, 99))
        ]),
        ("Predict error rate", "percentunit", [
            ('sum(rate(streamlearn_predict_requests_total{code=~"4..|5.."}[1m]))'
             " / clamp_min(sum(rate(streamlearn_predict_requests_total[1m])), 1e-9)", "errors"),
        ]),
        ("Server ready", "short", [("streamlearn_server_ready", "{{instance}}")]),
        ("Snapshot publication to serving", "s", [
            (f"histogram_quantile({q}, sum by (le, source) (rate(streamlearn_snapshot_serve_delay_seconds_bucket[1m])))",
             f"p{p} {{{{source}}}}")
            for q, p in ((0.5, 50), (0.99, 99))
        ]),
        ("Snapshot announcements", "short", [
            ("streamlearn_announcements_following", "following {{instance}}"),
            ('sum(rate(streamlearn_snapshot_announcements_total{outcome="failed"}[1m]))', "failed per second"),
        ]),
        ("Pinned and held versions", "short", [
            ("streamlearn_pinned_model_version", "pinned {{model}}"),
            ("streamlearn_promotion_held_version", "held back {{model}}"),
        ]),
        ("Promotion held for", "s", [("streamlearn_promotion_held_seconds", "{{model}}")]),
        ("Prediction log (entries per second)", "short", [
            ("sum by (outcome) (rate(streamlearn_predictions_logged_total[1m]))", "{{outcome}}"),
        ]),
    ],
    "Label join": [
        ("Served vs prequential accuracy", "percentunit", [
            ("sum by (model_version) (rate(streamlearn_served_correct_total[5m]))"
             " / clamp_min(sum by (model_version) (rate(streamlearn_served_labelled_total[5m])), 1e-9)",
             "served v{{model_version}}"),
            ('streamlearn_prequential_accuracy_ratio{window="1000"}', "prequential last 1k {{instance}}"),
        ]),
        ("Served squared error (regression)", "none", [
            ("sum by (model_version) (rate(streamlearn_served_squared_error_total[5m]))"
             " / clamp_min(sum by (model_version) (rate(streamlearn_served_labelled_total[5m])), 1e-9)",
             "served v{{model_version}}"),
            ('streamlearn_prequential_loss{window="1000"}', "prequential last 1k {{instance}}"),
        ]),
        ("Join coverage", "percentunit", [("streamlearn_join_coverage_ratio", "{{instance}}")]),
        ("Join outcomes per second", "short", [
            ("sum by (outcome) (rate(streamlearn_join_outcomes_total[1m]))", "{{outcome}}"),
        ]),
        ("Label delay", "s", [
            (f"histogram_quantile({q}, sum by (le) (rate(streamlearn_label_delay_seconds_bucket[5m])))", f"p{p}")
            for q, p in ((0.5, 50), (0.99, 99))
        ]),
        ("Waiting to be joined", "short", [("sum by (side) (streamlearn_join_pending)", "{{side}}")]),
    ],
}  # fmt: skip
ANNOTATION = "sum by (detector) (changes(streamlearn_drift_detections_total[1m])) > 0"


def build() -> dict:
    panels, y, panel_id = [], 0, 1
    for row, charts in ROWS.items():
        panels.append({"type": "row", "title": row, "id": panel_id, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})  # fmt: skip
        panel_id, y = panel_id + 1, y + 1
        width = 24 // len(charts)
        for i, (title, unit, queries) in enumerate(charts):
            panels.append({
                "type": "timeseries", "title": title, "id": panel_id, "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": width, "x": i * width, "y": y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [{"refId": chr(65 + k), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                            for k, (expr, legend) in enumerate(queries)],
            })  # fmt: skip
            panel_id += 1
        y += 8
    return {
        "title": "Streamlearn", "uid": "streamlearn", "schemaVersion": 39, "version": 1, "editable": True,
        "refresh": "5s", "time": {"from": "now-30m", "to": "now"}, "tags": ["streamlearn"],
        "templating": {"list": []},
        "annotations": {"list": [{
            "name": "Drift detections", "datasource": DATASOURCE, "enable": True, "iconColor": "red",
            "expr": ANNOTATION, "step": "15s", "titleFormat": "Drift: {{detector}}", "useValueForTime": False,
        }]},
        "panels": panels,
    }  # fmt: skip


if __name__ == "__main__":
    out = Path(__file__).parent / "dashboards" / "streamlearn.json"
    out.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {out}")
