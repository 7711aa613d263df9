"""`streamlearn train`'s settings, composed from field groups that each validate themselves:
labels, features, model, optimizer, loss, drift, and the loop (Kafka, snapshots, time)."""

import itertools
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from streamlearn.config.base import (
    LOSSES,
    TaskSetting,
    _Announcements,
    _DeadLetters,
    _Kafka,
    _LabelJoin,
    _ModelName,
    _Settings,
    _Snapshots,
    _split_commas,
    _TrainerMetricsPort,
)


class _Labels(_Settings):
    """What the label is: the task and its classes."""

    task: TaskSetting
    classes: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Class names, comma-separated (multiclass; or two names for binary)."
    )
    num_classes: int | None = Field(None, ge=2, le=100_000, description="Number of classes (multiclass).")

    @field_validator("classes", mode="before")
    @classmethod
    def _class_list(cls, value: Any) -> Any:
        return _split_commas(value)

    @model_validator(mode="after")
    def _classes_fit_the_task(self) -> "_Labels":
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("--classes has a duplicate name")
        if self.task == "multiclass" and not self.classes and self.num_classes is None:
            raise ValueError("--task multiclass needs --classes or --num-classes")
        if self.classes and self.num_classes is not None and len(self.classes) != self.num_classes:
            raise ValueError("--classes and --num-classes disagree")
        if self.task == "binary" and (
            (self.classes and len(self.classes) != 2) or self.num_classes not in (None, 2)
        ):
            raise ValueError("--task binary has exactly two classes")
        if self.task == "regression" and (self.classes or self.num_classes):
            raise ValueError("--task regression takes no classes")
        return self


class _Features(_Settings):
    """The features: how many, their names and kinds, and the categories' table."""

    n_features: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Feature vector length; default: taken from the first valid record.",
    )
    feature_names: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Order of dict features, comma-separated; default: sorted keys of the first record."
    )
    numeric: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Dict features that must be numbers, comma-separated (others: by the first record)."
    )
    categorical: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Dict features that are one category (a string) each, comma-separated; default: "
        "those whose first value is a string.",
    )
    multi_categorical: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Dict features that are lists of categories (strings), comma-separated; default: "
        "those whose first value is a list.",
    )
    hash_buckets: int = Field(
        2**18,
        ge=1,
        le=2**26,
        description="Rows of the hashed category table (shared by all categorical features).",
    )
    embedding_dim: int = Field(8, ge=1, le=1024, description="Width of a category's embedding (MLP).")
    min_count: int = Field(
        1,
        ge=1,
        description="Categories whose row was seen fewer times than this share their feature's rare row.",
    )
    max_categories: int = Field(
        32, ge=1, le=1024, description="Most categories in one multi-valued feature of a record."
    )
    max_record_bytes: int = Field(1_000_000, ge=16, description="Larger records are rejected as invalid.")

    @field_validator("feature_names", "numeric", "categorical", "multi_categorical", mode="before")
    @classmethod
    def _name_lists(cls, value: Any) -> Any:
        return _split_commas(value)

    @model_validator(mode="after")
    def _kinds_agree(self) -> "_Features":
        if self.feature_names and self.n_features not in (None, len(self.feature_names)):
            raise ValueError("--feature-names and --n-features disagree")
        kinds = {"--numeric": self.numeric, "--categorical": self.categorical,
                 "--multi-categorical": self.multi_categorical}  # fmt: skip
        for (a, names_a), (b, names_b) in itertools.combinations(kinds.items(), 2):
            if both := sorted(set(names_a) & set(names_b)):
                raise ValueError(f"{both[0]!r} is in both {a} and {b}")
        if self.feature_names and not set(self.numeric) <= set(self.feature_names):
            raise ValueError("--numeric names a feature that --feature-names lacks")
        if clash := sorted(set(self.feature_names) & {*self.categorical, *self.multi_categorical}):
            raise ValueError(f"{clash[0]!r} is in --feature-names (numeric) and declared categorical")
        return self


