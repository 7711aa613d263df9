"""A served model's predictions as a few numpy operations, for small batches of numeric features.

torch dispatches each operation in 10 to 20 µs, so a predict of one instance through an MLP 64,64
(normalize, three linear layers, two ReLUs, the head) spends some 180 µs in dispatch for
microseconds of arithmetic; numpy does it in under 100 µs. The plan is read once from
the loaded model, when a snapshot is swapped in: it exists for models whose scores are a chain
of nn.Linear, nn.ReLU and (in eval, a no-op) nn.Dropout over numeric features, which covers the
linear and MLP architectures without categorical features and unquantized. Anything else, and
any batch of more than MAX_WORK multiply-adds (where the arithmetic dominates and torch's
kernels win: for an MLP 64,64 on 10 features, beyond some 400 instances; for 512,512, beyond
a few), predicts through torch. Both use one thread (--torch-threads; OPENBLAS_NUM_THREADS).
tests/test_numpy_forward.py holds both paths to the same answers.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from streamlearn.models import LinearModel, MLPModel, OnlineModel, Prediction

MAX_WORK = 2_000_000  # multiply-adds in a batch; one thread: numpy 282 µs and torch 343 at 1.2 M


@dataclass(frozen=True)
class NumpyForward:
    """Normalize (and clip) -> layers -> head, as numpy arrays taken from one loaded model."""

    shift: np.ndarray
    scale: np.ndarray | None
    clip: float | None  # the bound on a standardized value, as the normalizer has it (None: none)
    layers: tuple[tuple[np.ndarray, np.ndarray] | None, ...]  # (W transposed, b), or None for a ReLU
    task: str
    max_rows: int  # the most instances worth predicting through numpy (MAX_WORK)

    @classmethod
    def of(cls, model: OnlineModel) -> "NumpyForward | None":
        """The plan for `model`, or None when it has parts numpy does not do here."""
        if model.categories is not None:
            return None
        if isinstance(model, LinearModel):
            modules: list[nn.Module] = [model.linear]
        elif isinstance(model, MLPModel):
            modules = list(model.layers)
        else:
            return None
        layers: list[tuple[np.ndarray, np.ndarray] | None] = []
        for module in modules:
            if type(module) is nn.Linear:  # exactly: a quantized linear layer is another type
                weight = module.weight.detach().float().numpy().T.copy()
                layers.append((weight, module.bias.detach().float().numpy().copy()))
            elif type(module) is nn.ReLU:
                layers.append(None)
            elif type(module) is not nn.Dropout:  # a no-op when serving (eval)
                return None
        normalizer = model.normalizer
        shift, scale = normalizer._affine(torch.float32)
        work = sum(layer[0].size for layer in layers if layer is not None)  # multiply-adds per row
        return cls(
            shift.numpy().copy(),
            None if scale is None else scale.numpy().copy(),
            normalizer.clip if normalizer.clip and scale is not None else None,
            tuple(layers),
            model.spec.labels.task,
            max(MAX_WORK // max(work, 1), 1),
        )

    def standardize(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused by the caller
            shifted = x - self.shift
            return shifted if self.scale is None else shifted / self.scale

    def predict(self, standardized: np.ndarray) -> Prediction:
        """The prediction for standardized values, clipped first as the normalizer clips them."""
        out = standardized if self.clip is None else np.clip(standardized, -self.clip, self.clip)
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite scores are refused by the caller
            for layer in self.layers:
                out = np.maximum(out, 0) if layer is None else out @ layer[0] + layer[1]
            return self._head(out.astype(np.float32, copy=False))

    def _head(self, scores: np.ndarray) -> Prediction:
        if self.task == "regression":
            return Prediction(torch.from_numpy(scores), torch.from_numpy(scores[:, 0]))
        if self.task == "binary":
            positive = 1 / (1 + np.exp(-scores[:, 0]))
            probabilities = np.stack([1 - positive, positive], axis=1).astype(np.float32)
            values = (positive > 0.5).astype(np.int64)
        else:
            exp = np.exp(scores - scores.max(axis=1, keepdims=True))
            probabilities = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
            values = probabilities.argmax(axis=1)
        return Prediction(torch.from_numpy(scores), torch.from_numpy(values), torch.from_numpy(probabilities))
