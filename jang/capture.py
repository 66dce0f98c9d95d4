"""Input statistics of quantizable modules on calibration text.

A module is wrapped in a Recorder for the duration of a forward pass; the
Recorder adds its input to a running statistic and calls the module. The tied
embedding is recorded through ``as_linear`` (its use as the output head).
"""

import contextlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten


@contextlib.contextmanager
def running_in_float32(model):
    """Run calibration passes in fp32 (many times faster than fp16/bf16 on CPU), then
    cast back to the model's own dtype; fp16/bf16 -> fp32 -> back is lossless."""
    floats = [v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    original = max(set(floats), key=floats.count) if floats else mx.float32
    model.set_dtype(mx.float32)
    try:
        yield model
    finally:
        model.set_dtype(original)


class Wrapper(nn.Module):
    """Stands in for a module during a calibration pass: attributes it lacks are the
    wrapped module's (models read things like ``layer.use_sliding``)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def __getattr__(self, key):
        try:
            return super().__getattr__(key)
        except AttributeError:
            inner = dict.get(self, "inner")
            if inner is None:  # still in __init__
                raise
            return getattr(inner, key)


GRAM_BLOCK_VALUES = 1 << 20  # values per block of x^T x rows (4 MB of fp32)


def add_gram(total: np.ndarray, x: mx.array):
    """total += x^T x, in place, a block of rows at a time: an 8192-input Hessian is
    268 MB in float32, and summing whole products (total + x^T x) held three of them."""
    n = total.shape[0]
    rows = max(1, GRAM_BLOCK_VALUES // n)
    for r0 in range(0, n, rows):
        total[r0:r0 + rows] += np.asarray(mx.matmul(x[:, r0:r0 + rows].T, x, stream=mx.cpu))


class Recorder(Wrapper):
    """Adds its input to a running statistic, then calls the wrapped module."""

    def __init__(self, inner, path: str, stats: dict, full: bool):
        super().__init__(inner)
        object.__setattr__(self, "_where", (path, stats, full))

    def _record(self, x):
        path, stats, full = self._where
        x = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        total, count = stats.get(path, (None, 0))
        if full:
            mx.eval(x)
            if total is None:
                total = np.zeros((x.shape[-1],) * 2, np.float32)
            add_gram(total, x)
        else:
            total = (x * x).sum(0) if total is None else total + (x * x).sum(0)
            mx.eval(total)
        stats[path] = (total, count + x.shape[0])

    def __call__(self, x, *args, **kwargs):
        if mx.issubdtype(x.dtype, mx.floating):
            self._record(x)
        return self.inner(x, *args, **kwargs)

    def as_linear(self, x):
        self._record(x)
        return self.inner.as_linear(x)


def routed_rows(x: mx.array, indices: mx.array):
    """The input rows of a switch layer's call, flat (rows, in), and the expert each row
    goes to (numpy, rows). mlx-lm's SwitchGLU calls its SwitchLinears two ways:
    unsorted, x (..., 1, 1, in) with indices (..., k) -- every token once per chosen
    expert, by broadcasting; sorted (many tokens), x (n*k, 1, in) already gathered
    into expert order with indices (n*k,). Both are gather_mm's rule: x's batch axes
    broadcast against indices, and each batch element's rows meet expert indices[b]."""
    batch = tuple(np.broadcast_shapes(x.shape[:-2], indices.shape))
    per_batch = x.shape[-2]  # matrix rows per batch element (1 from SwitchGLU)
    rows = mx.broadcast_to(x, batch + x.shape[-2:]).reshape(-1, x.shape[-1])
    experts = np.repeat(np.asarray(mx.broadcast_to(indices, batch)).reshape(-1), per_batch)
    return rows, experts


class ExpertRecorder(Wrapper):
    """Stands in for a switch layer (stacked experts, called with routing indices):
    adds to each expert's own sum of x x^T the rows routed to it, and counts them.
    stats[path] = ((experts, in, in) numpy float32, (experts,) row counts)."""

    def __init__(self, inner, path: str, stats: dict):
        super().__init__(inner)
        object.__setattr__(self, "_where", (path, stats))

    def __call__(self, x, indices, *args, **kwargs):
        path, stats = self._where
        rows, experts = routed_rows(x.astype(mx.float32), indices)
        mx.eval(rows)
        n_experts, _, n_in = self.inner.weight.shape
        total, count = stats.get(path, (None, None))
        if total is None:
            total, count = np.zeros((n_experts, n_in, n_in), np.float32), np.zeros(n_experts, np.int64)
        routed = np.bincount(experts, minlength=n_experts)
        ends = np.cumsum(routed)
        rows = rows[mx.array(np.argsort(experts, kind="stable"))]  # by expert: each one's rows are one slice
        for e in np.flatnonzero(routed):
            add_gram(total[e], rows[int(ends[e] - routed[e]):int(ends[e])])
        count += routed
        stats[path] = (total, count)
        return self.inner(x, indices, *args, **kwargs)


def is_expert_stack(module) -> bool:
    from mlx_lm.models.switch_layers import SwitchLinear

    return isinstance(module, SwitchLinear)


def takes_gptq(module) -> bool:
    """Whether GPTQ has a Hessian for the module: a linear layer (one, over all its
    inputs) or an expert stack (one per expert, over the rows routed to it). An
    embedding is a lookup: no inputs to weigh its error by."""
    return isinstance(module, nn.Linear) or is_expert_stack(module)


def hessian_recorder(module, path: str, stats: dict) -> Wrapper:
    """The stand-in that sums x x^T of module's inputs into stats[path] = (sum, rows);
    for an expert stack both are per expert (ExpertRecorder)."""
    if is_expert_stack(module):
        return ExpertRecorder(module, path, stats)
    return Recorder(module, path, stats, full=True)


def input_statistics(model, chunks, paths, full: bool = False) -> dict:
    """path -> mean of x^2 per input column (full=False, MLX) or mean x x^T (full=True, numpy float32)."""
    modules = dict(model.named_modules())
    stats = {}
    model.update_modules(tree_unflatten([(p, Recorder(modules[p], p, stats, full)) for p in paths]))
    try:
        with running_in_float32(model):
            for ids in chunks:
                mx.eval(model(mx.array([ids])))
    finally:
        model.update_modules(tree_unflatten([(p, modules[p]) for p in paths]))
    return {p: total / count for p, (total, count) in stats.items()}
