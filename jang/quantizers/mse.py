"""MSE-optimal clipping: per group, search the range [min, max] shrunk towards its
centre and keep the scale/bias with the least reconstruction error.

Error is weighted by input-activation energy E[x_j^2] when calibration
statistics are given (an error on an input that is always near zero costs
nothing), else uniform. Round-to-nearest (alpha = 1) is always a candidate, so
the result is never worse than RTN on the weighted error.
"""

import mlx.core as mx
import numpy as np

from .pack import affine

SHRINKS = np.linspace(1.0, 0.55, 19)
BLOCK_VALUES = 1 << 23  # rows are searched in blocks of ~8M values: the search holds ~10 float32 copies


def quantize_weight(weight: mx.array, bits: int, group_size: int, act_energy=None, **_):
    """Row blocks are independent (groups never cross rows), so a large tensor (an
    embedding) is searched block by block: same result, bounded memory."""
    n = weight.shape[-1]
    rows = weight.reshape(-1, n)
    step = max(1, BLOCK_VALUES // n)
    if rows.shape[0] <= step:
        return _quantize_block(weight, bits, group_size, act_energy)
    parts = [_quantize_block(rows[i:i + step], bits, group_size, act_energy) for i in range(0, rows.shape[0], step)]
    lead = weight.shape[:-1]
    return tuple(mx.concatenate(p, axis=0).reshape(*lead, -1) for p in zip(*parts))


def _quantize_block(weight: mx.array, bits: int, group_size: int, act_energy=None):
    dtype = weight.dtype
    w = np.asarray(weight.astype(mx.float32))
    lead, n = w.shape[:-1], w.shape[-1]
    g = w.reshape(-1, n // group_size, group_size)
    if act_energy is None:
        energy = np.ones(n, np.float32).reshape(1, n // group_size, group_size)
    else:
        energy = np.asarray(act_energy, np.float32).reshape(1, n // group_size, group_size)
    lo, hi = g.min(-1), g.max(-1)
    mid = (lo + hi) / 2
    levels = 2**bits - 1
    _, rtn_s, rtn_b = mx.quantize(weight, group_size=group_size, bits=bits)
    candidates = [(_np(rtn_s).reshape(lo.shape), _np(rtn_b).reshape(lo.shape))]  # MLX's own RTN
    for alpha in SHRINKS:
        a, b_hi = mid + (lo - mid) * alpha, mid + (hi - mid) * alpha
        candidates.append((_as_stored((b_hi - a) / levels, dtype), _as_stored(a, dtype)))
    best_s, best_b = least_error(g, energy, candidates, levels, axis=-1)
    scales = mx.array(best_s.reshape(*lead, n // group_size)).astype(dtype)
    biases = mx.array(best_b.reshape(*lead, n // group_size)).astype(dtype)
    return affine(w, scales, biases, bits, group_size)


def least_error(groups, weight, candidates, levels: int, axis: int):
    """Per group, the (scale, bias) among ``candidates`` whose rounding of ``groups`` (a
    group's weights along ``axis``) has the least ``weight``-ed squared error; the
    earliest candidate wins a tie. Shared by mse and GPTQ's searched group ranges."""
    lead = lambda a: np.expand_dims(a, axis)  # noqa: E731 - a group's value beside its weights
    best_err = best_s = best_b = None
    for s, bias in candidates:
        q = np.clip(np.rint((groups - lead(bias)) / lead(np.where(s == 0, 1.0, s))), 0, levels)
        err = ((q * lead(s) + lead(bias) - groups) ** 2 * weight).sum(axis)
        if best_err is None:
            best_err, best_s, best_b = np.full(err.shape, np.inf, np.float32), np.zeros_like(s), np.zeros_like(bias)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s, best_b = np.where(better, s, best_s), np.where(better, bias, best_b)
    return best_s, best_b


def _np(a):
    return np.asarray(a.astype(mx.float32))


def _as_stored(x, dtype):
    """Round to the storage dtype, as the kernel will see it."""
    return np.asarray(mx.array(x).astype(dtype).astype(mx.float32))
