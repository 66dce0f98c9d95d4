"""JANG's quantized layers: mlx-lm's quantized modules, run through jang.kernels.

They subclass MLX's / mlx-lm's own classes, so everything that inspects a
model (``isinstance(m, nn.QuantizedLinear)``, saving, LoRA) keeps working;
only the forward pass is routed through ``jang.kernels`` so fused kernels can
take over per backend.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear
from mlx_lm.models.switch_layers import QuantizedSwitchLinear as _MlxSwitch

from . import kernels


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x):
        y = kernels.quantized_matmul(
            x, self["weight"], self["scales"], self.get("biases"),
            self.group_size, self.bits, self.mode,
        )
        return y + self["bias"] if "bias" in self else y


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def __call__(self, ids):
        return kernels.embedding_lookup(
            ids, self["weight"], self["scales"], self.get("biases"),
            self.group_size, self.bits, self.mode,
        )

    def as_linear(self, x):
        return kernels.quantized_matmul(
            x, self["weight"], self["scales"], self.get("biases"),
            self.group_size, self.bits, self.mode,
        )


class QuantizedSwitchLinear(_MlxSwitch):
    def __call__(self, x, indices, sorted_indices=False):
        if getattr(self, "global_scale", None) is not None:
            return super().__call__(x, indices, sorted_indices)  # nvfp4 experts: MLX's path
        y = kernels.gather_qmm(
            x, self["weight"], self["scales"], self.get("biases"), indices,
            self.group_size, self.bits, self.mode, sorted_indices,
        )
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y


# MLX / mlx-lm quantized class -> JANG class; the float class each replaces.
JANG_CLASS = {
    nn.QuantizedLinear: QuantizedLinear,
    nn.QuantizedEmbedding: QuantizedEmbedding,
    _MlxSwitch: QuantizedSwitchLinear,
}
_FLOAT_TO_JANG = {
    nn.Linear: QuantizedLinear,
    nn.Embedding: QuantizedEmbedding,
    # MLA's per-head matrices (DeepSeek's embed_q / unembed_out) are multiplied both
    # ways round (transpose or not); mlx-lm's own quantized class runs them.
    MultiLinear: QuantizedMultiLinear,
}


def _jang_class_for_float(module):
    from mlx_lm.models.switch_layers import SwitchLinear

    if isinstance(module, SwitchLinear):
        return QuantizedSwitchLinear
    for float_cls, jang_cls in _FLOAT_TO_JANG.items():
        if isinstance(module, float_cls):
            return jang_cls
    raise TypeError(f"JANG cannot quantize a {type(module).__name__}")


def _bare(cls):
    """An instance of cls with no parameters yet (skips the random init)."""
    obj = cls.__new__(cls)
    nn.Module.__init__(obj)
    return obj


def adopt(module):
    """The JANG layer holding the very same arrays as an MLX quantized module."""
    jang_cls = JANG_CLASS.get(type(module))
    if jang_cls is None:
        return module
    obj = _bare(jang_cls)
    obj.__dict__.update(module.__dict__)
    dict.update(obj, module)
    return obj


def quantized_layer(float_module, weight, scales, biases, group_size, bits, mode="affine"):
    """A JANG layer for float_module, from already-quantized arrays."""
    cls = _jang_class_for_float(float_module)
    obj = _bare(cls)
    obj.group_size, obj.bits, obj.mode = group_size, bits, mode
    obj.weight, obj.scales, obj.biases = weight, scales, biases
    if cls is QuantizedEmbedding:
        obj.num_embeddings, obj.dims = float_module.weight.shape
    if cls is QuantizedSwitchLinear:
        obj.global_scale = None
    if "bias" in float_module:
        obj.bias = float_module["bias"]
    obj.freeze()
    return obj


def adopt_all(model: nn.Module) -> int:
    """Swap every MLX quantized module of model for its JANG class; returns the count."""
    swaps = [(path, adopt(m)) for path, m in model.named_modules() if type(m) in JANG_CLASS]
    if swaps:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten(swaps))
    return len(swaps)
