"""GPTQ layer by layer: each decoder layer's Hessians are measured on the outputs
of the layers before it *as already quantized*, so later layers correct for the
error of earlier ones.

A forward pass over the calibration chunks stops right after the layer being
worked on (no need to run the rest of the model), with that layer's linears
wrapped in Recorders that accumulate sum x x^T of their inputs.
"""

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten
from tqdm.auto import tqdm

from .capture import Recorder, Wrapper, running_in_float32
from .quantizers.gptq import gptq


class _StopForward(Exception):
    pass


class _StopAfter(Wrapper):
    """Runs the wrapped layer, then ends the forward pass."""

    def __call__(self, *args, **kwargs):
        mx.eval(self.inner(*args, **kwargs))
        raise _StopForward


def decoder_layers(model):
    """(path prefix, module) of each decoder layer, in order (mlx-lm's model.layers)."""
    paths = {id(m): p for p, m in model.named_modules()}
    return [(paths[id(layer)], layer) for layer in getattr(model, "layers", [])]


def hessians(model, chunks, paths, stop_at=None) -> dict:
    """path -> sum of x x^T of that module's inputs over the chunks."""
    modules = dict(model.named_modules())
    stats = {}
    # Two updates each way: a path and a path inside it cannot go in one tree.
    model.update_modules(tree_unflatten([(p, Recorder(modules[p], p, stats, full=True)) for p in paths]))
    if stop_at is not None:
        model.update_modules(tree_unflatten([(stop_at, _StopAfter(modules[stop_at]))]))
    try:
        with running_in_float32(model):
            for ids in chunks:
                try:
                    mx.eval(model(mx.array([ids])))
                except _StopForward:
                    pass
    finally:
        if stop_at is not None:
            model.update_modules(tree_unflatten([(stop_at, modules[stop_at])]))
        model.update_modules(tree_unflatten([(p, modules[p]) for p in paths]))
    return {p: total for p, (total, _) in stats.items()}


def run_gptq(model, entries, chunks, quantize_entry, progress=True, act_order=True) -> dict:
    """Quantize the 2-D linear entries with GPTQ, layer by layer; returns path -> the
    quantized layer, for the caller to swap in. Until then each float module holds its
    dequantized weights -- the same numbers the later layers must see -- so the
    calibration passes run through BLAS rather than MLX's slow CPU quantized matmul.
    Entries must be linear layers (an embedding or MoE expert stack has no such Hessian here)."""
    modules = dict(model.named_modules())
    linear = {t.path: t for t in entries}
    groups = [(prefix, [p for p in linear if p.startswith(prefix + ".")]) for prefix, _ in decoder_layers(model)]
    rest = [p for p in linear if not any(p in members for _, members in groups)]
    groups.append((None, rest))  # e.g. an untied lm_head: one full pass
    done = {}
    bar = tqdm(total=len(linear), desc="quantizing (gptq, layer by layer)", unit="tensor", disable=not progress)
    for stop_at, paths in groups:
        if not paths:
            continue
        h = hessians(model, chunks, paths, stop_at)
        for path in paths:
            entry = linear[path]
            hess = h[path]
            layer = quantize_entry(entry, lambda w, bits, group, hess=hess: gptq(
                w, np.asarray(hess), bits, group, act_order=act_order))
            modules[path].weight = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size,
                                                 layer.bits).astype(modules[path].weight.dtype)
            done[path] = layer
            bar.update()
    bar.close()
    return done
