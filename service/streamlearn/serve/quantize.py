"""Int8 serving (--quantize int8): an MLP's hidden layers with int8 weights, on the CPU.

PyTorch's dynamic quantization keeps a layer's weights as int8 (one scale per layer) and
quantizes the layer's input on the fly (to 7 bits on x86) from the range of the batch being
predicted, so an instance's prediction can shift slightly with the other instances of its request.

Only the layers between two hidden layers are quantized. The input layer stays float32: its
input, the standardized features, loses the most to 7 bits (bench/bench_quantize.py: quantized
too, it moves an MLP 512,512's probabilities by up to 0.059 rather than 0.004), and it is a small
share of a wide MLP's weights; the output layer has one row per output, too few to gain. A
linear model, the normalizer and the category tables stay float32 too: a single layer gains
nothing, and the tables are lookups, not products.
"""

import warnings

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
from torch.ao.quantization import quantize_dynamic

from streamlearn.models import MLPModel, OnlineModel

MODES = ("none", "int8")


def quantized(model: OnlineModel, mode: str) -> OnlineModel:
    """The model to serve under --quantize `mode`: for int8, an MLP's hidden-to-hidden nn.Linear
    layers replaced, in place, by int8 dynamically quantized ones; otherwise the model as it is.

    The model must be on the CPU (quantized layers run there only) and done learning.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; known: {', '.join(MODES)}")
    if mode == "none" or not isinstance(model, MLPModel):
        return model
    linear = [name for name, layer in model.layers.named_children() if isinstance(layer, nn.Linear)]
    hidden = set(linear[1:-1])  # not the input layer, nor the output layer (module docstring)
    if not hidden:  # one hidden layer: nothing worth quantizing
        return model
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which is not a dependency;
        # quantize_dynamic still works in torch 2.13. Only its own two warnings are silenced.
        warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        quantize_dynamic(model.layers.eval(), hidden, dtype=torch.qint8, inplace=True)
    return model


def quantization(model: nn.Module) -> str:
    """How a served model's layers hold their weights: "int8" once quantized(), else "none"."""
    return "int8" if any(isinstance(module, Int8Linear) for module in model.modules()) else "none"
