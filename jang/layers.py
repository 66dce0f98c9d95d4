"""JANG's quantized layers: mlx-lm's quantized modules, run through jang.kernels.

They subclass MLX's / mlx-lm's own classes, so everything that inspects a
model (``isinstance(m, nn.QuantizedLinear)``, saving, LoRA) keeps working;
only the forward pass is routed through ``jang.kernels`` so fused kernels can
take over per backend.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import KVCache
from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear
from mlx_lm.models.switch_layers import QuantizedSwitchLinear as _MlxSwitch

from . import kernels


class QuantizedLinear(nn.QuantizedLinear):
    jang_fusable = True  # the fused decode kernels (kernels.qkv ...) may read its arrays

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
    if kernels.route("swiglu"):
        fuse_mlps(model)
    if kernels.route("attention"):
        patch_attention()
    if kernels.route("compiled_decode"):
        compile_decode(model)
    return len(swaps)


# ---------------------------------------------------------------- fused GPU paths
# mlx-lm modules whose MLP is down(swiglu(gate(x), up(x))) and whose attention calls
# base.scaled_dot_product_attention: there, one fused kernel can replace the MLP's
# two GEMVs and product, and attention can run JANG's kernel. Elsewhere (and on the
# CPU, and wherever kernels.ROUTES says MLX's op is faster) the original code runs.
SWIGLU_MODULES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mistral3")
ATTENTION_MODULES = ("llama", "qwen2", "qwen3", "qwen3_moe", "gemma3_text", "mistral3")


class _FusedSwiGLU:
    """Mixin put in front of an mlx-lm MLP class: gate, up and the product in one kernel."""

    def __call__(self, x):
        y = kernels.swiglu(x, self.gate_proj, self.up_proj)
        return super().__call__(x) if y is None else self.down_proj(y)


def _mlp_residual(mlp, norm, h):
    """h + mlp(norm(h)) with as few launches as the kernels allow: norm + gate + up +
    SwiGLU in one, down + the residual add in another."""
    gate, up, down = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    y = None if down is None else kernels.swiglu(h, gate, up, norm=norm)
    if y is None:
        return h + mlp(norm(h))
    out = kernels.linear_residual(y, down, h)
    return h + down(y) if out is None else out


_MIXED_CLASSES = {}


def _put_mixin_in_front(model, modules, class_name, mixin, prefix, wanted=lambda m: True) -> int:
    """Give every module of model whose class is ``mlx_lm.models.<name>.<class_name>``
    (for name in modules) and that ``wanted`` accepts the subclass (mixin, its class):
    the arrays stay where they are, only the forward pass changes. Returns the count."""
    import importlib

    classes = set()
    for name in modules:
        try:
            classes.add(getattr(importlib.import_module(f"mlx_lm.models.{name}"), class_name))
        except (ImportError, AttributeError):
            continue
    count = 0
    for _, m in model.named_modules():
        cls = type(m)
        if cls in classes and wanted(m):
            m.__class__ = _MIXED_CLASSES.setdefault((mixin, cls), type(f"{prefix}{cls.__name__}", (mixin, cls), {}))
            count += 1
    return count


def fuse_mlps(model: nn.Module) -> int:
    """Route the SwiGLU MLPs of known mlx-lm architectures through kernels.swiglu;
    returns how many MLPs were switched (their arrays are untouched)."""
    return _put_mixin_in_front(model, SWIGLU_MODULES, "MLP", _FusedSwiGLU, "Fused",
                               lambda m: all(isinstance(m.get(p), QuantizedLinear) for p in ("gate_proj", "up_proj")))


def patch_attention() -> int:
    """Point the attention of known mlx-lm architectures at kernels.attention (which
    hands anything it does not cover back to mlx-lm's own function)."""
    import importlib

    patched = 0
    for name in ATTENTION_MODULES:
        try:
            module = importlib.import_module(f"mlx_lm.models.{name}")
        except ImportError:
            continue
        original = getattr(module, "scaled_dot_product_attention", None)
        if original is None or getattr(original, "jang_patched", False):
            continue

        def sdpa(queries, keys, values, cache, scale, mask, sinks=None, _original=original):
            out = None
            if sinks is None and not hasattr(cache, "bits"):
                out = kernels.attention(queries, keys, values, scale, mask)
            return _original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks) if out is None else out

        sdpa.jang_patched = True
        module.scaled_dot_product_attention = sdpa
        patched += 1
    return patched


