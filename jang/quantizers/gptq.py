"""GPTQ (Frantar et al., 2022): quantize one input column at a time and push each
column's rounding error onto the columns not yet quantized, weighted by the
inverse Hessian of the layer's inputs, so the layer's *output* on calibration
activations stays close even where individual weights move further than RTN.

``hessian`` is sum_t x_t x_t^T over calibration tokens (any positive scale).
The result is MLX's affine layout (a scale and bias per group of ``group_size``
consecutive inputs), readable by ``mx.dequantize``. Each group's range is searched
among its min/max and shrunk versions for the least error weighted by H's diagonal
(``clip``, the default; the paper takes min/max): at 2 bits on SmolLM2 that halves
GPTQ's output error (tests/test_gptq.py).

How it is computed, and why (memory is the constraint: conversions stream):

- No inverse. The paper spreads column i's error with row i of U, the upper
  Cholesky factor of H^-1. Equivalently (GPTQ is Babai's nearest-plane algorithm;
  Chen et al., 2025), with H = R R^T for an upper triangular R, the weight column j
  is quantized as  w_j + sum_{i<j} (R_ij / R_jj) (w_i - dequantized_i),
  from the *original* weights. R is one Cholesky factorization (of H in reversed
  order) and needs no inverse, so the solver holds one in x in float32 matrix:
  the Hessian's own buffer, factored in place (jang.quantizers.cholesky). Group
  scales and biases (without act_order, fitted as each group starts) are fitted to
  the paper's running weights too (_group_mixers), so the codes are the paper's: on
  the random problems compared, identical to the earlier float64 inverse-based solver.
- Output rows are independent given R, so they are solved in blocks of about
  ROW_BLOCK_VALUES weights: a 49152-row output head never has more than a few
  tens of MB of working weights, codes (uint8) and packing in flight.

The work happens on the transposed weight (in, rows) in float32 numpy, so each
column GPTQ visits is one contiguous row.
"""

import mlx.core as mx
import numpy as np

from .cholesky import factor_damped, permute_symmetric
from .mse import SHRINKS, least_error
from .pack import pack

ROW_BLOCK_VALUES = 1 << 21  # fp32 working weights per block of output rows (8 MB)


def quantize_weight(weight: mx.array, bits: int, group_size: int, hessian=None, **_):
    """The QUANTIZERS signature; GPTQ with its defaults."""
    if hessian is None:
        raise ValueError(
            "GPTQ needs calibration: pass hessian= (sum of x x^T over the layer's input "
            "activations, shape (in, in), or (experts, in, in) for MoE experts)."
        )
    return gptq(weight, hessian, bits, group_size)


