"""The server's view of the snapshot store: which version of every model is served, and why.

By default the newest loadable snapshot; an operator can pin a version (or roll back to the
previous one), and an opt-in promotion gate holds back a snapshot that predicts worse than the
served one. Pins and the gate's baseline live in the store's serving.json, shared by every
replica and kept across restarts.

A reload builds the new model completely, then replaces the registry's mapping in a single
assignment; a request takes one ServedModel at its start and uses only it, so no request ever
sees a mix of two versions. Decisions (polls, announcements, admin calls) take one lock.
"""

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from streamlearn.errors import (
    ModelNotFound,
    ModelNotReady,
    SnapshotError,
    SnapshotStoreUnavailable,
    VersionConflict,
)
from streamlearn.metrics import ServerMetrics
from streamlearn.models import ModelSpec, OnlineModel, build_model, check_fits
from streamlearn.serve.gate import PromotionGate, Verdict
from streamlearn.serve.numpy_forward import NumpyForward
from streamlearn.serve.quantize import quantization, quantized
from streamlearn.snapshots import ServingState, Snapshot, SnapshotMeta, SnapshotStore
from streamlearn.snapshots.tensors import all_finite, unprefixed

log = logging.getLogger("streamlearn.serve")


@dataclass(frozen=True)
class ServedModel:
    """One loaded snapshot, ready to predict."""

    name: str
    version: int
    model: OnlineModel
    meta: SnapshotMeta
    fast: NumpyForward | None = None  # small batches through numpy, when the model allows it

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, quantize: str = "none") -> "ServedModel":
        """The snapshot's model, checked, then quantized if asked (--quantize; quantize.py)."""
        if snapshot.meta.model is None:
            raise SnapshotError(f"snapshot {snapshot.model_name} v{snapshot.version} holds no model yet")
        spec = ModelSpec.from_dict(snapshot.meta.model)
        tensors = unprefixed(snapshot.tensors)
        check_fits(spec, tensors)  # the weights' shapes before the model: meta.json may declare any size
        model = build_model(spec)
        model.load_state(tensors)
        if not all_finite(model.state_dict().values()):
            raise SnapshotError(f"snapshot {snapshot.model_name} v{snapshot.version} has non-finite weights")
        model = quantized(model.eval(), quantize)
        return cls(snapshot.model_name, snapshot.version, model, snapshot.meta, NumpyForward.of(model))

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
            "quantized": quantization(self.model),
        }


HISTORY = 16  # versions served before the current one, per model, for rollback


@dataclass(frozen=True)
class Hold:
    """A newer snapshot the promotion gate keeps from being served."""

    version: int
    verdict: Verdict
    since: float  # time.time() when the gate began holding

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "reason": self.verdict.reason,
            "candidate_loss": self.verdict.candidate_loss,
            "served_loss": self.verdict.served_loss,
            "held_for_s": round(time.time() - self.since, 3),
        }


