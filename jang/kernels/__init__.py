"""Backend dispatch for the ops JANG's layers run.

Every op has a pure-MLX reference implementation (``reference.py``): it runs on
every backend and is the oracle fused kernels are tested against. Fused
kernels (``gpu.py``: one body per kernel in ``src/``, built for CUDA through
``mx.fast.cuda_kernel`` or Metal through ``mx.fast.metal_kernel``) take over per
backend, and only where ``jang bench kernels`` showed they beat MLX's own op
(``ROUTES`` below; results in docs/kernels.md).

``JANG_KERNELS=reference`` forces the MLX path everywhere; ``JANG_ENABLE=qmv,swiglu``
turns on routes that are off by default, ``JANG_DISABLE=compiled_decode`` turns
routes off.
"""

import os
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import Llama3RoPE

from . import chain, cpu, gpu, reference

# Which fused kernel runs, per backend, from the H100 measurements in docs/kernels.md.
# At decode each MLX op costs ~5-9 us of host time (Python, then MLX's eval), and a
# Llama-3-8B-shaped model runs ~580 of them per token, so decode is as much host-bound
# as bandwidth-bound. A plain swap of MLX's GEMV for JANG's faster one made the model
# slower (a custom kernel costs more host time per launch); what wins is fewer launches:
# the compiled one-token block (compiled_decode) with the fused decode kernels inside it
# (fused_decode: RMSNorm + q/k/v + RoPE of q and k in one launch, o_proj + residual,
# RMSNorm + gate + up + SwiGLU, down + residual) runs ~260 launches per token instead
# of 583 (1.17-1.36x mlx-lm's decode on the 8B shape, session 3). Since session 11 the
# whole one-token step is one compiled call (decode_step, with JANG's decode attention):
# 228 launches, no Python per block, 1.91-2.11x mlx-lm in three runs (alternating rounds);
# since session 12 with one KV write per token: 174 graph nodes, 2.09-2.35x on H200s.
# Prefill (dequantize + cuBLAS from 512 tokens, 1.8-3.2x per GEMM) and the embedding
# gather are on too.
# Metal is compiled for syntax only (no Apple GPU here): MLX's ops until measured.
ROUTES = {
    "cuda": {
        "qmv": False,  # dequant GEMV for any layer call: faster kernel, slower model outside compiled decode
        # GEMVs of 1-2 tokens on the tensor cores at 2, 4 and 8 bits (gpu.qmv_tc_supported): 8192x8192
        # at 4 / 2 / 8 bits 15.7 / 12.0 / 27.5 us vs 20.4 / 23.7 / 32.4 on the CUDA cores (H100, session 9)
        "qmv_tc": True,
        # the fused q/k/v (+ norm, RoPE) and gate/up (+ norm, SwiGLU) of compiled decode on the
        # tensor cores too (else their CUDA-core kernels; needs qmv_tc). Since session 14 each
        # tile of a pair has its own warps (gpu.PAIR_TC): gate/up 39.4 -> 27.3 us, q/k/v 12.8
        # -> 10.0 us at the 8B shape (H100, chained); decode GPU time 2.92 -> 2.58 ms per token
        # and 3.15 -> 2.93 ms pipelined in an alternating profile (docs/kernels.md, session 14).
        # Layers under gpu.PAIR_TC_MIN_WEIGHTS keep the CUDA-core kernels
        "fused_tc": True,
        # gate/up (+ norm, SwiGLU) alone on the tensor cores, q/k/v on the CUDA cores: GPU time per
        # token 3.09 -> 3.03 ms on the 8B shape (gate/up 1234 -> 1159 us), but no faster end to end
        # in the one run (session 11, docs/kernels.md); session 12, H200: 289 vs 324 tok/s in one
        # alternating bench, per-round ranges overlapping
        "fused_tc_mlp": False,
        "prefill": "dequant",  # many tokens: "qmm" (fused tensor-core, 2-3x slower than MLX), "dequant" or "mlx"
        "embedding": True,
        "swiglu": False,  # as qmv (the MLP outside compiled decode)
        "norm_rope": False,  # faster kernel; no attention module is patched to use it yet
        # one-token attention over the KV cache in compiled decode: the split kernel (gpu.attention_decode)
        "decode_attention": True,
        # ... and then the whole one-token step as one compiled call (layers._DecodeChain._jang_step),
        # the KV-cache writes included (one buffer for every block, one scatter): no Python per block
        "decode_step": True,
        # the same kernel for mlx-lm's attention modules (layers.patch_attention). The patch is
        # module-wide, so mlx-lm models in the same process would take it too: opt-in
        "attention": False,
        "compiled_decode": True,  # layers.compile_decode: one compiled call before and after the KV cache
        "decode_chain": True,  # ... and one per block boundary (layers._DecodeChain) where the whole step allows
        "fused_decode": True,  # the fused GEMVs inside compiled decode (kernels.qkv, linear_residual, swiglu)
        # ... and the whole MLP + residual in one launch (kernels.mlp_residual) where gate/up
        # take the tensor cores (_pair_on_tensor_cores): a graph node less per layer, but
        # slower on the GPU so far (47 vs 39 us per layer of the 8B shape, H200, session
        # 15; docs/kernels.md), and no host time saved measured: opt-in
        "fused_mlp": False,
        # the whole step's per-layer KV pairs in one launch (kernels.concatenate), where
        # mx.concatenate launches a copy per input: 32 copies (~38 us of GPU per token of the
        # 8B shape) become one launch (2.5 us). Measured only with "chain" (8B decode 423.8 ->
        # 431.1 tok/s in one alternating bench; SmolLM2 508.3 -> 455.1, rounds spread widely;
        # H200, session 17; docs/kernels.md): opt-in with it
        "concat": False,
        # the whole step's consecutive kernels of one block size as one launch (kernels.chained,
        # chain.py: blocks take tickets, and wait for the kernel before theirs to finish): on the
        # 8B shape q/k/v + attention + o_proj, then down + the next layer's three, 162 -> 67
        # custom nodes per token; with "concat", pipelined 3.08 -> 2.43 ms per token in the decode
        # profile, GPU 2.16 -> 2.24 ms (~0.85 us per kernel for the tickets and counts), 412.4 ->
        # 431.1 tok/s end to end (H200, session 17; docs/kernels.md). Opt-in: the form measured
        # wrote the block counts into the kernel's text, so every KV-cache growth (256 tokens)
        # compiled the chain again; the form here reads them at run time and has not run on a GPU
        "chain": False,
    },
    "metal": {},
    # no fused kernels on the CPU; the compiled decode block runs there too, but off
    # by default (not measured): JANG_ENABLE=compiled_decode tries it
    "cpu": {"compiled_decode": False, "decode_chain": True, "decode_step": True},
}