def gptq(weight: mx.array, hessian, bits: int, group_size: int, damp: float = 0.01,
         act_order: bool = False, block_size: int = 128, overwrite_hessian: bool = False,
         clip: bool = True):
    """(out, in) weight and (in, in) Hessian -> (packed uint32, scales, biases) in
    MLX's affine layout, scales and biases in the weight's dtype.

    damp: added to H's diagonal as a fraction of its mean, so H stays invertible
    and the error is not pushed into directions calibration barely saw (raised
    tenfold, with a warning, if float32 Cholesky still fails).
    act_order: visit inputs by decreasing H[i, i], the most active first, while
    they still have later columns to absorb their error.
    block_size: columns per lazy batch update (without act_order, rounded to whole groups).
    overwrite_hessian: a float32 numpy Hessian may be used as scratch (its contents
    are destroyed) instead of copied -- the caller's in x in buffer is the solver's.
    clip: each group's range is searched (jang.quantizers.mse's shrunk ranges) for the
    least reconstruction error weighted by H's diagonal -- the inputs' energy --
    instead of taken from its min and max.
    3-D MoE weights (experts, out, in) take one Hessian per expert (experts, in, in).
    """
    if weight.ndim == 3:
        hessian = hessian if isinstance(hessian, np.ndarray) else np.asarray(hessian)
        parts = [gptq(weight[e], hessian[e], bits, group_size, damp, act_order, block_size, overwrite_hessian, clip)
                 for e in range(weight.shape[0])]
        return tuple(mx.stack(p) for p in zip(*parts))
    dtype = weight.dtype
    out, n = weight.shape
    if n % group_size:
        raise ValueError(f"{n} inputs do not split into groups of {group_size}")
    h = _float32_scratch(hessian, overwrite_hessian)
    dead = np.flatnonzero(np.diag(h) == 0)  # inputs never active: nothing to preserve
    h[dead, dead] = 1.0  # keeps H invertible; their weights are zeroed so they cost nothing
    energy = np.diag(h).reshape(n // group_size, group_size).copy() if clip else None  # original order
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else None
    if perm is not None:
        permute_symmetric(h, perm)
    r = factor_damped(h, damp)  # upper triangle: R with H + damping = R R^T
    inv_diag = 1.0 / np.diag(r)
    mixers = _group_mixers(r, group_size) if perm is None else None

    groups = n // group_size
    packed = np.empty((out, n * bits // 32), np.uint32)
    scales = np.empty((out, groups), np.float32)
    biases = np.empty_like(scales)
    rows = max(1, ROW_BLOCK_VALUES // n)
    for r0 in range(0, out, rows):
        r1 = min(r0 + rows, out)
        wt = np.asarray(weight[r0:r1].astype(mx.float32)).T.copy()  # (in, rows): row j is input column j
        wt[dead] = 0.0
        s, b = scales[r0:r1].T, biases[r0:r1].T  # (groups, rows) views: filled in place
        if perm is None:
            codes = _quantize_columns(wt, r, inv_diag, bits, group_size, block_size, dtype, s, b, mixers,
                                      energy=energy)
        else:
            # MLX groups are contiguous in the original order, so a permuted pass
            # cannot start groups as it goes: fix them all from the original weights.
            s[...], b[...] = _group_params(wt.reshape(groups, group_size, -1), bits, dtype, energy)
            wt = wt[perm]
            codes = np.empty(wt.shape, np.uint8)
            codes[perm] = _quantize_columns(wt, r, inv_diag, bits, group_size, block_size, dtype, s, b,
                                            None, perm // group_size)
        del wt
        packed[r0:r1] = np.asarray(pack(codes.T, bits))
    return mx.array(packed), mx.array(scales).astype(dtype), mx.array(biases).astype(dtype)


def _float32_scratch(hessian, overwrite: bool) -> np.ndarray:
    """The Hessian as a C-contiguous float32 array the solver may write: the caller's
    own when allowed and already so, else one float32 copy (never a float64 one)."""
    if overwrite and isinstance(hessian, np.ndarray) and hessian.dtype == np.float32 \
            and hessian.flags.c_contiguous and hessian.flags.writeable:
        return hessian
    if isinstance(hessian, mx.array):
        hessian = np.asarray(hessian.astype(mx.float32))
    return np.array(hessian, dtype=np.float32, order="C")


def _group_mixers(r: np.ndarray, group_size: int) -> np.ndarray:
    """Per group of inputs, M = A^-T D (A the group's diagonal block of R, D its diagonal).

    A group's scale and bias are fitted to what its weights should be given the
    inputs already quantized (and before its own): w + H22^-1 H21 e, with H22 the
    block of H for the inputs from the group on. Through R that is w + A^-T c, where
    c = R[:s, group]^T e; the running sums give D^-1 c, so M turns them into it."""
    n = r.shape[0]
    parts = np.stack([np.triu(r[s:s + group_size, s:s + group_size]) for s in range(0, n, group_size)])
    inv = np.asarray(mx.linalg.tri_inv(mx.array(parts), upper=True, stream=mx.cpu))
    return np.ascontiguousarray(inv.transpose(0, 2, 1) * np.diagonal(parts, axis1=1, axis2=2)[:, None, :])


def _quantize_columns(wt, r, inv_diag, bits, group_size, block_size, dtype, scales, biases, mixers,
                      group_of=None, energy=None):
    """GPTQ over the rows of wt (inputs in processing order; one column per output row);
    returns the codes (uint8). wt is consumed: each row, once quantized, is replaced by
    its rounding error (original weight - dequantized), which is what later rows need.

    Column j's input is w_j + sum_{i<j} V_ij e_i with V_ij = R_ij / R_jj. The sum is
    applied lazily at three levels, so most of the work is matrix products: errors
    from earlier blocks at once as a block starts, errors from earlier in the block as
    each run of group_size rows starts, and those from its own run just before a row
    is quantized.

    With group_of=None the groups follow the processing order and their parameters are
    filled into scales/biases as each group starts (fitted through ``mixers``, see
    _group_mixers); otherwise they are given and group_of[j] is row j's group.
    """
    levels = 2**bits - 1
    n = wt.shape[0]
    codes = np.empty(wt.shape, np.uint8)
    if group_of is None:
        # A group must lie inside one block, so its start sees every update from before it.
        block_size = max(1, block_size // group_size) * group_size
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        v = r[:b1, b0:b1] * inv_diag[b0:b1]  # how each earlier row's error feeds this block's rows
        block = wt[b0:b1] + _matmul(v[:b0].T, wt[:b0]) if b0 else wt[b0:b1].copy()
        vb, errors = v[b0:b1], wt[b0:b1]  # errors: a view; row i turns into its error once done
        for i in range(b1 - b0):
            j = b0 + i
            if i % group_size == 0:
                start = i
                if i:
                    block[i:i + group_size] += _matmul(vb[:i, i:i + group_size].T, errors[:i])
                if group_of is None:
                    w0 = errors[i:i + group_size]  # not quantized yet: still the original weights
                    fitted = w0 + _matmul(mixers[j // group_size], block[i:i + group_size] - w0)
                    scales[j // group_size], biases[j // group_size] = _group_params(
                        fitted, bits, dtype, None if energy is None else energy[j // group_size])
            w = block[i] + vb[start:i, i] @ errors[start:i]
            g = j // group_size if group_of is None else group_of[j]
            s, b = scales[g], biases[g]
            q = np.clip(np.rint((w - b) / np.where(s == 0, 1.0, s)), 0, levels)
            codes[j] = q
            errors[i] -= q * s + b
    return codes


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b through MLX's BLAS. numpy's bundled OpenBLAS keeps its threads spinning
    after each call, and on a small, busy machine they starve the Python loop around
    it (GPTQ ran 4-5x slower that way on 2 shared cores). The result is a view of
    MLX's output buffer, not a copy."""
    return np.asarray(mx.matmul(mx.array(a), mx.array(b), stream=mx.cpu))


def _group_params(groups: np.ndarray, bits: int, dtype, energy=None):
    """Affine scale and bias per group: (..., group_size, out) -> (..., out), rounded to
    the storage dtype so codes are chosen against what the kernel will see. Min/max, or
    with energy (..., group_size) the range among min/max and its shrunk versions
    (mse.SHRINKS) with the least energy-weighted rounding error."""
    lo, hi = groups.min(axis=-2), groups.max(axis=-2)
    levels = 2**bits - 1
    min_max = _as_stored((hi - lo) / levels, dtype), _as_stored(lo, dtype)
    if energy is None:
        return min_max
    mid = (lo + hi) / 2
    shrunk = [(_as_stored((hi - lo) * alpha / levels, dtype), _as_stored(mid + (lo - mid) * alpha, dtype))
              for alpha in SHRINKS[1:]]
    return least_error(groups, energy[..., :, None], [min_max, *shrunk], levels, axis=-2)


def _as_stored(x, dtype):
    return np.asarray(mx.array(x).astype(dtype).astype(mx.float32))
