"""Warm start and transfer: a new model begins from another model's weights, some layers frozen.

--init-from names the source: a snapshot model directory (its newest version), one version's
directory, or a .safetensors file (local or an object-store URL) holding the model's tensors
(names as in the model's state_dict; a snapshot's own weights file, whose model tensors are
prefixed "model.", works too; shapes must match). Only weights and normalizer
statistics are taken, never the optimizer. The snapshots of the new model record the origin.
"""

import hashlib
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_safetensors
from torch import Tensor
from torch.nn import Module

from streamlearn.errors import ConfigError, SnapshotError
from streamlearn.models import OnlineModel
from streamlearn.snapshots import open_store
from streamlearn.snapshots.tensors import MODEL_PREFIX, unprefixed


def load_source(location: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The model tensors at `location`, and the origin to record in snapshots."""
    if location.endswith(".safetensors"):
        try:
            data = _read(location)
            tensors = load_safetensors(data)
        except Exception as exc:  # OSError, or safetensors' own errors for a malformed file
            raise ConfigError(f"--init-from {location}: cannot read it: {exc}") from None
        origin: dict[str, Any] = {"file": location, "sha256": hashlib.sha256(data).hexdigest()}
        if any(name.startswith(MODEL_PREFIX) for name in tensors):  # a snapshot's own weights file
            tensors = unprefixed(tensors)
        return tensors, origin
    parent, _, name = location.rstrip("/").rpartition("/")
    if not parent and location.startswith("/"):
        parent = "/"
    try:
        if name.isdigit():  # one version: <root>/<model>/<version>
            root, _, model = parent.rpartition("/")
            snapshot = open_store(root or ("/" if parent.startswith("/") else ".")).load(
                model, int(name), training=False
            )
        else:
            found = open_store(parent or ".").load_latest(name, training=False)
            if found is None:
                raise ConfigError(f"--init-from {location}: no snapshot of model {name!r} there")
            snapshot = found
    except SnapshotError as exc:
        raise ConfigError(f"--init-from {location}: {exc}") from None
    origin = {
        "snapshot": location,
        "model_name": snapshot.model_name,
        "version": snapshot.version,
        "weights_sha256": snapshot.meta.weights_sha256,
        "records_trained": snapshot.meta.records_trained,
    }
    return unprefixed(snapshot.tensors), origin


def _read(location: str) -> bytes:
    """A file's bytes, from a local path or an fsspec URL (s3://...)."""
    if "://" not in location:
        return Path(location).read_bytes()
    import fsspec  # only object-store deployments need it: the `s3` extra

    with fsspec.open(location, "rb") as file:
        return file.read()


def warm_start(model: OnlineModel, location: str) -> dict[str, Any]:
    """Load the source's weights into `model`; the origin to record."""
    tensors, origin = load_source(location)
    try:
        model.load_state(tensors)
    except SnapshotError as exc:
        raise ConfigError(f"--init-from {location}: {exc}") from None
    return origin


def freeze(model: OnlineModel, layers: tuple[str, ...]) -> None:
    """Stop the named layers (module paths such as layers.0) from learning."""
    modules = dict(model.named_modules())
    learnable = [name for name, m in modules.items() if name and _has_parameters(m, recurse=False)]
    unknown = [layer for layer in layers if layer not in modules or not _has_parameters(modules[layer])]
    if unknown:
        raise ConfigError(
            f"--freeze {','.join(unknown)}: no such layer; the model has {', '.join(learnable)}"
        )
    for layer in layers:
        for parameter in modules[layer].parameters():
            parameter.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"--freeze {','.join(layers)}: nothing would be left to learn")


def _has_parameters(module: Module, recurse: bool = True) -> bool:
    return next(iter(module.parameters(recurse=recurse)), None) is not None
