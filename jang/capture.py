"""Input statistics of quantizable modules on calibration text.

A module is wrapped in a Recorder for the duration of a forward pass; the
Recorder adds its input to a running statistic and calls the module. The tied
embedding is recorded through ``as_linear`` (its use as the output head).
"""

import contextlib

import mlx.core as mx
import mlx.nn as nn
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


class Recorder(Wrapper):
    """Adds its input to a running statistic, then calls the wrapped module."""

    def __init__(self, inner, path: str, stats: dict, full: bool):
        super().__init__(inner)
        object.__setattr__(self, "_where", (path, stats, full))

    def _record(self, x):
        path, stats, full = self._where
        x = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        stat = x.T @ x if full else (x * x).sum(0)
        total, count = stats.get(path, (0, 0))
        stats[path] = (total + stat, count + x.shape[0])
        mx.eval(stats[path][0])

    def __call__(self, x, *args, **kwargs):
        if mx.issubdtype(x.dtype, mx.floating):
            self._record(x)
        return self.inner(x, *args, **kwargs)

    def as_linear(self, x):
        self._record(x)
        return self.inner.as_linear(x)


def input_statistics(model, chunks, paths, full: bool = False) -> dict:
    """path -> mean of x^2 per input column (full=False) or mean x x^T (full=True)."""
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
