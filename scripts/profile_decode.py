"""Where a decode step's time goes, per token, for mlx-lm and for JANG configs on a
Llama-3-8B-shaped model (random weights, full depth): host time building the graph in
Python, host time of MLX's eval (mx.eval after the build, nothing overlapping), GPU
busy time (CUPTI kernel durations through torch.profiler), CUDA kernels per token, and
the kernels that take the most GPU time per token.
The wall time per token of a pipelined decode is about max(build + encode, GPU), where
encode is the time of the async_eval call (MLX encoding each graph node for the GPU);
both are also timed inside the pipelined loop, and the graph's nodes are counted.
GPU only. Usage: profile_decode.py [out.json] [model name] [config ...]
KV_STEP=N in the environment sets mlx-lm's KVCache growth step (256; `jang bench decode`
takes "kv_step=N" in a config): MLX's CUDA SDPA decodes through cuDNN only over cache
buffers of a multiple of 256 positions, and through its own vector kernel otherwise, so
KV_STEP=320 profiles the other attention path. PROFILE_MLX_LM=0 leaves out mlx-lm's row (to
compare MLX settings read once per process, such as MLX_USE_CUDA_GRAPHS or
MLX_MAX_OPS_PER_BUFFER / MLX_MAX_MB_PER_BUFFER, or JANG_CUDA_SOURCE, one process each; the
output's mlx_env records the MLX_ and JANG_ settings)."""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlx.core as mx  # noqa: E402

from jang import bench_kernels as bk  # noqa: E402
from jang import kernels  # noqa: E402
from jang.layers import adopt_all  # noqa: E402


TOP_KERNELS = 16  # kernel names listed per config, by GPU time per token


def step(model, y, cache):
    return mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)


def graph_nodes(y) -> dict:
    """The unevaluated graph behind y, counted per primitive (every node costs host time
    when MLX evaluates it, whether or not it launches a kernel)."""
    import io
    import re

    dot = io.StringIO()
    mx.export_to_dot(dot, y)
    counts = {}
    for label in re.findall(r'label ="([^"]+)", shape=rectangle', dot.getvalue()):
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def profile(model, steps=16):
    import torch
    from mlx_lm.models.cache import make_prompt_cache
    from torch.profiler import ProfilerActivity, profile as tprofile

    cache = make_prompt_cache(model)
    y = mx.argmax(model(mx.random.randint(0, 1000, (1, 512)), cache=cache)[:, -1], axis=-1)
    for _ in range(4):
        y = step(model, y, cache)
    mx.eval(y)
    # one token at a time, nothing queued before it: the async_eval call is then pure
    # host encoding (it can only block on the GPU with more than 10 commits in flight)
    build = encode = evals = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        y = step(model, y, cache)
        t1 = time.perf_counter()
        mx.async_eval(y)
        t2 = time.perf_counter()
        mx.eval(y)
        t3 = time.perf_counter()
        build, encode, evals = build + t1 - t0, encode + t2 - t1, evals + t3 - t1
    with tprofile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            y = step(model, y, cache)
            mx.eval(y)
    kernels_run = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = sum(e.time_range.elapsed_us() for e in kernels_run) / steps
    by_name = {}
    for e in kernels_run:
        us, n = by_name.get(e.name, (0.0, 0))
        by_name[e.name] = (us + e.time_range.elapsed_us(), n + 1)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]
    # pipelined as mlx-lm's generate runs it; the host's two parts timed apart: the
    # Python build and the async_eval call (MLX encoding every node into CUDA graphs)
    pipe_build = pipe_encode = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        t1 = time.perf_counter()
        y = step(model, y, cache)
        t2 = time.perf_counter()
        mx.async_eval(y)
        t3 = time.perf_counter()
        pipe_build, pipe_encode = pipe_build + t2 - t1, pipe_encode + t3 - t2
    mx.eval(y)
    wall = (time.perf_counter() - t0) / steps
    y = step(model, y, cache)
    nodes = graph_nodes(y)
    mx.eval(y)
    return {"build_ms": build / steps * 1e3, "encode_ms": encode / steps * 1e3, "eval_ms": evals / steps * 1e3,
            "gpu_ms": gpu / 1e3,
            "kernels": len(kernels_run) / steps, "pipelined_ms": wall * 1e3, "tok_s": 1 / wall,
            "pipelined_build_ms": pipe_build / steps * 1e3, "pipelined_encode_ms": pipe_encode / steps * 1e3,
            "graph_nodes": sum(nodes.values()), "graph_nodes_by_primitive": nodes,
            "top_kernels": [{"name": name[:120], "us_per_token": us / steps, "per_token": n / steps}
                            for name, (us, n) in top]}


def profile_configs(name: str, configs) -> list:
    """mlx-lm's row, then one row per JANG config, each on a freshly built model."""
    import os

    rows = []
    if os.environ.get("PROFILE_MLX_LM", "1") != "0":
        model = bk.random_llama(name, 4)
        rows.append({"config": "mlx-lm", **profile(model)})
        print(rows[-1], flush=True)
        del model
    for config in configs:
        with kernels.enabled(op for op in config.split(",") if op):
            model = bk.random_llama(name, 4)
            adopt_all(model)
            rows.append({"config": config or "default", **profile(model)})
            del model
        print(rows[-1], flush=True)
    return rows


def main():
    import os

    from mlx_lm.models.cache import KVCache

    out = sys.argv[1] if len(sys.argv) > 1 else None
    name = sys.argv[2] if len(sys.argv) > 2 else "llama-3-8b"
    configs = sys.argv[3:] or ["", "compiled_decode", "compiled_decode,swiglu", "compiled_decode,swiglu,qmv"]
    with bk.kv_cache_step(int(os.environ["KV_STEP"]) if os.environ.get("KV_STEP") else None):
        step = KVCache.step
        rows = profile_configs(name, configs)
    if out:
        mlx_env = {k: v for k, v in os.environ.items() if k.startswith(("MLX_", "JANG_"))}
        Path(out).write_text(json.dumps({"device": bk.device_name(), "model": name, "kv_step": step,
                                         "mlx_env": mlx_env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
