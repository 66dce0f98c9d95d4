"""GPTQ without the whole model in memory: one decoder layer at a time.

The calibration activations entering the current layer are the only model state
carried from layer to layer. For each layer: its float weights are read from the
source, the Hessians of its linears are measured on the activations (as produced
by the layers before it *already quantized*, as in jang.sequential), each linear is
quantized with GPTQ, and the activations are pushed through the layer with its
dequantized weights. The quantized tensors are spilled to the partial folder
(``gptq/``); the shard writer then reads them like source tensors.

A second activation stream runs through the float layers, for what the in-memory
path measures on the float model: the activation energy of tensors GPTQ does not
apply to (the tied embedding, used as the output head) -- they get mse with it.

Only model types whose decoder layers are all called the same way (x, mask, cache)
stream; others run in memory (jang.convert decides from GPTQ_STREAM_TYPES).
"""

import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .capture import Recorder, Wrapper, add_gram
from .quantize import check_finite, storage_dtype
from .quantizers import QUANTIZERS
from .quantizers.gptq import gptq

# mlx-lm model types whose LanguageModel is embed -> layers(x, mask, cache) -> norm -> head.
GPTQ_STREAM_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class _Captured(Exception):
    pass


class _CaptureArgs(Wrapper):
    """Records the arguments the model passes its first layer, then stops the pass."""

    def __call__(self, *args, **kwargs):
        object.__setattr__(self, "captured", (args, kwargs))
        raise _Captured


def _params_under(weights: dict, prefix: str) -> list:
    return [(k[len(prefix):], v) for k, v in weights.items() if k.startswith(prefix)]


def _load(module, weights: dict, prefix: str, dtype=mx.float32):
    """Give module its source weights (cast for the calibration passes) and evaluate them."""
    module.update(tree_unflatten([(k, v.astype(dtype)) for k, v in _params_under(weights, prefix)]))
    mx.eval(module.parameters())


def _unload(module):
    """Drop a module's weights (tiny placeholders) once it is done with."""
    module.update(tree_unflatten([(k, mx.zeros((1,))) for k, _ in tree_flatten(module.parameters())]))


def _forward(layer, xs: list, layer_args: list):
    """Each chunk's activations through the layer, replaced in place: only one chunk's
    new activations exist beside the stream at a time."""
    for c, (args, kwargs) in enumerate(layer_args):
        xs[c] = layer(xs[c], *args, **kwargs)
        mx.eval(xs[c])


def _spill(folder, name, arrays: dict):
    folder.mkdir(exist_ok=True)
    mx.save_safetensors(str(folder / f"{name}.safetensors"), arrays)


def _quantize(weight, entry, fn):
    check_finite(entry.path, weight)
    wq, scales, biases = fn(weight.astype(storage_dtype(weight.dtype)), entry.bits, entry.group_size)
    mx.eval(wq, scales, biases)
    return wq, scales, biases


def _dequantized(wq, scales, biases, entry, dtype):
    """What later layers must see: the quantized weight, in the model's dtype, as fp32."""
    w = mx.dequantize(wq, scales, biases, entry.group_size, entry.bits).astype(dtype)
    return w.astype(mx.float32)


# MLX keeps freed buffers for reuse up to a cache limit; here they would pile up
# (a Hessian block, a layer's activations...) on top of what is live.
CACHE_LIMIT = 64 << 20


def gptq_stage(model, fresh_weights, plan, chunks, spill_dir, progress=None) -> dict:
    """Quantize plan's gptq entries layer by layer (and its other calibrated entries);
    returns output tensor name -> lazy array read from the spill files."""
    previous = mx.set_cache_limit(CACHE_LIMIT)
    try:
        return _stage(model, fresh_weights, plan, chunks, spill_dir, progress)
    finally:
        mx.set_cache_limit(previous)


