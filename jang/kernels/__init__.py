"""Backend dispatch for the ops JANG's layers run.

Every op has a pure-MLX reference implementation (``reference.py``): it runs on
every backend and is the oracle fused kernels are tested against. Fused
kernels (``mx.fast.metal_kernel`` / ``mx.fast.cuda_kernel``) plug in here per
backend, and only where a benchmark shows they beat MLX's own op.

``JANG_KERNELS=reference`` forces the MLX path everywhere.
"""

import os

from . import cpu, reference

# (op name, backend) -> implementation; ops not listed run the reference path.
_FUSED = {(op, "cpu"): fn for op, fn in cpu.OPS.items()}


def backend() -> str:
    """'reference' when forced, else the backend MLX runs on: 'cuda', 'metal' or 'cpu'."""
    if os.environ.get("JANG_KERNELS", "").lower() == "reference":
        return "reference"
    import mlx.core as mx

    if mx.default_device().type == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda" if mx.cuda.is_available() else "cpu"


def _pick(op: str):
    return _FUSED.get((op, backend()), getattr(reference, op))


def quantized_matmul(x, w, scales, biases, group_size, bits, mode="affine"):
    return _pick("quantized_matmul")(x, w, scales, biases, group_size, bits, mode)


def gather_qmm(x, w, scales, biases, indices, group_size, bits, mode="affine", sorted_indices=False):
    return _pick("gather_qmm")(x, w, scales, biases, indices, group_size, bits, mode, sorted_indices)


def embedding_lookup(ids, w, scales, biases, group_size, bits, mode="affine"):
    return _pick("embedding_lookup")(ids, w, scales, biases, group_size, bits, mode)
