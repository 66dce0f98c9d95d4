"""GPTQ layer by layer: each decoder layer's Hessians are measured on the outputs
of the layers before it *as already quantized*, so later layers correct for the
error of earlier ones.

One pass of the float model records what every decoder layer is called with (its
hidden-state input for layer 0; the mask and other arguments for all). From then on
the calibration hidden states are carried from layer to layer: a layer runs once with
its linears wrapped in Recorders (sum x x^T of their inputs), is quantized, and runs
again to give the next layer its input. That is two layer-forwards per layer -- about
two model-forwards in all, where re-running the model up to each layer would cost
L/2 of them (15 for SmolLM2's 30 layers).
"""

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten

from .capture import Wrapper, hessian_recorder, running_in_float32
from .quantizers.gptq import gptq


class StopForward(Exception):
    pass


class CallRecorder(Wrapper):
    """Stands in for a decoder layer: records each call's arguments after the hidden
    state into ``calls`` (masks differ by layer in Gemma 3) and layer 0's hidden state
    into ``first``; the last layer ends the pass (StopForward). run_inner=False passes
    the hidden state on without running the layer (its weights need not be loaded)."""

    def __init__(self, inner, calls: list, first, last: bool, run_inner: bool = True):
        super().__init__(inner)
        object.__setattr__(self, "_to", (calls, first, last, run_inner))

    def __call__(self, x, *args, **kwargs):
        calls, first, last, run_inner = self._to
        calls.append((args, kwargs))
        if first is not None:
            first.append(x)
            mx.eval(x)
        if last:
            raise StopForward
        return self.inner(x, *args, **kwargs) if run_inner else x


def decoder_layers(model):
    """(path prefix, module) of each decoder layer, in order (mlx-lm's model.layers)."""
    paths = {id(m): p for p, m in model.named_modules()}
    return [(paths[id(layer)], layer) for layer in getattr(model, "layers", [])]


def layer_calls(model, chunks, layers, run_inner=True):
    """(layer 0's hidden-state input per chunk, for each layer the other arguments it is
    called with per chunk), from one pass of the float model over the chunks.
    run_inner=False: the layers are not run (see CallRecorder)."""
    calls, first = [[] for _ in layers], []
    model.update_modules(tree_unflatten([(p, CallRecorder(m, calls[i], first if i == 0 else None,
                                                          i == len(layers) - 1, run_inner))
                                         for i, (p, m) in enumerate(layers)]))
    try:
        for ids in chunks:
            try:
                model(mx.array([ids]))  # lazy: only what layer 0's input and the masks need is computed
            except StopForward:
                pass
    finally:
        model.update_modules(tree_unflatten([(p, m) for p, m in layers]))
    return first, calls


def hessians(model, chunks, paths, run=None) -> dict:
    """path -> (sum of x x^T of that module's inputs over the chunks, rows summed); for
    an expert stack, per expert: ((experts, in, in), (experts,)), each expert's sum over
    the rows routed to it. ``run()`` does the forward work (default: the whole model
    over the chunks)."""
    modules = dict(model.named_modules())
    stats = {}
    model.update_modules(tree_unflatten([(p, hessian_recorder(modules[p], p, stats)) for p in paths]))
    try:
        if run is None:
            for ids in chunks:
                mx.eval(model(mx.array([ids])))
        else:
            run()
    finally:
        model.update_modules(tree_unflatten([(p, modules[p]) for p in paths]))
    return stats


def expert_hessians(entry, hessian: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """An expert stack's Hessians, with the identity for each expert no calibration row
    was routed to (recorded in entry.note). A zero Hessian would mark all the expert's
    inputs dead, and GPTQ would zero its weights; the identity weighs every input alike
    and moves no error between them, so GPTQ rounds each weight to its nearest code
    (RTN on GPTQ's group grid) -- all one can do without seeing its inputs.
    Experts that saw few rows keep their own (rank-deficient) Hessian: GPTQ's damping
    keeps it invertible, but it fits those rows and may do worse than RTN on other
    text; the note gives the rows per expert against the inputs, to judge by (an
    expert sees about top-k/experts of the calibration tokens)."""
    unrouted = np.flatnonzero(rows == 0)
    hessian[unrouted] = np.eye(hessian.shape[-1], dtype=hessian.dtype)
    note = (f"gptq per expert, on the calibration rows routed to it "
            f"({rows.min()}-{rows.max()} rows for {hessian.shape[-1]} inputs)")
    if unrouted.size:
        note += (f"; {unrouted.size} of {rows.size} experts got no calibration rows "
                 f"(experts {', '.join(map(str, unrouted[:8]))}{' ...' if unrouted.size > 8 else ''}): rounded to nearest")
    entry.note = (entry.note + "; " if entry.note else "") + note
    return hessian


def run_gptq(model, entries, chunks, quantize_entry, progress=True, act_order=True) -> dict:
    """Quantize the 2-D linear entries with GPTQ, layer by layer; returns path -> the
    quantized layer, for the caller to swap in. Until then each float module holds its
    dequantized weights -- the same numbers the later layers must see -- so the
    calibration passes run through BLAS rather than MLX's slow CPU quantized matmul.
    Entries must be linear layers or MoE expert stacks (each expert gets the Hessian of
    the rows routed to it); an embedding has no input Hessian."""
    from tqdm.auto import tqdm

    modules = dict(model.named_modules())
    linear = {t.path: t for t in entries}
    layers = decoder_layers(model)
    done = {}
    bar = tqdm(total=len(linear), desc="quantizing (gptq, layer by layer)", unit="tensor", disable=not progress)

    # One fp32 context for the whole run: calibration passes go through BLAS. Entering
    # and leaving it per layer left every parameter behind a lazy chain of dtype casts
    # (fp16 -> fp32 -> fp16 ...) that was only evaluated at the end, all at once.
    dtypes = {p: modules[p].weight.dtype for p in linear}

    def quantize_paths(h, paths):
        for path in paths:
            module = modules[path]
            module.weight = module.weight.astype(dtypes[path])  # its dtype decides the scales' dtype
            hess, rows = h.pop(path)
            if np.ndim(rows):  # an expert stack
                hess = expert_hessians(linear[path], hess, rows)
            # each Hessian is used once: GPTQ may factor it in place (as jang.stream_gptq does)
            layer = quantize_entry(linear[path], lambda w, bits, group, hess=hess: gptq(
                w, hess, bits, group, act_order=act_order, overwrite_hessian=True))
            # what the later layers must see: the dequantized weights, as stored, in fp32
            module.weight = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size,
                                          layer.bits).astype(dtypes[path]).astype(mx.float32)
            mx.eval(module.weight)
            done[path] = layer
            bar.update()

    with running_in_float32(model):
        hidden, calls = layer_calls(model, chunks, layers) if layers else ([], [])
        for (prefix, block), block_calls in zip(layers, calls):
            def forward(block=block, block_calls=block_calls):
                out = [block(x, *args, **kwargs) for x, (args, kwargs) in zip(hidden, block_calls)]
                mx.eval(out)
                return out

            paths = [p for p in linear if p.startswith(prefix + ".")]
            if paths:
                quantize_paths(hessians(model, chunks, paths, run=forward), paths)
            hidden = forward()  # the next layer's input, through this layer as quantized
        rest = [p for p in linear if p not in done]  # e.g. an untied lm_head: one full pass
        if rest:
            quantize_paths(hessians(model, chunks, rest), rest)
    bar.close()
    return done
