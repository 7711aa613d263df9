"""The server's view of the snapshot directory: the newest loadable snapshot of every model.

A reload builds the new model completely, then replaces the registry's mapping in a single
assignment; a request takes one ServedModel at its start and uses only it, so no request ever
sees a mix of two versions.
"""

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from streamlearn.errors import ModelNotFound, ModelNotReady, SnapshotError, SnapshotStoreUnavailable
from streamlearn.metrics import ServerMetrics
from streamlearn.models import ModelSpec, OnlineModel, build_model
from streamlearn.snapshots import Snapshot, SnapshotMeta, SnapshotStore

log = logging.getLogger("streamlearn.serve")


@dataclass(frozen=True)
class ServedModel:
    """One loaded snapshot, ready to predict."""

    name: str
    version: int
    model: OnlineModel
    meta: SnapshotMeta

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot) -> "ServedModel":
        if snapshot.meta.model is None:
            raise SnapshotError(f"snapshot {snapshot.model_name} v{snapshot.version} holds no model yet")
        model = build_model(ModelSpec.from_dict(snapshot.meta.model))
        model.load_state({k[6:]: v for k, v in snapshot.tensors.items() if k.startswith("model.")})
        if not all(torch.isfinite(t).all() for t in model.state_dict().values()):
            raise SnapshotError(f"snapshot {snapshot.model_name} v{snapshot.version} has non-finite weights")
        return cls(snapshot.model_name, snapshot.version, model.eval(), snapshot.meta)

    def describe(self) -> dict[str, Any]:
        spec = self.model.spec
        return {
            "name": self.name,
            "ready": True,
            "version": self.version,
            "records_trained": self.meta.records_trained,
            "created_at": self.meta.created_at,
            "task": spec.labels.task,
            "classes": spec.labels.class_names if spec.labels.task != "regression" else [],
            "n_features": spec.features.n_features,
            "feature_names": list(spec.features.names),
            "categorical_features": list(spec.features.categorical),
            "multi_categorical_features": list(spec.features.multi_valued),
            "arch": spec.arch,
            "drift": self.meta.drift,
        }


class ModelRegistry:
    """Loads new snapshots as they appear and hands out the current model per name."""

    def __init__(self, store: SnapshotStore, metrics: ServerMetrics) -> None:
        self.store = store
        self.metrics = metrics
        self._models: dict[str, ServedModel] = {}
        self._failed: dict[str, int] = {}  # newest version that failed to load, per model
        metrics.ready.set_function(lambda: float(self.ready))

    @property
    def names(self) -> list[str]:
        return sorted(self._models)

    @property
    def ready(self) -> bool:
        return bool(self._models)

    def get(self, name: str) -> ServedModel:
        models = self._models
        if name in models:
            return models[name]
        if not models:
            raise ModelNotReady("no snapshot has been loaded yet")
        raise ModelNotFound(f"model {name!r} not found; served models: {sorted(models)}")

    def versions(self, name: str) -> dict[str, Any]:
        """The versions of a served model in the store, oldest first, and the one being served."""
        served = self.get(name)  # ModelNotReady / ModelNotFound as for a predict
        return {"name": name, "served": served.version, "versions": self.store.versions(name)}

    def refresh(self) -> list[ServedModel]:
        """Load every model whose newest snapshot is newer than the one served; return the new ones."""
        loaded = []
        for name in self.store.models():
            current = self._models.get(name)
            versions = self.store.versions(name)  # one listing per model per poll
            floor = max(current.version if current else 0, self._failed.get(name, 0))
            if not versions or versions[-1] <= floor:
                continue
            served = self._load(name, current.version if current else 0, versions)
            if served is not None:
                self._models = {**self._models, name: served}  # the atomic swap
                self._export(served)
                loaded.append(served)
        return loaded

    def _load(self, name: str, served_version: int, versions: list[int]) -> ServedModel | None:
        for version in reversed(versions):
            if version <= served_version:
                break
            try:
                served = ServedModel.from_snapshot(self.store.load(name, version, training=False))
            except SnapshotStoreUnavailable:
                raise  # an outage, not a bad snapshot: keep serving, retry the next poll
            except Exception as exc:  # a bad snapshot, whatever it trips over, skips only itself
                self.metrics.reload_failures.labels(name).inc()
                log.warning("not serving: %s", exc)
                continue
            log.info("serving %s v%d (%d records learned)", name, version, served.meta.records_trained)
            return served
        self._failed[name] = versions[-1]  # nothing newer loads: do not retry until a newer one appears
        return None

    def _export(self, served: ServedModel) -> None:
        name = served.name
        created = served.meta.created_at_ms / 1000
        self.metrics.reloads.labels(name).inc()
        self.metrics.served_version.labels(name).set(served.version)
        self.metrics.served_records.labels(name).set(served.meta.records_trained)
        self.metrics.served_age.labels(name).set_function(lambda: time.time() - created)
