"""GPTQ (Frantar et al., 2022): quantize one input column at a time and push each
column's rounding error onto the columns not yet quantized, weighted by the
inverse Hessian of the layer's inputs, so the layer's *output* on calibration
activations stays close even where individual weights move further than RTN.

``hessian`` is sum_t x_t x_t^T over calibration tokens (any positive scale).
The result is MLX's affine layout (min/max scale and bias per group of
``group_size`` consecutive inputs), readable by ``mx.dequantize``.

The work happens on the transposed weight (in, out) in float32 numpy, so each
column GPTQ visits is one contiguous row.
"""

import mlx.core as mx
import numpy as np

from .pack import pack


def quantize_weight(weight: mx.array, bits: int, group_size: int, hessian=None, **_):
    """The QUANTIZERS signature; GPTQ with its defaults."""
    if hessian is None:
        raise ValueError(
            "GPTQ needs calibration: pass hessian= (sum of x x^T over the layer's input "
            "activations, shape (in, in), or (experts, in, in) for MoE experts)."
        )
    return gptq(weight, hessian, bits, group_size)


def gptq(weight: mx.array, hessian, bits: int, group_size: int, damp: float = 0.01,
         act_order: bool = False, block_size: int = 128):
    """(out, in) weight and (in, in) Hessian -> (packed uint32, scales, biases) in
    MLX's affine layout, scales and biases in the weight's dtype.

    damp: added to H's diagonal as a fraction of its mean, so H stays invertible
    and the error is not pushed into directions calibration barely saw.
    act_order: visit inputs by decreasing H[i, i], the most active first, while
    they still have later columns to absorb their error.
    block_size: columns per lazy batch update (without act_order, rounded to whole groups).
    3-D MoE weights (experts, out, in) take one Hessian per expert (experts, in, in).
    """
    if weight.ndim == 3:
        hessian = np.asarray(hessian)
        parts = [gptq(weight[e], hessian[e], bits, group_size, damp, act_order, block_size)
                 for e in range(weight.shape[0])]
        return tuple(mx.stack(p) for p in zip(*parts))
    dtype = weight.dtype
    n = weight.shape[-1]
    if n % group_size:
        raise ValueError(f"{n} inputs do not split into groups of {group_size}")
    wt = np.array(weight.astype(mx.float32)).T.copy()  # (in, out): row j is input column j
    h = np.array(hessian, dtype=np.float64)
    dead = np.flatnonzero(np.diag(h) == 0)  # inputs never active: nothing to preserve
    h[dead, dead] = 1.0  # keeps H invertible; their weights are zeroed so they cost nothing
    wt[dead] = 0.0
    h[np.diag_indices(n)] += damp * np.mean(np.diag(h))

    if act_order:
        # MLX groups are contiguous in the original order, so a permuted pass
        # cannot start groups as it goes: fix them all from the original weights.
        scales, biases = _group_params(wt.reshape(n // group_size, group_size, -1), bits, dtype)
        perm = np.argsort(-np.diag(h), kind="stable")
        h = h[np.ix_(perm, perm)]  # rebinding frees the unpermuted copy: float64 in x in is large
        u = _inverse_cholesky(h)
        del h
        codes = np.empty(wt.shape, np.int64)
        codes[perm] = _quantize_columns(wt[perm], u, bits, group_size, block_size, dtype,
                                        scales, biases, perm // group_size)
    else:
        scales = np.empty((n // group_size, wt.shape[1]), np.float32)
        biases = np.empty_like(scales)
        codes = _quantize_columns(wt, _inverse_cholesky(h), bits, group_size, block_size, dtype,
                                  scales, biases, None)
    return pack(codes.T, bits), mx.array(scales.T).astype(dtype), mx.array(biases.T).astype(dtype)


def _inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), float32. Row j of U, past the
    diagonal, is how column j's error should spread over the later columns.

    One factorization instead of inverse-then-factor: with J the order reversal,
    chol(J H J) = L gives H = R R^T for the upper triangular R = J L J, so
    H^-1 = R^-T R^-1 and U = R^-1. MLX's CPU LAPACK does this far faster than numpy here.
    """
    rev = mx.array(h.astype(np.float32))[::-1, ::-1]
    r = mx.linalg.cholesky(rev, stream=mx.cpu)[::-1, ::-1]
    del rev
    # MLX does not report a failed factorization; LAPACK leaves a diagonal entry <= 0 or NaN.
    if not mx.all(mx.diagonal(r) > 0).item():
        raise ValueError("Hessian is not positive definite even after damping; "
                         "check it or raise damp")
    return np.array(mx.linalg.tri_inv(r, upper=True, stream=mx.cpu))


def _quantize_columns(wt, u, bits, group_size, block_size, dtype, scales, biases, group_of):
    """GPTQ over the rows of wt (in processing order); wt is updated in place.

    With group_of=None the groups follow the processing order and their
    parameters are filled into scales/biases from the error-updated weights as
    each group starts; otherwise they are given and group_of[j] is row j's group.
    """
    levels = 2**bits - 1
    n = wt.shape[0]
    codes = np.empty(wt.shape, np.int64)
    if group_of is None:
        # A group must lie inside one block, so its start sees every update from before it.
        block_size = max(1, block_size // group_size) * group_size
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        block, ub = wt[b0:b1], u[b0:b1, b0:b1]  # block is a view: updates land in wt
        errors = np.empty_like(block)
        for i in range(b1 - b0):
            j = b0 + i
            if i % group_size == 0:
                # Errors are applied lazily at three levels, so most of the work is matrix
                # products: rows after the block get the block's errors at once (below),
                # each run of group_size rows gets the errors from before the run here,
                # and each row gets those from its own run just before it is quantized.
                start = i
                block[i:i + group_size] -= _matmul(ub[:i, i:i + group_size].T, errors[:i])
                if group_of is None:
                    scales[j // group_size], biases[j // group_size] = _group_params(
                        block[i:i + group_size], bits, dtype)
            w = block[i] - ub[start:i, i] @ errors[start:i]
            g = j // group_size if group_of is None else group_of[j]
            s, b = scales[g], biases[g]
            q = np.clip(np.rint((w - b) / np.where(s == 0, 1.0, s)), 0, levels)
            codes[j] = q
            errors[i] = (w - (q * s + b)) / ub[i, i]
        wt[b1:] -= _matmul(u[b0:b1, b1:].T, errors)
    return codes


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b through MLX's BLAS. numpy's bundled OpenBLAS keeps its threads spinning
    after each call, and on a small, busy machine they starve the Python loop around
    it (GPTQ ran 4-5x slower that way on 2 shared cores)."""
    return np.array(mx.matmul(mx.array(a), mx.array(b), stream=mx.cpu))


def _group_params(groups: np.ndarray, bits: int, dtype):
    """Min/max affine scale and bias per group: (..., group_size, out) -> (..., out), rounded
    to the storage dtype so codes are chosen against what the kernel will see."""
    lo, hi = groups.min(axis=-2), groups.max(axis=-2)
    return _as_stored((hi - lo) / (2**bits - 1), dtype), _as_stored(lo, dtype)


def _as_stored(x, dtype):
    return np.asarray(mx.array(x).astype(dtype).astype(mx.float32))