class ModelRegistry:
    """Loads new snapshots as they appear and hands out the current model per name."""

    def __init__(
        self,
        store: SnapshotStore,
        metrics: ServerMetrics,
        gate: PromotionGate | None = None,
        quantize: str = "none",
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.gate = gate
        self.quantize = quantize  # --quantize: how every loaded model is served
        self._models: dict[str, ServedModel] = {}
        self._considered: dict[str, int] = {}  # newest version judged and not served (failed or held)
        self._states: dict[str, ServingState] = {}  # serving.json as last read, per model
        self._held: dict[str, Hold] = {}
        self._history: dict[str, deque[int]] = {}
        self._lock = threading.RLock()
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

    def describe(self, name: str) -> dict[str, Any]:
        """The served snapshot, the pin and the held snapshot of one model."""
        served = self.get(name)
        hold = self._held.get(name)
        return served.describe() | {
            "pinned": self._states.get(name, ServingState()).pinned,
            "held": None if hold is None else hold.describe(),
        }

    def versions(self, name: str) -> dict[str, Any]:
        """The versions of a served model in the store, oldest first, and the one being served."""
        served = self.get(name)  # ModelNotReady / ModelNotFound as for a predict
        return {
            "name": name,
            "served": served.version,
            "pinned": self._states.get(name, ServingState()).pinned,
            "versions": self.store.versions(name),
        }

    # -- following the store -------------------------------------------------------------------------

    def refresh(self) -> list[ServedModel]:
        """Bring every model up to date with the store; return the snapshots newly served."""
        return [served for name in self.store.models() if (served := self.refresh_model(name)) is not None]

    def refresh_model(self, name: str) -> ServedModel | None:
        """Re-read a model's serving state and versions (one listing), and serve what they say."""
        with self._lock:
            try:
                state = self.store.serving_state(name)
            except SnapshotError as exc:  # corrupt or unreadable: keep to what we knew
                log.warning("%s; keeping the serving state last read", exc)
                state = self._states.get(name, ServingState())
            return self._follow(name, state, self.store.versions(name))

    def offer(self, name: str, version: int) -> ServedModel | None:
        """A snapshot announced as published: serve it if it is newer and nothing holds it back."""
        with self._lock:
            if name not in self._states:  # a model this server has not seen yet, if it is in the store
                return self.refresh_model(name) if name in self.store.models() else None
            try:
                meta = self.store.meta(name, version)
            except SnapshotError:  # not in this server's store: another deployment's, or pruned
                log.debug(
                    "ignoring the announcement of %s v%d: not in %s", name, version, self.store.location
                )
                return None
            return self._follow(name, self._states[name], [version], "announcement", meta)

    def _follow(
        self,
        name: str,
        state: ServingState,
        versions: list[int],
        source: str = "poll",
        known: SnapshotMeta | None = None,
    ) -> ServedModel | None:
        """Serve what the state and the versions say; `known`: one version's meta.json, already read."""
        self._states[name] = state
        current = self._models.get(name)
        if state.pinned is not None:
            if current is not None and current.version == state.pinned:
                return None
            if state.pinned != self._considered.get(name):
                pinned = self._try_load(name, state.pinned)
                if pinned is not None:
                    self._held.pop(name, None)
                    return self._swap(pinned, source)
                self._considered[name] = state.pinned  # do not retry it every poll
            if current is not None:
                return None
            log.error("pinned %s v%d does not load; serving the newest meanwhile", name, state.pinned)
        baseline = state.held_against
        if self.gate is None and baseline is not None:  # the gate was turned off: let the version go
            state = self._change_state(name, quiet=True, held_against=None)
        if current is None and self.gate is not None and baseline is not None and baseline in versions:
            # Restarted while the gate held newer snapshots: serve what it held them against.
            current = self._try_load(name, baseline)
            if current is not None:
                self._swap(current, source)
        floor = max(current.version if current else 0, self._considered.get(name, 0))
        for version in reversed(versions):
            if version <= floor:
                break
            meta = known if known is not None and known.version == version else self._try_meta(name, version)
            if meta is None:
                continue
            if self.gate is not None and current is not None:
                verdict = self.gate.judge(meta, current.meta)
                if not verdict.promote:
                    self._hold(name, version, verdict, current.version)
                    break
            served = self._try_load(name, version, meta)
            if served is not None:
                if self._held.pop(name, None) is not None or state.held_against is not None:
                    self._change_state(name, quiet=True, held_against=None)
                return self._swap(served, source)
        if versions and versions[-1] > floor:
            self._considered[name] = versions[-1]  # nothing newer loads: wait for a newer one
        return None

    # -- operators -----------------------------------------------------------------------------------

    def pin(self, name: str, version: int) -> dict[str, Any]:
        """Serve `version` of a model, and nothing else until unpinned; every replica follows."""
        with self._lock:
            self.get(name)
            if version not in self.store.versions(name):
                raise ModelNotFound(f"model {name!r} has no version {version} in the snapshot store")
            served = self._try_load(name, version)
            if served is None:
                raise VersionConflict(f"{name} v{version} does not load (see the server's log)")
            before = self._states.get(name, ServingState()).pinned
            self._change_state(name, pinned=version)
            if version not in self.store.versions(name):  # pruned between the check and the pin
                self._change_state(name, pinned=before)
                raise VersionConflict(f"{name} v{version} was pruned meanwhile; pin a newer one")
            self._held.pop(name, None)
            if served.version != self.get(name).version:
                self._swap(served, "pin")
            log.info("pinned %s to v%d", name, version)
            return self.versions(name)

    def unpin(self, name: str) -> dict[str, Any]:
        """Follow the newest snapshot again (through the promotion gate, if on)."""
        with self._lock:
            self.get(name)
            state = self._change_state(name, pinned=None)
            self._considered.pop(name, None)
            self._follow(name, state, self.store.versions(name), source="unpin")
            log.info("unpinned %s", name)
            return self.versions(name)

    def rollback(self, name: str) -> dict[str, Any]:
        """Pin an earlier version: the last one served before the current one, else the newest older one
        in the store. Rolling back again goes further back."""
        with self._lock:
            current = self.get(name).version
            available = set(self.store.versions(name))
            earlier = [v for v in reversed(self._history.get(name, ())) if v in available and v < current]
            earlier += sorted((v for v in available if v < current), reverse=True)
            if not earlier:
                raise VersionConflict(
                    f"no version of {name} earlier than v{current} is in the snapshot store"
                )
            return self.pin(name, earlier[0])

    # -- the steps -----------------------------------------------------------------------------------

    def _try_meta(self, name: str, version: int) -> SnapshotMeta | None:
        try:
            return self.store.meta(name, version)
        except SnapshotError as exc:
            self.metrics.reload_failures.labels(name).inc()
            log.warning("not serving: %s", exc)
            return None

    def _try_load(self, name: str, version: int, meta: SnapshotMeta | None = None) -> ServedModel | None:
        try:
            snapshot = self.store.load(name, version, training=False, meta=meta)
            return ServedModel.from_snapshot(snapshot, self.quantize)
        except SnapshotStoreUnavailable:
            raise  # an outage, not a bad snapshot: keep serving, retry the next poll
        except Exception as exc:  # a bad snapshot, whatever it trips over, skips only itself
            self.metrics.reload_failures.labels(name).inc()
            log.warning("not serving: %s", exc)
            return None

    def _hold(self, name: str, version: int, verdict: Verdict, served: int) -> None:
        held = self._held.get(name)
        self._held[name] = Hold(version, verdict, held.since if held else time.time())
        self._considered[name] = version
        log.warning("promotion gate holds %s v%d: %s (serving v%d)", name, version, verdict.reason, served)
        if self._states.get(name, ServingState()).held_against != served:
            self._change_state(name, quiet=True, held_against=served)

    def _hold_of(self, name: str) -> tuple[int, float]:
        """The version held back and for how many seconds; (0, 0.0) when none is."""
        hold = self._held.get(name)
        return (0, 0.0) if hold is None else (hold.version, time.time() - hold.since)

    def _change_state(self, name: str, quiet: bool = False, **changes: int | None) -> ServingState:
        """Change fields of a model's serving.json, as it is in the store now (another replica may
        have changed other fields), and keep it there; quiet: a failure is only logged."""
        try:
            state = self.store.serving_state(name).model_copy(update=changes)
            self.store.save_serving_state(name, state)
        except (SnapshotError, SnapshotStoreUnavailable) as exc:
            if not quiet:
                raise SnapshotStoreUnavailable(f"cannot keep the change: {exc}") from None
            log.warning("serving state of %s not kept: %s", name, exc)
            return self._states.get(name, ServingState())
        self._states[name] = state
        return state

    def _swap(self, served: ServedModel, source: str) -> ServedModel:
        name = served.name
        previous = self._models.get(name)
        if previous is not None:
            self._history.setdefault(name, deque(maxlen=HISTORY)).append(previous.version)
        self._models = {**self._models, name: served}  # the atomic swap
        fresh = (
            previous is not None and served.version > previous.version and source in ("poll", "announcement")
        )
        if fresh:  # a newly published version: how long it took to be served
            created = served.meta.created_at_ms / 1000
            self.metrics.serve_delay.labels(source).observe(max(time.time() - created, 0.0))
        log.info("serving %s v%d (%d records learned)", name, served.version, served.meta.records_trained)
        self._export(served)
        return served

    def _export(self, served: ServedModel) -> None:
        name = served.name
        created = served.meta.created_at_ms / 1000
        self.metrics.reloads.labels(name).inc()
        self.metrics.served_version.labels(name).set(served.version)
        self.metrics.served_records.labels(name).set(served.meta.records_trained)
        self.metrics.served_age.labels(name).set_function(lambda: time.time() - created)
        # Read at each scrape, so a hold ending any way (a promotion, a pin) shows at once.
        self.metrics.promotion_held.labels(name).set_function(lambda: self._hold_of(name)[0])
        self.metrics.promotion_held_seconds.labels(name).set_function(lambda: self._hold_of(name)[1])
        self.metrics.pinned_version.labels(name).set_function(
            lambda: self._states.get(name, ServingState()).pinned or 0
        )