_BACKENDS = {}


def _env_reader(name: str):
    """A fast reader of one environment variable. os.environ.get costs ~1-2 us (it
    encodes the key and decodes the value on every call), and backend() runs on every
    layer call; the mapping's own dict is read directly where it exists (CPython on
    POSIX), so a test or a user changing os.environ at run time is still seen."""
    data, encode, decode = (getattr(os.environ, a, None) for a in ("_data", "encodekey", "decodevalue"))
    if isinstance(data, dict) and encode and decode:
        key = encode(name)
        return lambda: "" if (v := data.get(key)) is None else decode(v)
    return lambda: os.environ.get(name, "")


_forced = _env_reader("JANG_KERNELS")


def backend() -> str:
    """'reference' when forced, else the backend MLX runs on: 'cuda', 'metal' or 'cpu'.
    Asked on every layer call, so the answer is cached per (JANG_KERNELS, device type):
    at decode, host time per op is what the GPU waits on."""
    key = (_forced(), mx.default_device().type)
    found = _BACKENDS.get(key)
    if found is None:
        found = _BACKENDS[key] = _detect(*key)
    return found


def _detect(forced: str, device_type) -> str:
    if forced.lower() == "reference":
        return "reference"
    if device_type == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda" if mx.cuda.is_available() else "cpu"


