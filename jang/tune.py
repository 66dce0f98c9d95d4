"""Tune the scales and biases of a quantized model against its float model.

After quantization every group of weights is ``scale * code + bias`` with the codes
fixed. Quantizers choose scale and bias per group to fit the *weights*; what matters
is the model's *output*. ``tune`` keeps the codes and moves only the scales and
biases (Adam, cosine-decayed learning rate) to minimise the mean KL(float || quantized)
of the next-token distributions on calibration text: distillation from the float
model, the idea of mlx-lm's ``mlx_lm.quant.dwq``, with far fewer trainable numbers
than weights (2 per group: 1/32 of the weights at group 64).

The result is stored exactly as before (same arrays, dtypes and shapes; codes
untouched), so ``jang.save`` and ``jang.load`` need nothing new.
"""

import time
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_unflatten
from tqdm.auto import tqdm

from .capture import running_in_float32

# Teacher log-probabilities are cached (fp32) while they fit in this many bytes, else
# recomputed for every batch: SmolLM2's 32 calibration chunks x 128 tokens x 49k vocab
# are 0.8 GB; Gemma's 262k vocab would be 4.3 GB, so Gemma recomputes.
CACHE_BYTES = 1.2e9
DEFAULT_LR = 1e-4  # SmolLM2 at 2.5 bits, 40 steps: 3e-4 and 5e-5 both ended worse (docs/quality.md)


class _Dequantized(nn.Module):
    """Training stand-in for a JANG QuantizedLinear: the same codes, scales and biases,
    run as dequantize + float matmul. MLX's quantized matmul has a gradient for scales
    and biases too, but on the CPU it runs at ~2 GFLOP/s; dequantize + BLAS is ~50x
    faster, and the dequantize is linear in scales and biases, so their gradients are
    exact."""

    def __init__(self, layer):
        super().__init__()
        self.group_size, self.bits, self.mode = layer.group_size, layer.bits, layer.mode
        self.weight, self.scales, self.biases = layer["weight"], layer["scales"], layer["biases"]
        if "bias" in layer:
            self.bias = layer["bias"]

    def dense(self):
        return mx.dequantize(self.weight, self.scales, self.biases, group_size=self.group_size,
                             bits=self.bits, mode=self.mode)

    def __call__(self, x):
        y = x @ self.dense().T
        return y + self["bias"] if "bias" in self else y


class _DequantizedEmbedding(_Dequantized):
    """Stand-in for a JANG QuantizedEmbedding: the lookup dequantizes only the rows
    asked for; ``as_linear`` (a tied output head) the whole table."""

    def __call__(self, ids):
        return mx.dequantize(self.weight[ids], self.scales[ids], self.biases[ids], group_size=self.group_size,
                             bits=self.bits, mode=self.mode)

    def as_linear(self, x):
        return x @ self.dense().T


def quantized_layers(model):
    """(path, layer) of the quantized linears and embeddings in affine mode with biases:
    all of them run as stand-ins while tuning (any left out would run MLX's CPU quantized
    matmul in the training passes: SmolLM2 JANG_2M with its 8-bit layers left out took
    17 s a step of 128 tokens). MoE expert stacks and MLA's per-head matrices are not
    covered."""
    return [(p, m) for p, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
            and m.mode == "affine" and m.get("biases") is not None]


def tunable_layers(model):
    """The quantized layers whose scales and biases are tuned: below 8 bits. An 8-bit
    scale is ~1/64 of a 2-bit one, so a learning rate right for 2-4 bits moves it by
    most of itself each step (measured: SmolLM2 JANG_2M, KL 3.3 -> 22.8 in 4 steps
    with its 8-bit layers trained); 8-bit groups have little error to recover anyway."""
    return [(p, m) for p, m in quantized_layers(model) if m.bits < 8]


@contextmanager
def stand_ins(model, layers):
    """Swap layers for their training stand-ins; on exit put the originals back holding
    the stand-ins' scales and biases, cast to the dtype they were stored in."""
    subs = [(p, (_DequantizedEmbedding if isinstance(m, nn.QuantizedEmbedding) else _Dequantized)(m))
            for p, m in layers]
    model.update_modules(tree_unflatten(subs))
    try:
        yield [s for _, s in subs]
    finally:
        for (_, layer), (_, sub) in zip(layers, subs):
            layer.scales = sub.scales.astype(layer["scales"].dtype)
            layer.biases = sub.biases.astype(layer["biases"].dtype)
        model.update_modules(tree_unflatten(list(layers)))


