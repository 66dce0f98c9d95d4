"""The host side of a decode step of the 8B shape, by CUDA runtime API call: CUPTI's
records of the calls MLX makes while encoding (cudaGraphLaunch, cudaGraphExecUpdate,
cudaGraphAddKernelNode, events, ...), through torch.profiler with CPU activities, per
token, for a serial loop (one token at a time) and a pipelined one (as mlx-lm's
generate runs it). Driver API calls (cuGraphAddKernelNode, which MLX's custom kernels
use) are not among them. Profiling slows the host (~0.4 ms per token here).
GPU only. Usage: host_api_profile.py [default | mlx-lm]; writes $OUT/host-<name>.json."""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlx.core as mx  # noqa: E402

from jang import bench_kernels as bk  # noqa: E402
from jang.layers import adopt_all  # noqa: E402

TOKENS = 32
TOP = 25


def api_calls(prof) -> dict:
    """Host-side events (the CUDA API calls) by name: (total us, count)."""
    import torch

    by = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            us, n = by.get(e.name, (0.0, 0))
            by[e.name] = (us + e.time_range.elapsed_us(), n + 1)
    return by


def main():
    from mlx_lm.models.cache import make_prompt_cache
    from torch.profiler import ProfilerActivity, profile

    name = sys.argv[1] if len(sys.argv) > 1 else "default"
    model = bk.random_llama("llama-3-8b", 4)
    if name != "mlx-lm":
        adopt_all(model)
    cache = make_prompt_cache(model)

    def step(y):
        return mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)

    y = mx.argmax(model(mx.random.randint(0, 1000, (1, 512)), cache=cache)[:, -1], axis=-1)
    for _ in range(8):
        y = step(y)
    mx.eval(y)
    result = {"device": bk.device_name(), "config": name}
    for mode in ("serial", "pipelined"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            encode = 0.0
            for _ in range(TOKENS):
                y = step(y)
                t1 = time.perf_counter()
                mx.async_eval(y)
                encode += time.perf_counter() - t1
                if mode == "serial":
                    mx.eval(y)
            mx.eval(y)
            wall = (time.perf_counter() - t0) / TOKENS
        top = sorted(api_calls(prof).items(), key=lambda kv: -kv[1][0])[:TOP]
        result[mode] = {"wall_ms": wall * 1e3, "encode_ms": encode / TOKENS * 1e3,
                        "api": [{"name": k[:80], "us_per_token": round(us / TOKENS, 1), "per_token": n / TOKENS}
                                for k, (us, n) in top]}
        print(mode, f"{wall * 1e3:.3f} ms per token, async_eval {encode / TOKENS * 1e3:.3f} ms")
        for row in result[mode]["api"]:
            print(f"   {row['name'][:60]:60s} {row['us_per_token']:8.1f} us  x{row['per_token']:.2f}")
    out = Path(os.environ.get("OUT", "/tmp")) / f"host-{name}.json"
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
