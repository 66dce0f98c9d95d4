"""Backend dispatch for the ops JANG's layers run.

Every op has a pure-MLX reference implementation (``reference.py``): it runs on
every backend and is the oracle fused kernels are tested against. Fused
kernels (``gpu.py``: one body per kernel in ``src/``, built for CUDA through
``mx.fast.cuda_kernel`` or Metal through ``mx.fast.metal_kernel``) take over per
backend, and only where ``jang bench kernels`` showed they beat MLX's own op
(``ROUTES`` below; results in docs/kernels.md).

``JANG_KERNELS=reference`` forces the MLX path everywhere; ``JANG_ENABLE=qmv,swiglu``
turns on routes that are off by default.
"""

import os
from contextlib import contextmanager

import mlx.core as mx

from . import cpu, gpu, reference

# Which fused kernel runs, per backend, from the H100 measurements in docs/kernels.md.
# Per launch, on the GPU, JANG's GEMV, SwiGLU, embedding and norm+RoPE kernels beat
# MLX's ops (1.3-2.9x); end to end, decode is bound by host work per launch, where an
# mx.fast.cuda_kernel call costs ~12 us against ~2.4 us for MLX's quantized_matmul, so
# routing decode GEMVs through JANG made Llama-3-8B decode slower (0.57-0.86x). Decode
# therefore stays on MLX's ops until that host cost is gone; prefill (dequantize +
# cuBLAS from 512 tokens, 1.8-3.2x per GEMM, 1.2-1.8x end to end) and the embedding
# gather are on.
# Metal is compiled for syntax only (no Apple GPU here): MLX's ops until measured.
ROUTES = {
    "cuda": {
        "qmv": False,  # dequant GEMV for up to gpu.QMV_MAX_M tokens: faster kernel, slower model (host-bound)
        "prefill": "dequant",  # many tokens: "qmm" (fused tensor-core, 2-3x slower than MLX), "dequant" or "mlx"
        "embedding": True,
        "swiglu": False,  # as qmv
        "norm_rope": False,  # faster kernel; no attention module is patched to use it yet
        "attention": False,  # MLX's decode SDPA was 10x faster on the GPU (11 vs 110 us at 1k context)
        "compiled_decode": False,  # layers.compile_decode: one compiled call before and after the KV cache
    },
    "metal": {},
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


@contextmanager
def enabled(ops):
    """Turn routes on for the duration (as JANG_ENABLE does for a whole process)."""
    saved = set(_ENABLED)
    _ENABLED.update(ops)
    try:
        yield
    finally:
        _ENABLED.clear()
        _ENABLED.update(saved)


def route(op: str, default=False, b=None):
    """The route for op on backend b (default: the current one)."""
    b = b or backend()
    if op in _ENABLED and b in ROUTES:
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


_FUSED_MATMUL = {"qmv": gpu.qmv, "qmm": gpu.qmm, "dequant": gpu.dequant_matmul}


def quantized_matmul(x, w, scales, biases, group_size, bits, mode="affine"):
    # Ordered cheapest first: at decode this runs once per layer per token, and MLX's
    # own call costs ~2 us of host time, so the checks must cost less than that.
    b = backend()
    if b == "cpu":
        return cpu.quantized_matmul(x, w, scales, biases, group_size, bits, mode)
    if b in ROUTES:
        op = _matmul_op(x.size // x.shape[-1], b)
        if (op is not None and w.shape[0] * x.shape[-1] >= gpu.FUSED_MIN_WEIGHTS
                and gpu.supports_affine(x, w, scales, biases, group_size, bits, mode)):
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


def swiglu(x, gate, up):
    """silu(gate(x)) * up(x) through the fused kernel, or None where it does not apply
    (the caller then runs the unfused layers)."""
    if not route("swiglu") or x.size // x.shape[-1] > gpu.QMV_MAX_M:
        return None
    if gate["weight"].shape[0] * x.shape[-1] < gpu.FUSED_MIN_WEIGHTS:
        return None
    if (gate.bits, gate.group_size, gate.mode) != (up.bits, up.group_size, up.mode) or "bias" in gate or "bias" in up:
        return None
    if not gpu.supports_affine(x, gate["weight"], gate["scales"], gate.get("biases"), gate.group_size, gate.bits, gate.mode):
        return None
    return gpu.swiglu(x, (gate["weight"], gate["scales"], gate["biases"]), (up["weight"], up["scales"], up["biases"]),
                      gate.group_size, gate.bits)


def attention(q, k, v, scale, mask):
    """JANG's GQA attention for no mask (decode) or mlx-lm's "causal" string mask, or
    None where it does not apply."""
    if not route("attention") or not (mask is None or (isinstance(mask, str) and mask == "causal")):
        return None
    D = q.shape[-1]
    if q.dtype not in gpu.HALF or k.dtype != q.dtype or D % 32 or D > 256 or q.shape[1] % k.shape[1]:
        return None
    if q.shape[2] > 1:
        return None  # prefill: MLX's flash attention is ~50x faster than this one-query-per-block kernel
    return gpu.attention(q, k, v, scale)