class _Model(_Settings):
    """The model: its architecture, widths, input scaling, seed, and where it starts from."""

    arch: str = Field("mlp", description="Model architecture: linear or mlp (see models.py).")
    hidden: Annotated[tuple[int, ...], NoDecode] = Field(
        (64, 64), description="Hidden layer widths of the MLP, comma-separated."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout rate after each hidden layer of the MLP.")
    scale_clip: float = Field(
        10.0,
        ge=0,
        description="Bound on a standardized feature: the model sees it clipped to +-this many standard "
        "deviations, and the running mean and variance learn it winsorized so (0: no bound).",
    )
    scale_horizon: int = Field(
        100_000,
        ge=0,
        description="Records the running mean and variance cover, older ones fading (0: all, forever).",
    )
    seed: int = Field(0, description="Seed for weight initialisation.")
    init_from: str | None = Field(
        None,
        description="Start a new model from another's weights: a snapshot model directory (its "
        "newest version), a version directory, or a .safetensors file of matching shapes.",
    )
    freeze: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Layers that do not learn, comma-separated module paths (e.g. layers.0)."
    )

    @field_validator("hidden", "freeze", mode="before")
    @classmethod
    def _model_lists(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(width < 1 for width in value):
            raise ValueError("hidden layer widths must be positive")
        return value


class _Optimizer(_Settings):
    """How a step learns: step sizes, the optimizer and its schedule, clipping, replay."""

    step_policy: Literal["auto", "small", "large"] = Field(
        "auto",
        description="Optimizer steps per micro-batch: small steps of --sub-batch-size records, one "
        "step per micro-batch (large), or auto: small steps while the stream leaves time, the rest "
        "of a micro-batch in one step once the next one is waiting (small with --deterministic).",
    )
    sub_batch_size: int = Field(8, ge=1, le=100_000, description="Records per small optimizer step.")
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop", "adagrad", "radam"] = Field(
        "adam", description="Optimizer."
    )
    lr: float = Field(0.005, gt=0, le=10, description="Learning rate.")
    momentum: float = Field(0.0, ge=0, lt=1, description="Momentum of sgd and rmsprop.")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd, with --momentum).")
    weight_decay: float = Field(
        0.0, ge=0, description="L2 weight decay (decoupled, as AdamW has it, with adamw)."
    )
    lr_schedule: Literal["constant", "inverse-sqrt", "cyclic", "cosine-restarts"] = Field(
        "constant", description="Learning-rate schedule, counted in records learned (see README)."
    )
    lr_schedule_records: int = Field(
        10_000, ge=1, description="Period of the learning-rate schedule, in records."
    )
    lr_schedule_floor: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Lowest learning-rate factor of the cyclic and cosine-restarts schedules.",
    )
    clip_grad_norm: float | None = Field(None, gt=0, description="Clip the gradient norm to this value.")
    embedding_optimizer: Literal["adagrad", "sparse-adam", "sgd"] = Field(
        "adagrad", description="Optimizer of the category table, which updates only the rows a step touches."
    )
    embedding_lr: float | None = Field(
        None,
        gt=0,
        le=100,
        description="Learning rate of the category table; default: 0.5 (adagrad, sgd), 0.02 (sparse-adam).",
    )
    l1: float = Field(0.0, ge=0, description="L1 penalty on the weights (not the biases), added to the loss.")
    replay_records: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="Records kept in a reservoir of the stream so far and mixed into every step "
        "against forgetting (0: no replay); saved in every snapshot.",
    )
    replay_ratio: float = Field(
        0.5, gt=0, le=16, description="Replayed records per fresh record in each step, with --replay-records."
    )

    @model_validator(mode="after")
    def _momentum_fits(self) -> "_Optimizer":
        if self.nesterov and (self.optimizer != "sgd" or not self.momentum):
            raise ValueError("--nesterov needs --optimizer sgd and a --momentum")
        return self


class _Loss(_Labels):
    """The training loss, which must fit the task."""

    loss: Literal["mse", "huber", "log", "focal", "cross-entropy"] | None = Field(
        None,
        description="Training loss: mse or huber (regression), log or focal (binary), cross-entropy "
        "or focal (multiclass); default: mse, log, cross-entropy.",
    )
    huber_delta: float = Field(1.0, gt=0, description="Where the huber loss turns from squared to linear.")
    focal_gamma: float = Field(2.0, ge=0, description="Focusing exponent of the focal loss.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="Label smoothing of the multiclass cross-entropy."
    )
    class_weighting: Literal["none", "balanced"] = Field(
        "none",
        description="balanced: weigh each record by the inverse of its class's recent frequency "
        "(classification), so rare classes count as much as common ones.",
    )

    @model_validator(mode="after")
    def _loss_fits_the_task(self) -> "_Loss":
        if self.loss is not None and self.loss not in LOSSES[self.task]:
            fitting = ", ".join(LOSSES[self.task])
            raise ValueError(f"--loss {self.loss} does not fit --task {self.task} ({fitting})")
        if self.label_smoothing and (self.task != "multiclass" or self.loss == "focal"):
            raise ValueError("--label-smoothing applies to the multiclass cross-entropy only")
        if self.class_weighting == "balanced" and self.task == "regression":
            raise ValueError("--class-weighting balanced needs classes (binary or multiclass)")
        return self


