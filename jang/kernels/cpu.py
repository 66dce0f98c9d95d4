"""CPU: MLX's quantized matmul runs ~40x slower on fp16/bf16 inputs than on fp32
(measured: 1536x576 GEMV, 4-bit, 40 ms fp16 vs 1.1 ms fp32), so on the CPU the
matmuls run in fp32 and cast the result back. Same stored weights; the
difference from the MLX path is fp16 rounding of the accumulation."""

import mlx.core as mx

from . import reference

_LOW_PRECISION = (mx.float16, mx.bfloat16)


def _upcast(x, scales, mode) -> bool:
    """Affine matmuls with low-precision inputs or scales run in fp32."""
    return mode == "affine" and (x.dtype in _LOW_PRECISION or scales.dtype != x.dtype)


def _up(a):
    return None if a is None else a.astype(mx.float32)


def quantized_matmul(x, w, scales, biases, group_size, bits, mode="affine"):
    if not _upcast(x, scales, mode):
        return reference.quantized_matmul(x, w, scales, biases, group_size, bits, mode)
    y = reference.quantized_matmul(_up(x), w, _up(scales), _up(biases), group_size, bits, mode)
    return y.astype(x.dtype)


def gather_qmm(x, w, scales, biases, indices, group_size, bits, mode="affine", sorted_indices=False):
    if not _upcast(x, scales, mode):
        return reference.gather_qmm(x, w, scales, biases, indices, group_size, bits, mode, sorted_indices)
    y = reference.gather_qmm(_up(x), w, _up(scales), _up(biases), indices, group_size, bits, mode, sorted_indices)
    return y.astype(x.dtype)