# ---------------------------------------------------------------- compiled decode
# At decode every op is a few microseconds of GPU work and about as much host work
# (Python builds each graph node, then MLX evaluates it), so a Llama-3-8B-shaped model
# is bound by the host, not by its weights (docs/kernels.md). For one token, the parts
# of a transformer block before and after the KV cache are pure functions of fixed
# shapes: compiled once with mx.compile, each replays its ~10 ops from C++ in one call.
# Only the cache update and attention stay eager. Weights are captured as constants,
# so this is for inference: a model whose weights change afterwards must not use it.
DECODE_BLOCK_MODULES = ("llama", "qwen2", "qwen3")  # mistral runs llama's class


class _CompiledDecode:
    """Mixin put in front of an mlx-lm TransformerBlock class (see DECODE_BLOCK_MODULES)."""

    def __call__(self, x, mask=None, cache=None):
        # asked per call, so JANG_KERNELS=reference / JANG_DISABLE set later still apply
        if (x.shape[1] != 1 or mask is not None or type(cache) is not KVCache
                or not kernels.route("compiled_decode")):
            return super().__call__(x, mask, cache)
        compiled = self.__dict__.get("_jang_decode")
        if compiled is None:
            kernels.prepare_rope(getattr(self.self_attn, "rope", None))  # before the trace: see prepare_rope
            compiled = self.__dict__["_jang_decode"] = (mx.compile(self._jang_pre), mx.compile(self._jang_post))
        pre, post = compiled
        q, k, v = pre(x, _offset_array(cache.offset))
        k, v = cache.update_and_fetch(k, v)
        attn = self.self_attn
        return post(x, scaled_dot_product_attention(q, k, v, cache=cache, scale=attn.scale, mask=None))

    # One token: (B, 1, H, D) and (B, H, 1, D) hold the same elements in the same order,
    # so a reshape replaces mlx-lm's reshape + transpose (one graph node fewer each).
    def _jang_pre(self, x, offset):
        a = self.self_attn
        B = x.shape[0]
        heads = (a.n_heads, a.n_kv_heads, a.n_kv_heads)
        qk_norms = [getattr(a, f"{n}_norm", None) for n in "qk"]  # qwen3 normalises heads before RoPE
        projections = (a.q_proj, a.k_proj, a.v_proj)
        rope = a.rope if qk_norms == [None, None] else None
        head_dim = a.q_proj["weight"].shape[0] // a.n_heads
        # norm + 3 GEMVs (+ RoPE of q and k) in one launch
        fused = kernels.qkv(x, projections, self.input_layernorm, rope, head_dim, offset)
        if fused is not None and fused[3]:
            return tuple(y.reshape(B, n, 1, -1) for y, n in zip(fused[:3], heads))
        if fused is None:
            h = self.input_layernorm(x)
            fused = [p(h) for p in projections]
        q, k, v = (y.reshape(B, n, 1, -1) for y, n in zip(fused[:3], heads))
        q, k = (y if norm is None else norm(y) for y, norm in zip((q, k), qk_norms))
        return a.rope(q, offset=offset), a.rope(k, offset=offset), v

    def _jang_post(self, x, attn_out):
        o = attn_out.reshape(x.shape[0], 1, -1)
        h = kernels.linear_residual(o, self.self_attn.o_proj, x)  # o_proj + residual, one launch
        if h is None:
            h = x + self.self_attn.o_proj(o)
        return _mlp_residual(self.mlp, self.post_attention_layernorm, h)


_OFFSET = {}


def _offset_array(offset: int):
    """The position as an array, made once per decode step (every layer asks for it)."""
    a = _OFFSET.get(offset)
    if a is None:
        _OFFSET.clear()
        a = _OFFSET[offset] = mx.array(offset, mx.int32)
    return a


def compile_decode(model: nn.Module) -> int:
    """Give the transformer blocks of known mlx-lm architectures the compiled one-token
    path (_CompiledDecode); returns how many blocks were switched."""
    return _put_mixin_in_front(model, DECODE_BLOCK_MODULES, "TransformerBlock", _CompiledDecode, "Compiled")
