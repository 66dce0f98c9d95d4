"""The pure-MLX reference ops: what every backend can run, and the oracle."""

import mlx.core as mx


def quantized_matmul(x, w, scales, biases, group_size, bits, mode="affine"):
    return mx.quantized_matmul(
        x, w, scales=scales, biases=biases, transpose=True,
        group_size=group_size, bits=bits, mode=mode,
    )


def gather_qmm(x, w, scales, biases, indices, group_size, bits, mode="affine", sorted_indices=False):
    return mx.gather_qmm(
        x, w, scales, biases, rhs_indices=indices, transpose=True,
        group_size=group_size, bits=bits, mode=mode, sorted_indices=sorted_indices,
    )


def embedding_lookup(ids, w, scales, biases, group_size, bits, mode="affine"):
    return mx.dequantize(
        w[ids], scales=scales[ids], biases=None if biases is None else biases[ids],
        group_size=group_size, bits=bits, mode=mode,
    )


def attention_decode(q, k, v, scale, pos):
    """One query token over KV-cache buffers whose keys 0 .. pos are live (pos: a (1,)
    int32 array): MLX's attention over the whole buffer with the rest masked off, so
    the shapes do not depend on pos (the compiled whole decode step on any backend)."""
    live = mx.arange(k.shape[2], dtype=mx.int32) <= pos
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=live)
