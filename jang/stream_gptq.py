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

Memory: besides the interpreter and MLX, one layer's weights in fp32 (twice the
bf16 source), the two activation streams, and the Hessians of one calibration pass.
The down projection's Hessian (widest input) is measured and solved in a pass of its
own, so it never coexists with the others'; GPTQ factors each Hessian in place and
frees it (jang.quantizers.gptq). An MoE expert stack has one Hessian per expert
(experts x in x in), measured in a pass of its own too.

Only model types whose LanguageModel is embed -> layers(x, *args) -> norm -> head
stream (each layer's own arguments are recorded: Gemma 3 gives sliding-window and
global layers different masks); others run in memory (jang.convert decides from
GPTQ_STREAM_TYPES).
"""

import ctypes
import ctypes.util
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .capture import add_gram, hessian_recorder, takes_gptq
from .quantize import GPTQ_FALLBACK_NOTE, check_finite, storage_dtype
from .quantizers import QUANTIZERS
from .quantizers.gptq import gptq
from .roles import classify
from .sequential import decoder_layers, expert_hessians, layer_calls

try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
    _LIBC.malloc_trim, _LIBC.mallopt  # glibc only
except (OSError, AttributeError, TypeError):
    _LIBC = None

# mlx-lm model types whose LanguageModel is embed -> layers(x, ...) -> norm -> head.
# The MoE ones quantize each expert on the rows routed to it (jang.capture.ExpertRecorder).
GPTQ_STREAM_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "qwen3_moe", "qwen2_moe", "mixtral")


class _Rows(nn.Module):
    """embed_tokens for the capture pass: rows of the source table, cast to fp32."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def __call__(self, ids):
        return self.table[ids].astype(mx.float32)


def _params_under(weights: dict, prefix: str) -> list:
    return [(k[len(prefix):], v) for k, v in weights.items() if k.startswith(prefix)]


def _layer_inputs(model, embedding, chunks):
    """(layer 0's hidden-state input per chunk, for each layer the other arguments it is
    called with per chunk), from one pass that stops at the last layer. Layers are
    not loaded: each stand-in records its call and passes the hidden state on. The
    embedding rows are gathered in the source dtype and cast, the values the fp32
    model would give without building its fp32 table (twice the source's size)."""
    lm = model.model
    table = lm.embed_tokens
    lm.embed_tokens = _Rows(embedding)
    try:
        first, calls = layer_calls(model, chunks, decoder_layers(model), run_inner=False)
    finally:
        lm.embed_tokens = table
    return first, calls


def _load(module, weights: dict, prefix: str, dtype=mx.float32):
    """Give module its source weights (cast for the calibration passes), one tensor at a
    time: each source tensor is popped from ``weights`` and gone once cast, so only one
    exists beside the cast layer."""
    params = []
    for k, _ in _params_under(weights, prefix):
        params.append((k, weights.pop(prefix + k).astype(dtype)))
        mx.eval(params[-1][1])
    module.update(tree_unflatten(params))


