"""Quality against the float reference: perplexity, KL divergence, top-1 agreement."""

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import dequantize_model


def for_evaluation(model):
    """Make ``model`` fast to *evaluate* on CPU, in place: quantized layers become float
    layers holding exactly their dequantized weights (the same numbers), and everything
    runs in fp32. MLX's CPU quantized matmul runs at ~2 GFLOP/s and fp16 is slower
    still, while fp32 matmul goes through BLAS (~150 GFLOP/s with OpenBLAS preloaded).
    Speed is never measured this way; only quality."""
    dequantize_model(model)
    model.set_dtype(mx.float32)
    return model


def log_probs(model, ids, chunk: int = 256):
    """Next-token log-probabilities for ``ids`` (fp32), in chunks of ``chunk`` tokens."""
    out = []
    for start in range(0, len(ids) - 1, chunk):
        x = mx.array([ids[start: start + chunk]])
        out.append(nn.log_softmax(model(x)[0].astype(mx.float32), axis=-1))
        mx.eval(out[-1])
    return mx.concatenate(out)[: len(ids) - 1]


def next_token_stats(logp, ref_logp, ids):
    """(perplexity, mean KL(ref || model), top-1 agreement) from log_probs outputs."""
    targets = mx.array(ids[1: len(logp) + 1])
    nll = -mx.take_along_axis(logp, targets[:, None], axis=-1).mean().item()
    kl = (mx.exp(ref_logp) * (ref_logp - logp)).sum(-1).mean().item()
    top1 = (mx.argmax(logp, -1) == mx.argmax(ref_logp, -1)).mean().item()
    return math.exp(nll), kl, top1
