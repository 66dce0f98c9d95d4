"""JANG's quantized layers: mlx-lm's quantized modules, run through jang.kernels.

They subclass MLX's / mlx-lm's own classes, so everything that inspects a
model (``isinstance(m, nn.QuantizedLinear)``, saving, LoRA) keeps working;
only the forward pass is routed through ``jang.kernels`` so fused kernels can
take over per backend.
"""

from functools import partial

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
    """h + mlp(norm(h)) with as few launches as the kernels allow: all of it in one
    (kernels.mlp_residual), else norm + gate + up + SwiGLU in one and down + the
    residual add in another."""
    gate, up, down = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    out = None if down is None else kernels.mlp_residual(h, gate, up, down, norm)
    if out is not None:
        return out
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


def _attend(q, k, v, cache, scale):
    """One token's k and v into the KVCache, then its attention over the cache. JANG's
    decode kernel (route decode_attention) reads the cache's whole buffers up to the live
    length, so the two slices update_and_fetch hands back are never evaluated: two
    graph nodes fewer per block, and no cuDNN call, whose host-side encoding cost
    33-70 us per block on the H100 (docs/kernels.md)."""
    keys, values = cache.update_and_fetch(k, v)
    out = kernels.attention(q, cache.keys, cache.values, scale, None, length=cache.offset, op="decode_attention")
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=scale, mask=None) if out is None else out


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
        q, k, v = pre(x, kernels.gpu.position(cache.offset))
        return post(x, _attend(q, k, v, cache, self.self_attn.scale))

    # One token: (B, 1, H, D) and (B, H, 1, D) hold the same elements in the same order,
    # so the fused kernel writes q, k and v straight in the (B, H, 1, D) layout attention
    # reads (no reshape + transpose nodes, each of which costs host time to evaluate).
    def _jang_pre(self, x, offset, kv_pair=False):
        """(q, k, v) of one token, or with kv_pair (q, kv): k and v as one (2 B, Hkv, 1, D)
        array, which the whole step writes into the cache with one scatter, not two."""
        a = self.self_attn
        B = x.shape[0]
        heads = (a.n_heads, a.n_kv_heads, a.n_kv_heads)
        projections = (a.q_proj, a.k_proj, a.v_proj)
        qk_norms = [getattr(a, f"{n}_norm", None) for n in "qk"]  # qwen3 normalises heads before RoPE
        rope = a.rope if qk_norms == [None, None] else None
        shapes = [(B, n, 1, p["weight"].shape[0] // n) for p, n in zip(projections, heads)]
        # norm + 3 GEMVs (+ RoPE of q and k, whose heads are q's) in one launch
        fused = kernels.qkv(x, projections, self.input_layernorm, rope, shapes[0][-1], offset, shapes, kv_pair)
        if fused is None:
            h = self.input_layernorm(x)
            q, k, v = (p(h).reshape(B, n, 1, -1) for p, n in zip(projections, heads))
        else:
            q, k, v, rotated = fused
            if v is None:  # the kernel wrote k and v as one pair
                return q, k
        if fused is None or not rotated:
            q, k = (y if norm is None else norm(y) for y, norm in zip((q, k), qk_norms))
            q, k = a.rope(q, offset=offset), a.rope(k, offset=offset)
        return (q, mx.concatenate([k, v], axis=0)) if kv_pair else (q, k, v)

    def _jang_post(self, x, attn_out):
        # o_proj + residual in one launch, reading attention's (B, H, 1, D) as (B, 1, H * D)
        h = kernels.linear_residual(attn_out, self.self_attn.o_proj, x)
        if h is None:
            h = x + self.self_attn.o_proj(attn_out.reshape(x.shape[0], 1, -1))
        return _mlp_residual(self.mlp, self.post_attention_layernorm, h)


def compile_decode(model: nn.Module) -> int:
    """Give the transformer blocks of known mlx-lm architectures the compiled one-token
    path (_CompiledDecode), and their models the chained step (_DecodeChain); returns
    how many blocks were switched."""
    blocks = _put_mixin_in_front(model, DECODE_BLOCK_MODULES, "TransformerBlock", _CompiledDecode, "Compiled")
    for module, class_name in DECODE_MODEL_CLASSES:
        _put_mixin_in_front(model, (module,), class_name, _DecodeChain, "Chained")
    return blocks


# The blocks' model classes (embedding, blocks, final norm) in DECODE_BLOCK_MODULES.
DECODE_MODEL_CLASSES = (("llama", "LlamaModel"), ("qwen2", "Qwen2Model"), ("qwen3", "Qwen3Model"))


class _DecodeChain:
    """Mixin put in front of an mlx-lm model class of DECODE_MODEL_CLASSES: one token's
    step as one compiled call per block boundary instead of two per block. Between two
    KV-cache updates the work is a pure function, block i's o_proj + MLP followed by
    block i+1's norm + q/k/v + RoPE, so it is compiled as one (the first also holds the
    embedding, the last the final norm): 33 compiled calls for 32 blocks instead of 64,
    and no Python per block beyond the cache update and attention (route decode_chain)."""

    def __call__(self, inputs, cache=None, input_embeddings=None):
        chain = self._jang_chain(inputs, cache, input_embeddings)
        if chain is None:
            return super().__call__(inputs, cache, input_embeddings)
        step = self._jang_step(cache)
        if step is not None:
            return self._jang_run_step(step, inputs, cache)
        first, links, last = chain
        offset = kernels.gpu.position(cache[0].offset)
        h, q, k, v = first(inputs, offset)
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            o = _attend(q, k, v, c, layer.self_attn.scale)
            if i < len(links):
                h, q, k, v = links[i](h, o, offset)
        return last(h, o)

    def _jang_chain(self, inputs, cache, input_embeddings):
        """(first, links, last) compiled calls for this one-token step, or None where the
        step is not a plain one-token decode over KVCaches the blocks' path covers."""
        if (input_embeddings is not None or not cache or inputs.ndim != 2 or inputs.shape[1] != 1
                or len(cache) != len(self.layers) or getattr(self, "pipeline_size", 1) != 1
                or not (kernels.route("compiled_decode") and kernels.route("decode_chain"))
                or any(type(c) is not KVCache for c in cache) or cache[0].offset != cache[-1].offset):
            return None
        chain = self.__dict__.get("_jang_chain_calls")
        if chain is None:
            chain = self.__dict__["_jang_chain_calls"] = self._jang_compile_chain()
        return chain or None

    def _jang_compile_chain(self):
        layers = self.layers
        if not all(isinstance(layer, _CompiledDecode) for layer in layers):
            return False
        for layer in layers:
            kernels.prepare_rope(getattr(layer.self_attn, "rope", None))  # before the traces: see prepare_rope

        def first(ids, offset):
            h = self.embed_tokens(ids)
            return (h, *layers[0]._jang_pre(h, offset))

        def link(block, after, x, attn_out, offset):
            h = block._jang_post(x, attn_out)
            return (h, *after._jang_pre(h, offset))

        def last(x, attn_out):
            return self.norm(layers[-1]._jang_post(x, attn_out))

        links = [mx.compile(partial(link, a, b)) for a, b in zip(layers, layers[1:])]
        return mx.compile(first), links, mx.compile(last)

    # ---- the whole step as one compiled call (route decode_step)
    # The chain above still runs Python per block: the cache update and the attention
    # call, ~65 us per block on the H100's host (2.1 ms of build per token on the 8B shape,
    # docs/kernels.md), because the cache's length, and so the slices and the attention
    # launch, change every step. With JANG's decode attention over the cache's whole
    # buffer (its grid set by the buffer's capacity, the live length read from the
    # position array on the device) and the KV write as a scatter at that position
    # (mx.put_along_axis, indices on the device), nothing in the step depends on the length:
    # one trace per buffer capacity (mlx-lm's KVCache grows in steps of 256) serves every
    # step, and the step is one call. A token that does not fit the buffers grows them
    # first, by the caches' step as mlx-lm's KVCache would, and the step is traced again
    # for the new size (the chain above serves only where the step is off).

    def _jang_step(self, cache):
        """The compiled whole step for these caches, or None where it does not apply."""
        shape = None if cache[0].keys is None else cache[0].keys.shape
        if (not kernels.route("decode_step") or shape is None or cache[0].offset > shape[2]
                or any(c.keys is None or c.keys.shape != shape or c.values.shape != shape or c.step != cache[0].step
                       for c in cache)):
            return None
        step = self.__dict__.get("_jang_step_call")
        if step is None:
            step = self.__dict__["_jang_step_call"] = mx.compile(self._jang_step_function)
        return step

    def _jang_step_function(self, ids, pos, at, kv):
        """(final hidden state, the updated KV buffer) of one token. kv: every block's keys
        and values in one array, (L 2 B, Hkv, capacity, D) (_take_kv). Each block's
        attention reads the buffer up to the token before, and the token's own key and
        value from its q/k/v launch (one (2 B, Hkv, 1, D) pair); one scatter writes all
        blocks' pairs at the end. at: the position broadcast to the pairs' shape, where
        the scatter writes them. Not mx.slice_update with an array start: MLX computes its
        offset into an 8-byte array, which its CUDA allocator keeps in host memory, and
        the copy kernel reading it took 17 us per call against 1.4 us (docs/kernels.md)."""
        h, pairs = kernels.chained(self._jang_blocks, self.embed_tokens(ids), pos, kv, owner=self)
        return self.norm(h), mx.put_along_axis(kv, at, kernels.concatenate(pairs), axis=2)

    def _jang_blocks(self, h, pos, kv):
        """(the last block's output, every block's (2 B, Hkv, 1, D) KV pair) of the step:
        a pure function of its inputs, so kernels.chained may chain its launches."""
        B = h.shape[0]
        pairs = []
        for i, layer in enumerate(self.layers):
            q, pair = layer._jang_pre(h, pos, kv_pair=True)
            pairs.append(pair)
            h = layer._jang_post(h, kernels.buffer_attention(q, kv, 2 * B * i, pair, layer.self_attn.scale, pos))
        return h, pairs

    def _jang_run_step(self, step, inputs, cache):
        pos = kernels.gpu.position(cache[0].offset)
        B, Hkv, _, D = cache[0].keys.shape
        at = mx.broadcast_to(pos.reshape(1, 1, 1, 1), (2 * B * len(cache), Hkv, 1, D))
        kv = _take_kv(cache)
        if cache[0].offset == kv.shape[2]:  # no room for this token: grow by the caches' step, as KVCache would
            kv = mx.concatenate([kv, mx.zeros((kv.shape[0], Hkv, cache[0].step, D), kv.dtype)], axis=2)
        try:
            h, kv = step(inputs, pos, at, kv)
        finally:
            _give_kv(cache, kv)
        for c in cache:
            c.offset += 1
        return h


# The whole step keeps every KVCache's keys and values in one buffer, (L 2 B, Hkv,
# capacity, D): block i's keys are rows 2 B i .. 2 B i + B - 1, its values the B after.
# One scatter per token writes every block's new key and value (64 graph nodes per token
# on the 8B shape became 2, each ~10 us of MLX's host time; docs/kernels.md). The
# caches' keys and values are the buffer's pieces (one mx.split: contiguous views, so
# mlx-lm reads and grows them as ever); the buffer rides along in cache[0]'s __dict__.

def _take_kv(cache):
    """The caches' KV buffer for the step, with the caches' own references to it
    dropped: with none left but the step's, MLX writes the token into it in place.
    Keys and values that are not the pieces the last step left (a prompt's, or any that
    mlx-lm's own update has written since) are packed into a new buffer, once."""
    kv, pieces = cache[0].__dict__.pop("_jang_kv", (None, ()))
    if kv is None or any(c.keys is not pieces[2 * i] or c.values is not pieces[2 * i + 1]
                         for i, c in enumerate(cache)):
        kv = mx.concatenate([a for c in cache for a in (c.keys, c.values)], axis=0)
    for c in cache:
        c.keys = c.values = None
    return kv


def _give_kv(cache, kv):
    """Hand every cache its keys and values as pieces of the step's buffer kv."""
    pieces = mx.split(kv, 2 * len(cache), axis=0)
    for i, c in enumerate(cache):
        c.keys, c.values = pieces[2 * i], pieces[2 * i + 1]
    cache[0].__dict__["_jang_kv"] = (kv, pieces)