def kl_loss(student_logits, teacher_logp):
    """Mean over tokens of KL(teacher || student), in fp32."""
    logq = nn.log_softmax(student_logits.astype(mx.float32), axis=-1)
    return (mx.exp(teacher_logp) * (teacher_logp - logq)).sum(-1).mean()


class Teacher:
    """The float model's next-token log-probabilities per calibration chunk, cached
    while they fit in ``cache_bytes``."""

    def __init__(self, model, chunks, cache_bytes=CACHE_BYTES):
        self.model, self.chunks, self.cache, self.cache_bytes = model, chunks, {}, cache_bytes

    def __call__(self, index):
        found = self.cache.get(index)
        if found is not None:
            return found
        logp = nn.log_softmax(self.model(mx.array([self.chunks[index]]))[0].astype(mx.float32), axis=-1)
        mx.eval(logp)
        if (len(self.cache) + 1) * logp.nbytes <= self.cache_bytes:
            self.cache[index] = logp
        return logp


def batches(n_chunks: int, batch_size: int, steps: int, seed: int):
    """steps lists of chunk indices: shuffled passes over the chunks, deterministic in seed."""
    rng = np.random.default_rng(seed)
    order = []
    while len(order) < steps * batch_size:
        order.extend(rng.permutation(n_chunks).tolist())
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def tune(model, teacher, chunks, steps: int = 40, lr: float = DEFAULT_LR, batch_size: int = 2, seed: int = 0,
         progress: bool = True, cache_bytes: float = CACHE_BYTES) -> dict:
    """Tune the scales and biases of ``model``'s quantized layers, in place, so that its
    next-token distribution matches ``teacher`` (the float model) on ``chunks`` (lists
    of token ids, calibration text: never the text the result is judged on). Codes and
    every other parameter stay as they are. Returns stats: the loss (mean KL on the
    batch) at the first step and averaged over the last tenth of the steps, time, peak
    memory and the settings."""
    layers = quantized_layers(model)
    trained = {p for p, _ in tunable_layers(model)}
    if not trained or steps <= 0:
        return {"steps": 0, "tensors": 0}
    lengths = {len(c) for c in chunks}
    if len(lengths) != 1:
        raise ValueError(f"tuning needs chunks of one length (got {sorted(lengths)})")
    mx.random.seed(seed)
    teacher_logp = Teacher(teacher, chunks, cache_bytes)
    plan = batches(len(chunks), min(batch_size, len(chunks)), steps, seed)
    t0 = time.perf_counter()
    losses = []
    with running_in_float32(model), stand_ins(model, layers) as subs:
        # the trainable numbers as their own tree: nothing else of the model is touched,
        # not even its frozen/trainable flags
        subs = [s for (p, _), s in zip(layers, subs) if p in trained]
        params = {str(i): {"scales": s.scales, "biases": s.biases} for i, s in enumerate(subs)}
        trainable = sum(v.size for p in params.values() for v in p.values())
        optimizer = optim.Adam(learning_rate=optim.cosine_decay(lr, steps, lr / 20))

        def put(params):
            for i, sub in enumerate(subs):
                sub.scales, sub.biases = params[str(i)]["scales"], params[str(i)]["biases"]

        def loss_fn(params, x, target):
            put(params)
            return kl_loss(model(x), target)

        step_fn = mx.value_and_grad(loss_fn)
        bar = tqdm(plan, desc="tuning scales/biases", unit="step", disable=not progress)
        for idx in bar:
            target = mx.stack([teacher_logp(i) for i in idx])
            x = mx.array([chunks[i] for i in idx])
            loss, grads = step_fn(params, x, target)
            params = optimizer.apply_gradients(grads, params)
            mx.eval(loss, params, optimizer.state)
            losses.append(loss.item())
            bar.set_postfix(kl=f"{losses[-1]:.3f}")
        put(params)
    tail = losses[-max(1, steps // 10):]
    return {"steps": steps, "lr": lr, "batch_size": len(plan[0]), "seed": seed, "chunks": len(chunks),
            "chunk_tokens": len(chunks[0]), "tensors": len(trained), "trainable": trainable,
            "kl_first": losses[0], "kl_last": sum(tail) / len(tail), "seconds": time.perf_counter() - t0,
            "mlx_peak_gb": mx.get_peak_memory() / 1e9}