def _stage(model, fresh_weights, plan, chunks, spill_dir, progress):
    todo = [t for t in plan if t.quantized and t.method == "gptq"]
    modules = dict(model.named_modules())
    for t in todo:  # as jang.quantize.apply_plan: GPTQ needs a linear
        if not isinstance(modules[t.path], nn.Linear):
            t.method = "mse"
            t.note = (t.note + "; " if t.note else "") + "gptq not applied to this tensor (not a linear); used mse"
    entries = {t.path: t for t in todo}
    shutil.rmtree(spill_dir, ignore_errors=True)
    lm = model.model
    weights = fresh_weights()
    dtype = weights["model.embed_tokens.weight"].dtype
    _load(lm.embed_tokens, weights, "model.embed_tokens.")
    del weights

    # the inputs of the first layer, per chunk
    first = lm.layers[0]
    capture = _CaptureArgs(first)
    lm.layers[0] = capture
    inputs, layer_args = [], []
    for ids in chunks:
        try:
            model(mx.array([ids]))
        except _Captured:
            (x, *rest), kwargs = capture.captured
            mx.eval(x)
            inputs.append(x)
            layer_args.append((rest, kwargs))
    lm.layers[0] = first
    _unload(lm.embed_tokens)
    x_quant, x_float = inputs, list(inputs)
    del inputs

    for i, layer in enumerate(lm.layers):
        prefix = f"model.layers.{i}."
        weights = fresh_weights()
        _load(layer, weights, prefix)
        del weights
        paths = [p for p in entries if p.startswith(prefix) and entries[p].method == "gptq"]
        inner = dict(layer.named_modules())
        stats = {}
        rel = [p[len(prefix):] for p in paths]
        _forward(layer, x_float, layer_args)
        layer.update_modules(tree_unflatten([(r, Recorder(inner[r], prefix + r, stats, full=True)) for r in rel]))
        for x, (a, k) in zip(x_quant, layer_args):
            mx.eval(layer(x, *a, **k))
        layer.update_modules(tree_unflatten([(r, inner[r]) for r in rel]))
        spilled = {}
        # smallest Hessian first, each freed once used: by the down projection (8192
        # inputs: 268 MB) the others are gone
        for path, r in sorted(zip(paths, rel), key=lambda p: stats[p[0]][0].size):
            entry = entries[path]
            source = inner[r].weight.astype(dtype)  # the source values (fp32 holds them exactly)
            mx.eval(source)
            inner[r].weight = mx.zeros((1,))  # the fp32 copy is not needed while GPTQ works
            hess = stats.pop(path)[0]
            wq, scales, biases = _quantize(source, entry, lambda w, b, g, h=hess: gptq(
                w, h, b, g, act_order=True, overwrite_hessian=True))
            del hess, source
            inner[r].weight = _dequantized(wq, scales, biases, entry, dtype)
            mx.eval(inner[r].weight)
            spilled.update({f"{path}.weight": wq, f"{path}.scales": scales, f"{path}.biases": biases})
            if progress:
                progress(path)
        _forward(layer, x_quant, layer_args)
        if spilled:
            _spill(spill_dir, f"layer-{i:05d}", spilled)
        _unload(layer)
        del spilled, stats
        mx.clear_cache()

    # after the layers: the head's input is the final norm of the hidden states
    weights = fresh_weights()
    _load(lm.norm, weights, "model.norm.")
    head_q = [lm.norm(x) for x in x_quant]
    head_f = [lm.norm(x) for x in x_float]
    mx.eval(head_q, head_f)
    del x_quant, x_float
    spilled = {}
    for path, entry in entries.items():
        if path.startswith("model.layers."):
            continue
        source = weights[f"{path}.weight"]
        if entry.method == "gptq":  # an untied lm_head
            hess = np.zeros((head_q[0].shape[-1],) * 2, np.float32)
            for h in head_q:
                add_gram(hess, h.reshape(-1, h.shape[-1]))
            fn = lambda w, b, g, hess=hess: gptq(w, hess, b, g, act_order=True, overwrite_hessian=True)  # noqa: E731
            del hess
        else:  # mse, weighted by the float model's activations where the in-memory path
            # measures them: the tied embedding's input as the output head
            energy = None
            if entry.role == "embed_tied":
                xs = [h.reshape(-1, h.shape[-1]) for h in head_f]
                energy = sum((x * x).sum(0) for x in xs) / sum(x.shape[0] for x in xs)
            fn = lambda w, b, g, e=energy: QUANTIZERS[entry.method](w, b, g, act_energy=e)  # noqa: E731
        wq, scales, biases = _quantize(source, entry, fn)
        spilled.update({f"{path}.weight": wq, f"{path}.scales": scales, f"{path}.biases": biases})
        if progress:
            progress(path)
    if spilled:
        _spill(spill_dir, "rest", spilled)
    del weights, spilled
    out = {}
    for f in sorted(spill_dir.glob("*.safetensors")) if spill_dir.exists() else []:
        out.update(mx.load(str(f)))
    return out


def activation_bytes(chunks, hidden: int) -> int:
    """Two fp32 activation streams over all calibration tokens."""
    return 2 * sum(len(c) for c in chunks) * hidden * 4

