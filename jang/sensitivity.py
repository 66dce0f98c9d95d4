"""How much each tensor's quantization error costs the model's output, measured on
calibration text.

What is measured: the diagonal Fisher information of every weight, F = E[g^2],
where g is the gradient of log p(y | x) with y *sampled from the float model
itself*. Why it predicts KL: the KL divergence from the float model to a
perturbed one is, to second order, KL ~= 1/2 dW^T F dW (the first-order term is
zero at the float weights, and the Fisher is exactly the Hessian of that KL).
Keeping the diagonal gives, for a quantization error dW of a tensor,

    predicted KL per token = 1/2 * sum(F * dW^2)

so the same score weighs an error by how much the output distribution cares
about that weight, through every layer after it. Because labels are sampled
from the model, per-token scores have zero mean and the square of a chunk's
summed gradient is an unbiased estimate of the sum of per-token Fishers.

The table holds that score for each tensor and each candidate (bits, group)
with the RTN error; MSE and GPTQ lower the error further for every candidate.
"""

import hashlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tqdm.auto import tqdm

from .allocate import choose_group_size
from .capture import running_in_float32
from .paths import cache_dir
from .profiles import GROUP_SIZES, MLX_BITS
from .roles import PROFILE_CLASS, model_roles, quantizable_modules

CANDIDATES = tuple((b, g) for b in MLX_BITS for g in GROUP_SIZES)


def fisher_diagonal(model, chunks, seed: int = 0, progress: bool = True) -> dict:
    """path -> mean over tokens of E[g^2] for each quantizable module's weight (fp32)."""
    targets = {f"{p}.weight" for p, _ in quantizable_modules(model)}
    mx.random.seed(seed)

    def loss_fn(m, x, y):
        logits = m(x)[0].astype(mx.float32)
        return nn.losses.cross_entropy(logits, y, reduction="sum")

    grad_fn = nn.value_and_grad(model, loss_fn)
    fisher, tokens = {}, 0
    with running_in_float32(model):
        for ids in tqdm(chunks, desc="sensitivity (Fisher)", unit="chunk", disable=not progress):
            x = mx.array([ids])
            labels = mx.random.categorical(model(x)[0])  # y ~ the float model itself
            _, grads = grad_fn(model, x, labels)
            for name, g in tree_flatten(grads):
                if name in targets:
                    fisher[name] = fisher.get(name, 0) + g ** 2
            mx.eval(fisher)
            tokens += len(ids)
    return {name[: -len(".weight")]: f / tokens for name, f in fisher.items()}


def rtn_error(weight, bits: int, group_size: int):
    wq, s, b = mx.quantize(weight, group_size=group_size, bits=bits)
    return mx.dequantize(wq, s, b, group_size=group_size, bits=bits).astype(mx.float32) - weight.astype(mx.float32)


def score_table(model, fisher: dict, candidates=CANDIDATES, progress: bool = True, error=rtn_error) -> dict:
    """path -> {"<bits>:<group>": predicted KL per token} for each valid candidate, with
    error(weight, bits, group) the quantization error the prediction assumes (RTN's)."""
    roles = model_roles(model)
    table = {}
    modules = [(p, m) for p, m in quantizable_modules(model) if PROFILE_CLASS.get(roles[p]) is not None]
    for path, module in tqdm(modules, desc="scoring candidates", unit="tensor", disable=not progress):
        weight = module.weight.astype(mx.float16 if module.weight.dtype != mx.bfloat16 else mx.bfloat16)
        f = fisher[path]
        scores = {}
        for bits, group in candidates:
            if choose_group_size(weight.shape[-1], group) != group:
                continue
            # One candidate at a time: all of them in one graph held ~1 GB of fp32
            # temporaries each for Gemma's 168M-weight embedding (OOM at 20 GB).
            scores[f"{bits}:{group}"] = (0.5 * (f * error(weight, bits, group) ** 2).sum()).item()
        table[path] = scores
    return table


def cache_key(source, chunks) -> str:
    config = Path(source) / "config.json"
    stamp = config.stat().st_mtime_ns if config.exists() else None
    h = hashlib.sha1(json.dumps([str(source), stamp, chunks]).encode())
    return h.hexdigest()[:16]


def sensitivities(model, chunks, source=None, progress: bool = True) -> dict:
    """The score table for model on chunks; cached on disk when source (a path) is given,
    so a second conversion at another budget skips the measurement."""
    cache = None
    if source is not None:
        cache = cache_dir("sensitivity") / f"{cache_key(source, chunks)}.json"
        if cache.exists():
            return json.loads(cache.read_text())
    fisher = fisher_diagonal(model, chunks, progress=progress)
    table = score_table(model, fisher, progress=progress)
    if cache is not None:
        cache.write_text(json.dumps(table))
    return table