def _unload(module):
    """Drop a module's weights (tiny placeholders) once it is done with."""
    module.update(tree_unflatten([(k, mx.zeros((1,))) for k, _ in tree_flatten(module.parameters())]))


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _map_large_allocations():
    """From here on, glibc serves every allocation of 1 MB or more with its own mmap,
    returned to the system when freed. By default the threshold climbs (up to 32 MB)
    as large blocks are freed, so the few-MB buffers of this stage (a chunk's
    activations, blocks of the solver) come from the heap, whose holes stay in the RSS:
    each layer then peaked 50-90 MB above the one before."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def _trim():
    mx.clear_cache()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _passes(rel: list) -> list:
    """A layer's GPTQ linears (relative paths), in groups whose Hessians are measured by
    one calibration pass each. The MLP's down projection has the widest input (8192 where
    the others have 2048: a 268 MB Hessian in fp32) and its output feeds no other linear
    of the layer, so it is measured and quantized first, on its own: the others'
    Hessians, measured after, are the same numbers, and never coexist with its own.
    Each MoE expert stack gets a pass of its own too, after the down projections: it
    has one Hessian per expert (Qwen3-30B-A3B's gate or up: 128 x 2048^2 in fp32,
    2 GiB), and a layer forward costs little beside solving 128 experts."""
    down = [r for r in rel if r.endswith("mlp.down_proj") or classify(r) == "expert_down"]
    stacks = [r for r in rel if classify(r).startswith("expert_") and r not in down]
    rest = [r for r in rel if r not in down and r not in stacks]
    return [[r] for r in down + stacks] + ([rest] if rest else [])


def _gptq_pass(layer, prefix, rel, entries, xs, layer_args, dtype, progress) -> dict:
    """Measure the Hessians of the linears rel on the activations xs, quantize each with
    GPTQ (the layer then holds its dequantized weights, as later layers must see them);
    returns the quantized tensors by output name."""
    _trim()
    inner = dict(layer.named_modules())
    stats = {}
    layer.update_modules(tree_unflatten([(r, hessian_recorder(inner[r], prefix + r, stats)) for r in rel]))
    for x, (a, k) in zip(xs, layer_args):
        mx.eval(layer(x, *a, **k))
    layer.update_modules(tree_unflatten([(r, inner[r]) for r in rel]))
    quantized = {}
    for r in sorted(rel, key=lambda r: stats[prefix + r][0].size):  # smallest first: each freed once used
        path, module = prefix + r, inner[r]
        source = module.weight.astype(dtype)  # the source values (fp32 holds them exactly)
        mx.eval(source)
        module.weight = mx.zeros((1,))  # the fp32 copy is not needed while GPTQ works
        hess, rows = stats.pop(path)
        if np.ndim(rows):  # an expert stack: one Hessian per expert
            hess = expert_hessians(entries[path], hess, rows)
        wq, scales, biases = _quantize(source, entries[path], lambda w, b, g, h=hess: gptq(
            w, h, b, g, act_order=True, overwrite_hessian=True))
        del hess, source
        module.weight = _dequantized(wq, scales, biases, entries[path], dtype)
        mx.eval(module.weight)
        quantized.update({f"{path}.weight": wq, f"{path}.scales": scales, f"{path}.biases": biases})
        if progress:
            progress(path)
    return quantized


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


# MLX keeps freed buffers for reuse up to a cache limit, and they count in the RSS on
# top of what is live. Buffers here are large and few (a layer's weights, a chunk's
# activations, blocks of a Hessian), so reusing them saves little: keep none
# (measured on the 1.13 GB model: peak 807 MiB with none, 869 MiB with 64 MiB kept).
CACHE_LIMIT = 0


def gptq_stage(model, fresh_weights, plan, chunks, spill_dir, progress=None) -> dict:
    """Quantize plan's gptq entries layer by layer (and its other calibrated entries);
    returns output tensor name -> lazy array read from the spill files."""
    previous = mx.set_cache_limit(CACHE_LIMIT)
    _map_large_allocations()
    try:
        return _stage(model, fresh_weights, plan, chunks, spill_dir, progress)
    finally:
        mx.set_cache_limit(previous)


def _stage(model, fresh_weights, plan, chunks, spill_dir, progress):
    todo = [t for t in plan if t.quantized and t.method == "gptq"]
    modules = dict(model.named_modules())
    for t in todo:  # as jang.quantize.apply_plan: GPTQ needs a linear or an expert stack
        if not takes_gptq(modules[t.path]):
            t.method = "mse"
            t.note = (t.note + "; " if t.note else "") + GPTQ_FALLBACK_NOTE
    entries = {t.path: t for t in todo}
    shutil.rmtree(spill_dir, ignore_errors=True)
    lm = model.model
    weights = fresh_weights()
    dtype = weights["model.embed_tokens.weight"].dtype
    x_quant, calls = _layer_inputs(model, weights["model.embed_tokens.weight"], chunks)
    del weights
    x_float = list(x_quant)

    for i, (layer, layer_args) in enumerate(zip(lm.layers, calls)):
        prefix = f"model.layers.{i}."
        weights = fresh_weights()
        _load(layer, weights, prefix)
        del weights
        _forward(layer, x_float, layer_args)
        rel = [p[len(prefix):] for p in entries if p.startswith(prefix) and entries[p].method == "gptq"]
        spilled = {}
        for group in _passes(rel):
            spilled.update(_gptq_pass(layer, prefix, group, entries, x_quant, layer_args, dtype, progress))
        _forward(layer, x_quant, layer_args)
        if spilled:
            _spill(spill_dir, f"layer-{i:05d}", spilled)
        _unload(layer)
        del spilled
        _trim()

    # after the layers: the head's input is the final norm of the hidden states. What the
    # head-side entries need from the activations is measured first, so the activations
    # are gone before the largest tensors (embedding, head) are read.
    weights = fresh_weights()
    _load(lm.norm, weights, "model.norm.")
    head = {p: e for p, e in entries.items() if not p.startswith("model.layers.")}
    fns = {}
    for path, entry in head.items():
        if entry.method == "gptq":  # an untied lm_head
            hess = np.zeros((x_quant[0].shape[-1],) * 2, np.float32)
            for x in x_quant:
                add_gram(hess, lm.norm(x).reshape(-1, x.shape[-1]))
            fns[path] = lambda w, b, g, hess=hess: gptq(w, hess, b, g, act_order=True, overwrite_hessian=True)  # noqa: E731
            del hess
        else:  # mse, weighted by the float model's activations where the in-memory path
            # measures them: the tied embedding's input as the output head
            energy = None
            if entry.role == "embed_tied":
                xs = [h.reshape(-1, h.shape[-1]) for h in (lm.norm(x) for x in x_float)]
                energy = sum((x * x).sum(0) for x in xs) / sum(x.shape[0] for x in xs)
                mx.eval(energy)
                del xs
            fns[path] = lambda w, b, g, e=energy, m=entry.method: QUANTIZERS[m](w, b, g, act_energy=e)  # noqa: E731
    del x_quant, x_float
    for path, entry in head.items():
        source = weights.pop(f"{path}.weight")  # popped: once read, the dict would keep it in memory
        wq, scales, biases = _quantize(source, entry, fns.pop(path))
        del source
        _spill(spill_dir, f"rest-{path}", {f"{path}.weight": wq, f"{path}.scales": scales, f"{path}.biases": biases})
        del wq, scales, biases
        if progress:
            progress(path)
    del weights
    out = {}
    for f in sorted(spill_dir.glob("*.safetensors")) if spill_dir.exists() else []:
        out.update(mx.load(str(f)))
    return out


def activation_bytes(chunks, hidden: int) -> int:
    """Two fp32 activation streams over all calibration tokens."""
    return 2 * sum(len(c) for c in chunks) * hidden * 4