class _Drift(_Settings):
    """Drift detection, and what a detected drift does."""

    on_drift: Literal["none", "boost-lr", "reset-optimizer", "reset-model"] = Field(
        "boost-lr", description="What to do when concept drift is detected (see README, Drift)."
    )
    drift_window: int = Field(2000, ge=100, description="Records in the drift reference and recent windows.")
    drift_psi_threshold: float = Field(
        0.25, gt=0, description="Population stability index above which feature or label drift is reported."
    )
    drift_per_feature: bool = Field(
        False, description="Also export the PSI of every feature (up to 100 features) as a labelled metric."
    )


class _Loop(_Settings):
    """The loop: the consumer group, micro-batches, snapshots' pace, device, offsets, time limits."""

    group: str = Field("streamlearn", min_length=1, description="Kafka consumer group id.")
    batch_size: int = Field(256, ge=1, le=100_000, description="Largest micro-batch, in records.")
    max_batch_wait_ms: int = Field(
        50, ge=1, le=60_000, description="Longest wait for a micro-batch to fill before learning from it."
    )
    max_order_wait_ms: int = Field(
        3000,
        ge=0,
        le=600_000,
        description="Records are learned in event-time order across partitions; a partition with "
        "nothing buffered that sends nothing for this long stops holding the others back (0: never "
        "wait for a silent partition). Ignored with --deterministic.",
    )
    snapshot_interval_s: float = Field(2.0, gt=0, description="Seconds between snapshots.")
    keep_snapshots: int = Field(10, ge=1, description="Newest snapshots kept per model.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Training device; auto picks CUDA if present."
    )
    metrics_host: str = Field("127.0.0.1", description="Address of the trainer's /metrics endpoint.")
    start_offset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where to start in a partition with no snapshot or committed offset."
    )
    on_offset_out_of_range: Literal["earliest", "stop"] = Field(
        "earliest",
        description="A partition whose resume offset (snapshot's or group's) lies outside its log, its "
        "topic recreated or truncated: resume within the log, at its start unless a known offset lies "
        "in it (earliest), or stop the trainer (stop). Either way it is logged and counted.",
    )
    deterministic: bool = Field(
        False,
        description="Micro-batches of exactly --batch-size records of one partition, so that a run "
        "interrupted by crashes ends with the same weights as an uninterrupted one.",
    )
    session_timeout_ms: int = Field(
        6000,
        ge=1000,
        le=300_000,
        description="Kafka group session timeout; a crashed trainer's partitions move after it.",
    )
    group_instance_id: str | None = Field(
        None, description="Static group membership id (e.g. the pod name): a restart keeps its partitions."
    )
    resume_from: Literal["snapshot", "group"] = Field(
        "snapshot",
        description="Where to resume reading: the snapshot's offsets (exactly once), or the group's "
        "committed offsets, keeping only the snapshot's weights (after the topic was recreated, say).",
    )
    shutdown_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest a clean shutdown waits for the broker before giving up on the commit.",
    )
    collective_timeout_s: float = Field(
        20.0,
        gt=0,
        le=3600,
        description="Under torchrun with many ranks: longest a rank waits for the others in a step or a "
        "snapshot before it exits, so torchrun restarts the group from the newest snapshot.",
    )


class TrainSettings(
    _Loop,
    _Drift,
    _Loss,
    _Optimizer,
    _Model,
    _Features,
    _TrainerMetricsPort,
    _Snapshots,
    _Announcements,
    _LabelJoin,
    _ModelName,
    _DeadLetters,
    _Kafka,
):
    """`streamlearn train`: consume events, learn test-then-train, write snapshots."""

    @model_validator(mode="after")
    def _join_fits_the_task(self) -> "TrainSettings":
        if self.on_missing_label == "negative" and self.task != "binary":
            raise ValueError("--on-missing-label negative needs --task binary")
        return self
