"""Every Prometheus metric Streamlearn exports, declared once.

The trainer and the server are separate processes, each with its own registry, so each
declares only its own group. Names carry the streamlearn_ prefix and their unit; labels are
bounded (invalid reasons are an enum, partitions belong to one topic, models to one directory).
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from streamlearn.errors import InvalidReason

STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DETECTORS = ("adwin", "page_hinkley", "feature_psi", "label")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# from a click a second after its impression to a chargeback a month after its payment
DAY = 86_400
LABEL_DELAY_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, DAY, 3 * DAY, 7 * DAY, 30 * DAY)
JOIN_OUTCOMES = ("joined", "imputed", "expired", "orphaned", "late", "duplicate", "evicted", "other_model")


class TrainerMetrics:
    """The trainer's metrics: learning, pipeline health and snapshots."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.records_consumed = Counter(
            "streamlearn_records_consumed_total", "Records read from Kafka.", registry=registry
        )
        self.records_trained = Counter(
            "streamlearn_records_trained_total",
            "Valid records the model has learned from.",
            registry=registry,
        )
        self.records_invalid = Counter(
            "streamlearn_records_invalid_total",
            "Records rejected by the record contract, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in InvalidReason:
            self.records_invalid.labels(reason.value)  # export zeros so rate() works from the start
        self.batches_skipped = Counter(
            "streamlearn_batches_skipped_total",
            "Micro-batches (or parts of one, while isolating the record responsible) not wholly "
            "learned because a loss or gradient was not finite.",
            registry=registry,
        )
        self.optimizer_steps = Counter(
            "streamlearn_optimizer_steps_total",
            "Optimizer steps taken; divided by records trained, the steps per record the step "
            "policy chose (more while the stream leaves time, fewer in a backlog).",
            registry=registry,
        )
        self.prequential_loss = Gauge(
            "streamlearn_prequential_loss",
            "Test-then-train loss: fading average over `window` records, or `all` since start.",
            ["window"],
            registry=registry,
        )
        self.prequential_accuracy = Gauge(
            "streamlearn_prequential_accuracy_ratio",
            "Test-then-train accuracy (classification): fading average over `window` records, or `all`.",
            ["window"],
            registry=registry,
        )
        self.train_step = Histogram(
            "streamlearn_train_step_seconds",
            "Time to test and learn one micro-batch.",
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.batch_records = Histogram(
            "streamlearn_batch_records",
            "Records per micro-batch.",
            buckets=(1, 8, 32, 64, 128, 256, 512, 1024, 4096, 16384),
            registry=registry,
        )
        self.records_per_second = Gauge(
            "streamlearn_records_per_second",
            "Records learned per second over the last few seconds.",
            registry=registry,
        )
        self.snapshot_version = Gauge(
            "streamlearn_snapshot_version",
            "Version of the newest snapshot this trainer wrote.",
            registry=registry,
        )
        self.snapshot_age = Gauge(
            "streamlearn_snapshot_age_seconds",
            "Seconds since this trainer last wrote a snapshot.",
            registry=registry,
        )
        self.snapshot_write = Histogram(
            "streamlearn_snapshot_write_seconds",
            "Time to write one snapshot durably.",
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.snapshot_failures = Counter(
            "streamlearn_snapshot_failures_total", "Snapshot writes that failed.", registry=registry
        )
        self.announcements = Counter(
            "streamlearn_snapshot_announcements_total",
            "Snapshot announcements to the servers, by outcome (sent: acknowledged by Kafka).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("sent", "failed"):
            self.announcements.labels(outcome)
        self.consumer_lag = Gauge(
            "streamlearn_consumer_lag_records",
            "Records behind the partition's high watermark.",
            ["partition"],
            registry=registry,
        )
        self.event_time_skew = Gauge(
            "streamlearn_event_time_skew_seconds",
            "How far the newest record taken runs ahead, in event time, of the partitions still being "
            "read: records newer than the slowest of them wait for it (up to --max-order-wait-ms).",
            registry=registry,
        )
        self.partitions_paused = Gauge(
            "streamlearn_partitions_paused",
            "Partitions paused because they ran ahead in event time and their buffer is full.",
            registry=registry,
        )
        self.trainer_rank = Gauge(
            "streamlearn_trainer_rank",
            "1 per trainer process: its rank under torchrun and the ranks learning its model (0 of 1 "
            "alone); rank 0 alone exports what the model does, every rank what it reads.",
            ["rank", "world_size"],
            registry=registry,
        )
        self.offsets_committed = Counter(
            "streamlearn_offset_commits_total", "Offset commits after a durable snapshot.", registry=registry
        )
        self.offset_resets = Counter(
            "streamlearn_trainer_offset_resets_total",
            "Partitions assigned with a resume offset outside their log, by kind: beyond_end (the topic "
            "was recreated or its log truncated), before_start (retention deleted records before they "
            "were learned); --on-offset-out-of-range decides what follows.",
            ["topic", "partition", "kind"],
            registry=registry,
        )
        self.kafka_errors = Counter(
            "streamlearn_kafka_errors_total", "Errors reported by the Kafka client.", registry=registry
        )
        self.drift_score = Gauge(
            "streamlearn_drift_score",
            "Concept drift score on the prequential error stream: ADWIN's gap between the halves of its "
            "window (error-rate units), Page-Hinkley's statistic over its threshold (1 = detection).",
            ["detector"],
            registry=registry,
        )
        self.drift_detections = Counter(
            "streamlearn_drift_detections_total",
            "Drift detections by detector: adwin, page_hinkley (concept), feature_psi, label.",
            ["detector"],
            registry=registry,
        )
        for detector in DETECTORS:
            self.drift_detections.labels(detector)
        self.feature_drift_psi = Gauge(
            "streamlearn_feature_drift_psi_max",
            "Largest population stability index of any feature, recent window against reference.",
            registry=registry,
        )
        self.feature_drift_ks = Gauge(
            "streamlearn_feature_drift_ks_max",
            "Largest binned Kolmogorov-Smirnov statistic of any feature, recent window against reference.",
            registry=registry,
        )
        self.feature_psi = Gauge(
            "streamlearn_feature_drift_psi",
            "Population stability index per feature (only with --drift-per-feature).",
            ["feature"],
            registry=registry,
        )
        self.category_unseen = Gauge(
            "streamlearn_category_unseen_ratio",
            "Share of a categorical feature's recent categories (about --drift-window records) whose "
            "table row no earlier record had used.",
            ["feature"],
            registry=registry,
        )
        self.label_drift = Gauge(
            "streamlearn_label_drift_score",
            "Label drift: PSI of the class priors, or the shift of the label mean in reference std.",
            registry=registry,
        )
        # the label join (--labels-topic)
        self.join_outcomes = Counter(
            "streamlearn_join_outcomes_total",
            "What became of logged predictions and labels: joined, imputed (the negative label of a "
            "prediction whose label never came), expired (dropped unlabelled), orphaned (a label "
            "without its prediction), late, duplicate, evicted (past --join-max-pending or "
            "--join-max-pending-bytes, or gone from the prediction log on restore), other_model.",
            ["outcome"],
            registry=registry,
        )
        for outcome in JOIN_OUTCOMES:
            self.join_outcomes.labels(outcome)
        self.join_pending = Gauge(
            "streamlearn_join_pending",
            "Predictions and labels waiting for each other, by side (predictions, labels).",
            ["side"],
            registry=registry,
        )
        self.join_pending_bytes = Gauge(
            "streamlearn_join_pending_bytes",
            "Bytes of the messages waiting in the label join (bounded by --join-max-pending-bytes).",
            registry=registry,
        )
        self.join_coverage = Gauge(
            "streamlearn_join_coverage_ratio",
            "Share of logged predictions whose label came within the window: joined / (joined + "
            "expired + imputed), fading over the last 1,000.",
            registry=registry,
        )
        self.label_delay = Histogram(
            "streamlearn_label_delay_seconds",
            "Event time from a served prediction to its label, for the labels that joined.",
            buckets=LABEL_DELAY_BUCKETS,
            registry=registry,
        )
        self.served_labelled = Counter(
            "streamlearn_served_labelled_total",
            "Served predictions whose label came, by the snapshot version that served them (the "
            "newest 10 versions).",
            ["model_version"],
            registry=registry,
        )
        self.served_correct = Counter(
            "streamlearn_served_correct_total",
            "Of those, the ones the served prediction got right (classification): divided by "
            "streamlearn_served_labelled_total, the accuracy of what was actually served.",
            ["model_version"],
            registry=registry,
        )
        self.served_squared_error = Counter(
            "streamlearn_served_squared_error_total",
            "Sum of the squared errors of the served predictions whose label came (regression).",
            ["model_version"],
            registry=registry,
        )


class ServerMetrics:
    """The prediction server's metrics: requests, latency and the served versions."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.predict_requests = Counter(
            "streamlearn_predict_requests_total",
            "Predict requests by model and HTTP status code.",
            ["model", "code"],
            registry=registry,
        )
        self.predict_latency = Histogram(
            "streamlearn_predict_latency_seconds",
            "Time to answer a predict request, body parsing included.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.predict_instances = Counter(
            "streamlearn_predict_instances_total", "Instances predicted.", ["model"], registry=registry
        )
        self.served_version = Gauge(
            "streamlearn_served_model_version", "Snapshot version being served.", ["model"], registry=registry
        )
        self.served_age = Gauge(
            "streamlearn_served_snapshot_age_seconds",
            "Seconds since the served snapshot was written.",
            ["model"],
            registry=registry,
        )
        self.served_records = Gauge(
            "streamlearn_served_records_trained",
            "Records the served snapshot had learned from.",
            ["model"],
            registry=registry,
        )
        self.ready = Gauge(
            "streamlearn_server_ready",
            "1 once the server has a snapshot loaded (as /readyz), else 0.",
            registry=registry,
        )
        self.reloads = Counter(
            "streamlearn_model_reloads_total", "Snapshots loaded by the server.", ["model"], registry=registry
        )
        self.reload_failures = Counter(
            "streamlearn_model_reload_failures_total",
            "Snapshots the server could not load (corrupt or mismatched).",
            ["model"],
            registry=registry,
        )
        self.serve_delay = Histogram(
            "streamlearn_snapshot_serve_delay_seconds",
            "Seconds from a snapshot's publication to the server serving it, by how it learned of it "
            "(an announcement, or a poll of the store).",
            ["source"],
            buckets=FRESHNESS_BUCKETS,
            registry=registry,
        )
        self.following = Gauge(
            "streamlearn_announcements_following",
            "1 while the server follows snapshot announcements on this topic; 0 while it polls the "
            "store instead (absent without --bootstrap-servers).",
            ["topic"],
            registry=registry,
        )
        self.announcements = Counter(
            "streamlearn_announcements_received_total",
            "Snapshot announcements read, by outcome (ignored: not newer, pinned, or not ours; invalid).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("served", "ignored", "invalid"):
            self.announcements.labels(outcome)
        self.predictions_logged = Counter(
            "streamlearn_predictions_logged_total",
            "Predictions for the prediction log, by outcome (sent: acknowledged by Kafka; dropped: "
            "a full queue or an undelivered message).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("sent", "dropped"):
            self.predictions_logged.labels(outcome)
        self.pinned_version = Gauge(
            "streamlearn_pinned_model_version",
            "Version an operator pinned (0: following the newest snapshot).",
            ["model"],
            registry=registry,
        )
        self.promotion_held = Gauge(
            "streamlearn_promotion_held_version",
            "Newest snapshot the promotion gate holds back (0: none held).",
            ["model"],
            registry=registry,
        )
        self.promotion_held_seconds = Gauge(
            "streamlearn_promotion_held_seconds",
            "Seconds the promotion gate has been holding newer snapshots back (0: none held).",
            ["model"],
            registry=registry,
        )
        self.open_connections = Gauge(
            "streamlearn_open_connections",
            "Client connections open (at most --max-connections).",
            registry=registry,
        )
        self.connections_rejected = Counter(
            "streamlearn_connections_rejected_total",
            "Connections answered 503 and closed because --max-connections were open.",
            registry=registry,
        )
        self.request_timeouts = Counter(
            "streamlearn_request_timeouts_total",
            "Requests answered 408 or closed because their headers or body arrived too slowly.",
            ["phase"],
            registry=registry,
        )
        for phase in ("headers", "body"):
            self.request_timeouts.labels(phase)
        self.client_disconnects = Counter(
            "streamlearn_client_disconnects_total",
            "Clients that disconnected before sending their whole request.",
            registry=registry,
        )
