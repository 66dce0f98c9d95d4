"""Where a decode step's GPU time goes: top CUDA kernels of a few decode steps of a
Llama-3-8B-shaped model (fewer layers; per-layer shapes are the model's), mlx-lm's ops
vs JANG's kernels, from CUPTI through torch.profiler. GPU only."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlx.core as mx  # noqa: E402

from jang import bench_kernels as bk  # noqa: E402
from jang.layers import adopt_all  # noqa: E402


def profile_steps(model, steps=8):
    import torch
    from torch.profiler import ProfilerActivity, profile
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    y = mx.argmax(model(mx.random.randint(0, 1000, (1, 64)), cache=cache)[:, -1], axis=-1)
    for _ in range(3):
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
    mx.eval(y)
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
            mx.eval(y)
    totals = {}
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = totals.setdefault(e.name[:90], [0, 0.0])
            t[0] += 1
            t[1] += e.time_range.elapsed_us()
    total = sum(v[1] for v in totals.values())
    print(f"  GPU time per step {total / steps:.0f} µs")
    for name, (n, us) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"  {us / steps:8.1f} µs/step {n / steps:5.1f}x  {name}")


bk.DECODE_MODELS["llama-3-8b-4l"] = {**bk.DECODE_MODELS["llama-3-8b"], "num_hidden_layers": 4}
model = bk.random_llama("llama-3-8b-4l", 4)
os.environ["JANG_KERNELS"] = "reference"
print("mlx-lm ops:")
profile_steps(model)
adopt_all(model)
os.environ.pop("JANG_KERNELS")
print("JANG kernels:")
profile_steps(model)
