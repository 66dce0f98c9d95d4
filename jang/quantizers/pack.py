"""MLX's affine layout, written from integer codes.

MLX stores each row of codes as one little-endian bitstream cut into uint32
words: code i occupies bits [i*bits, (i+1)*bits). That holds for every width
(2, 3, 4, 5, 6, 8; checked against ``mx.quantize`` in the tests), so quantizers
that choose their own scales and biases can still produce tensors that
``mx.dequantize`` / ``mx.quantized_matmul`` read directly.
"""

import mlx.core as mx
import numpy as np


def pack(codes, bits: int) -> mx.array:
    """(..., n) integer codes in [0, 2**bits) -> (..., n*bits/32) uint32."""
    q = np.asarray(codes).astype(np.uint64)
    *lead, n = q.shape
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole uint32 words")
    chunks = q.reshape(*lead, n // 32, 32)  # 32 codes -> exactly `bits` words
    words = np.zeros((*lead, n // 32, bits), dtype=np.uint64)
    for j in range(32):
        word, offset = divmod(j * bits, 32)
        shifted = chunks[..., j] << np.uint64(offset)
        words[..., word] |= shifted & np.uint64(0xFFFFFFFF)
        if offset + bits > 32:
            words[..., word + 1] |= shifted >> np.uint64(32)
    return mx.array(words.reshape(*lead, n * bits // 32).astype(np.uint32))


def _float32(x) -> np.ndarray:
    """numpy float32 of an mx or numpy array (numpy cannot take MLX's bfloat16 directly)."""
    return np.asarray(x.astype(mx.float32)) if isinstance(x, mx.array) else np.asarray(x, dtype=np.float32)


def codes_for(weight, scales, biases, bits: int, group_size: int) -> np.ndarray:
    """Nearest codes for weight given per-group scales and biases (as stored)."""
    w = _float32(weight)
    s = np.repeat(_float32(scales), group_size, axis=-1)
    b = np.repeat(_float32(biases), group_size, axis=-1)
    safe = np.where(s == 0, 1.0, s)
    return np.clip(np.rint((w - b) / safe), 0, 2**bits - 1).astype(np.int64)


def affine(weight, scales, biases, bits: int, group_size: int):
    """(packed weight, scales, biases) in MLX's layout for the given scales/biases."""
    return pack(codes_for(weight, scales, biases, bits, group_size), bits), scales, biases
