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