_NO_ROUTES = {}
# JANG_ENABLE=qmv,swiglu turns routes on that ROUTES leaves off (for benchmarks and
# for trying the kernels end to end); it never applies on the CPU or when forced to
# the reference path.
_ENABLED = {op for op in os.environ.get("JANG_ENABLE", "").split(",") if op}
_DISABLED = {op for op in os.environ.get("JANG_DISABLE", "").split(",") if op}


@contextmanager
def enabled(ops):
    """Turn routes on ("qmv") or off ("compiled_decode=off") for the duration, as
    JANG_ENABLE / JANG_DISABLE do for a whole process."""
    saved = set(_ENABLED), set(_DISABLED)
    for op in ops:
        name, _, state = op.partition("=")
        (_DISABLED if state == "off" else _ENABLED).add(name)
    try:
        yield
    finally:
        for live, old in zip((_ENABLED, _DISABLED), saved):
            live.clear()
            live.update(old)


_GPU_BACKENDS = ("cuda", "metal")


def route(op: str, default=False, b=None):
    """The route for op on backend b (default: the current one). JANG_ENABLE turns on any
    route on a GPU backend, but on the CPU only the CPU's own (its table's keys): a GPU
    kernel's route never applies there."""
    b = b or backend()
    if op in _DISABLED:
        return default
    if op in _ENABLED and (b in _GPU_BACKENDS or op in ROUTES.get(b, _NO_ROUTES)):
        return ROUTES[b].get(op) or True
    return ROUTES.get(b, _NO_ROUTES).get(op, default)


def _matmul_op(tokens: int, b: str):
    """Which fused GEMM path serves this many tokens on backend b, or None for MLX's op."""
    if tokens <= gpu.QMV_MAX_M:
        return "qmv" if route("qmv", b=b) else None
    prefill = route("prefill", "mlx", b)
    if prefill == "qmm" or (prefill == "dequant" and tokens >= gpu.DEQUANT_MIN_M):
        return prefill
    return None


def _tensor_cores(x, bits, group_size, row=None) -> bool:
    """Whether the tensor-core GEMV kernels serve these tokens, bits and group size. row:
    the weights' row length, where x holds its tokens in another shape than (..., row)
    (o_proj reads attention's (B, H, 1, D) output: one token, not H)."""
    tokens = x.size // (row or x.shape[-1])
    return tokens <= gpu.QMV_TC_MAX_M and route("qmv_tc") and gpu.qmv_tc_supported(x, bits, group_size)


def _pair_on_tensor_cores(x, layer, mlp: bool) -> bool:
    """Whether a paired decode fusion (gate/up with mlp, else q/k/v) of these tokens runs
    on the tensor cores: route fused_tc (or fused_tc_mlp for gate/up), the layout, and at
    least gpu.PAIR_TC_MIN_WEIGHTS weights in the layer."""
    on = route("fused_tc") or (mlp and route("fused_tc_mlp"))
    return (on and layer["weight"].shape[0] * x.shape[-1] >= gpu.PAIR_TC_MIN_WEIGHTS
            and _tensor_cores(x, layer.bits, layer.group_size))


def _gemv(x, w, scales, biases, group_size, bits, resid=None):
    """A fused GEMV of a few tokens: on the tensor cores where route and layout allow."""
    if _tensor_cores(x, bits, group_size, gpu.in_features(w, bits)):
        return gpu.qmv_tc(x, w, scales, biases, group_size, bits, resid=resid)
    return gpu.qmv(x, w, scales, biases, group_size, bits, resid=resid)


_FUSED_MATMUL = {"qmv": _gemv, "qmm": gpu.qmm, "dequant": gpu.dequant_matmul}


def quantized_matmul(x, w, scales, biases, group_size, bits, mode="affine"):
    # Ordered cheapest first: at decode this runs once per layer per token, and MLX's
    # own call costs ~1-2 us of host time, so the checks must cost less than that.
    # Every JANG path here needs FUSED_MIN_WEIGHTS weights, so the size is asked first:
    # most layers of a small model skip the route lookups (SmolLM2-135M: 210 of 211).
    b = backend()
    if b == "cpu":
        return cpu.quantized_matmul(x, w, scales, biases, group_size, bits, mode)
    weights = w.shape[0] * x.shape[-1]
    if weights >= gpu.FUSED_MIN_WEIGHTS and b in ROUTES:
        if (weights >= gpu.QMV_TC_ALONE_MIN_WEIGHTS and _tensor_cores(x, bits, group_size)
                and gpu.supports_affine(x, w, scales, biases, group_size, bits, mode)):
            return gpu.qmv_tc(x, w, scales, biases, group_size, bits)  # e.g. the output head at decode
        op = _matmul_op(x.size // x.shape[-1], b)
        if op is not None and gpu.supports_affine(x, w, scales, biases, group_size, bits, mode):
            return _FUSED_MATMUL[op](x, w, scales, biases, group_size, bits)
    return mx.quantized_matmul(x, w, scales=scales, biases=biases, transpose=True,
                               group_size=group_size, bits=bits, mode=mode)


def gather_qmm(x, w, scales, biases, indices, group_size, bits, mode="affine", sorted_indices=False):
    if backend() == "cpu":
        return cpu.gather_qmm(x, w, scales, biases, indices, group_size, bits, mode, sorted_indices)
    return reference.gather_qmm(x, w, scales, biases, indices, group_size, bits, mode, sorted_indices)


def embedding_lookup(ids, w, scales, biases, group_size, bits, mode="affine"):
    if route("embedding") and gpu.supports_weights(w, scales, biases, group_size, bits, mode):
        return gpu.qgather(ids, w, scales, biases, group_size, bits, scales.dtype)
    return reference.embedding_lookup(ids, w, scales, biases, group_size, bits, mode)


def _plain(layer) -> bool:
    """A JANG quantized linear layer without bias (what the fused GEMVs read)."""
    return getattr(layer, "jang_fusable", False) and "bias" not in layer


def _rms(norm):
    """(weight, eps) of a plain RMSNorm module (Gemma's 1 + w variant is another class)."""
    return (norm.weight, norm.eps) if type(norm) is nn.RMSNorm else None


def _fusable(op, x, layers, norm=None, rows_any_shape=False) -> bool:
    if not route(op) or not all(_plain(m) for m in layers):
        return False
    if x.size // gpu.in_features(layers[0]["weight"], layers[0].bits) > gpu.QMV_MAX_M:
        return False
    if norm is not None and (_rms(norm) is None or norm.weight.dtype != x.dtype):
        return False
    first = layers[0]
    return all((m.bits, m.group_size, m.mode) == (first.bits, first.group_size, first.mode)
               and gpu.supports_affine(x, m["weight"], m["scales"], m.get("biases"), m.group_size, m.bits, m.mode,
                                       rows_any_shape)
               for m in layers)


def _arrays(layer):
    return layer["weight"], layer["scales"], layer["biases"]


def swiglu(x, gate, up, norm=None):
    """silu(gate(x)) * up(x) through the fused kernel (with norm: of norm(x)), or None
    where it does not apply (the caller then runs the unfused layers)."""
    if not _fusable("swiglu" if norm is None else "fused_decode", x, (gate, up), norm):
        return None
    if norm is None and gate["weight"].shape[0] * x.shape[-1] < gpu.FUSED_MIN_WEIGHTS:
        return None  # a plain swap of launches: only where the kernel is faster on the GPU
    fused = gpu.swiglu_tc if _pair_on_tensor_cores(x, gate, mlp=True) else gpu.swiglu
    return fused(x, _arrays(gate), _arrays(up), gate.group_size, gate.bits, norm=None if norm is None else _rms(norm))


def mlp_residual(h, gate, up, down, norm):
    """h + down(silu(gate(norm(h))) * up(norm(h))) in one launch (gpu.swiglu_down_tc),
    or None where it does not apply (the caller then runs swiglu and linear_residual)."""
    if not (route("fused_mlp") and _plain(down) and _fusable("fused_decode", h, (gate, up), norm)
            and _pair_on_tensor_cores(h, gate, mlp=True)):
        return None
    wd, sd, bd = _arrays(down)
    if not (gpu.supports_weights(wd, sd, bd, down.group_size, down.bits, down.mode) and sd.dtype == h.dtype
            and wd.shape[0] == h.shape[-1]
            and gpu.swiglu_down_supported(gate["weight"].shape[0], wd, down.bits, down.group_size)):
        return None
    return gpu.swiglu_down_tc(h, _arrays(gate), _arrays(up), (wd, sd, bd), gate.group_size, gate.bits, down.bits,
                              down.group_size, h, norm=_rms(norm))


# mlx-lm rope module class -> its per-pair angular speeds (what the q/k/v kernel's
# RoPE reads); other kinds (YaRN, SuScaled, ...) keep MLX's rope.
_ROPE_SPEEDS = {
    nn.RoPE: lambda r: gpu.rope_inv_freq(r.dims, r.base, r.scale),
    Llama3RoPE: lambda r: gpu.rope_inv_freq(r.dims, None, 1.0, r._freqs),
}


def _rope_args(rope, head_dim: int, offset):
    """(inv_freq, offset, head_dim, traditional) for the q/k/v kernel's RoPE, from the
    mlx-lm rope module of an attention layer, or None for a kind it does not cover."""
    speeds = _ROPE_SPEEDS.get(type(rope))
    if speeds is None or rope.dims != head_dim:  # partial rotary: MLX's rope
        return None
    inv = rope.__dict__.get("_jang_inv_freq")
    if inv is None:
        inv = rope.__dict__["_jang_inv_freq"] = speeds(rope)
    return inv, offset, head_dim, rope.traditional


def prepare_rope(rope) -> None:
    """Compute and evaluate the speeds qkv's RoPE reads, outside any mx.compile trace:
    computed inside one they would be part of the compiled graph, and every compiled
    call would run their arange / power again (two launches per layer and token)."""
    speeds = _ROPE_SPEEDS.get(type(rope))
    if speeds is not None and "_jang_inv_freq" not in rope.__dict__:
        inv = speeds(rope)
        mx.eval(inv)
        rope.__dict__["_jang_inv_freq"] = inv


def qkv(x, projections, norm, rope=None, head_dim=None, offset=None, shapes=None, kv_pair=False):
    """The three projections of norm(x) in one launch, or None where it does not apply.
    With rope (an mlx-lm rope module, the heads' size and the position as an array):
    (q, k, v, True) with q and k already rotated where the kernel covers that rope,
    else (q, k, v, False). shapes: the outputs' shapes if not (..., N) (gpu._multi_shapes).
    kv_pair: where the kernel rotates and k and v have one shape, (q, kv, None, True),
    kv holding k's rows then v's ((2 B, Hkv, 1, D) for shapes (B, Hkv, 1, D))."""
    mats = [_arrays(p) for p in projections]
    if not _fusable("fused_decode", x, projections, norm) or not gpu.multi_rows_ok(mats):
        return None
    first = projections[0]
    tc = _pair_on_tensor_cores(x, first, mlp=False) and gpu.multi_tc_rows_ok(mats)
    rope_args = None if rope is None else _rope_args(rope, head_dim, offset)
    if rope_args is not None and not (gpu.multi_tc_rows_ok(mats, head_dim, rope_args[3]) if tc
                                      else gpu.multi_rows_ok(mats, head_dim)):
        rope_args = None
    fused = gpu.qmv_tc_multi if tc else gpu.qmv_multi
    if kv_pair and rope_args is not None and mats[1][0].shape == mats[2][0].shape:
        if shapes is not None:
            shapes = [shapes[0], (2 * shapes[1][0], *shapes[1][1:])]
        q, kv = fused(x, mats, first.group_size, first.bits, norm=_rms(norm), rope=rope_args, shapes=shapes,
                      kv_pair=True)
        return q, kv, None, True
    q, k, v = fused(x, mats, first.group_size, first.bits, norm=_rms(norm), rope=rope_args, shapes=shapes)
    return q, k, v, rope_args is not None


def linear_residual(x, layer, resid):
    """resid + layer(x) in one launch, or None where it does not apply. x may hold its
    rows in another shape than resid's (attention's (B, H, 1, D) output for o_proj's
    (B, 1, H * D) input: the kernel reads x flat), saving a reshape node."""
    if (not _fusable("fused_decode", x, (layer,), rows_any_shape=True) or resid.shape[-1] != layer["weight"].shape[0]
            or resid.dtype != x.dtype
            or x.size // gpu.in_features(layer["weight"], layer.bits) != resid.size // resid.shape[-1]):
        return None
    return _gemv(x, *_arrays(layer), layer.group_size, layer.bits, resid=resid)


def attention(q, k, v, scale, mask, length=None, op="attention"):
    """JANG's GQA attention of one query token (decode: mask None), or None where it
    does not apply or route ``op`` is off (then the caller runs MLX's). length: the live
    keys where k and v are a KV cache's whole buffers. Prefill stays with MLX's flash
    attention, ~50x faster than gpu.attention's one-query-per-block kernel."""
    if mask is not None or not route(op) or not gpu.attention_decode_supported(q, k):
        return None
    return gpu.attention_decode(q, k, v, scale, length)


def concatenate(arrays):
    """mx.concatenate(arrays, axis=0): one launch where routed ("concat") and the arrays
    share a shape and dtype (gpu.concatenate_supported)."""
    if route("concat") and gpu.concatenate_supported(arrays):
        return gpu.concatenate(arrays)
    return mx.concatenate(arrays, axis=0)


def chained(fn, *args, owner=None):
    """fn(*args) with its kernel launches chained where routed ("chain"): consecutive
    launches of one block size as one launch (chain.run), a graph node each instead of
    one per kernel. fn must not change anything outside its result (it may run twice);
    meant for code mx.compile traces. owner: what the chains' counts belong to (the
    model: two models' steps evaluated together must not share them)."""
    if route("chain"):
        return chain.run(fn, *args, owner=owner)
    return fn(*args)


def buffer_attention(q, kv, row, kv_new, scale, pos):
    """One token's attention in the whole decode step (layers._DecodeChain). kv: every
    block's KV-cache buffer, (L 2 B, Hkv, capacity, D), this block's keys at rows row ..
    row + B - 1 and its values at the B after them, live up to position pos (a (1,) int32
    array) except pos itself: the token's own key and value are kv_new's (2 B, Hkv, 1, D),
    which the step writes into kv after its last block. JANG's decode kernel where
    routed, else the reference's masked attention. Shapes do not depend on pos, so
    mx.compile traces it once per buffer size."""
    if route("decode_attention") and gpu.attention_decode_supported(q, kv):
        return gpu.attention_decode(q, kv, None, scale, pos=pos, step=(kv_new, row))
    B = q.shape[0]
    at = mx.broadcast_to(pos.reshape(1, 1, 1, 1), kv_new.shape)
    own = mx.put_along_axis(kv[row:row + 2 * B], at, kv_new, axis=2)
    return reference.attention_decode(q, own[:B], own[B:], scale, pos)
