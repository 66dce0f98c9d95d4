"""Probe: what chaining costs on the GPU (jang/kernels/chain.py), kernel by kernel.

In session 17's decode profile of the 8B shape, a chain of down + q/k/v + attention +
o_proj took 40.4 us per layer against 36.7 us for the four launches apart, and q/k/v +
attention + o_proj 27.5 against 23.9 (this probe then put it at ~0.85 us per kernel). This
times one layer's four launches (down + residual, q/k/v + norm + RoPE, the step's
attention, o_proj + residual; 4 bits, group 64, fp16, weights cold) grouped in every
way that separates the candidates: each launch alone, each alone but as a chain of one
(the ticket and the counts, nothing to wait for), pairs, and all four. GPU time per
layer: the sum of its kernels in a chain of 64 dependent layers, best of 3.
GPU only; writes $OUT/chain_probe.json.

    python scripts/chain_probe.py [context]
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlx.core as mx  # noqa: E402

from jang import bench_kernels as bk  # noqa: E402
from jang.kernels import chain, gpu  # noqa: E402

GS, BITS, DTYPE = 64, 4, mx.float16
H, I, HQ, HKV, D = 4096, 14336, 32, 8, 128
# how the layer's four launches are grouped: a group of one is a plain launch, unless
# starred (a chain of one)
GROUPINGS = {"apart": (1, 1, 1, 1), "each a chain of one": ("1*", "1*", "1*", "1*"), "down + qkv": (2, 1, 1),
             "attention + o_proj": (1, 1, 2), "qkv + attention": (1, 2, 1), "qkv + attention + o_proj": (1, 3),
             "all four": (4,)}


def run_grouped(fn, sizes):
    """fn()'s recorded launches run in groups of these sizes (see GROUPINGS)."""
    with chain.recording() as rec:
        result = fn()
    at = 0
    for index, size in enumerate(sizes):
        group = rec.launches[at:at + int(str(size).rstrip("*"))]
        at += len(group)
        if size == 1:
            chain.launch_alone(group[0])
        else:
            chain.launch_chain(group, ("probe", index))
    return chain.resolve(result)


def main():
    context = int(sys.argv[1]) if len(sys.argv) > 1 else 560
    capacity = -(-context // 256) * 256 + 256
    one = tuple(a for n, k in ((H, I), (HQ * D, H), (HKV * D, H), (HKV * D, H), (H, HQ * D))
                for a in bk._random_quantized(n, k, GS, BITS, DTYPE))
    sets = bk._rotating(one)
    sets = [tuple(s[3 * i:3 * i + 3] for i in range(5)) for s in sets]
    mid = mx.random.normal((1, 1, I)).astype(DTYPE)
    nw = (1 + 0.1 * mx.random.normal((H,))).astype(DTYPE)
    buf = mx.random.normal((64, HKV, capacity, D)).astype(DTYPE)
    x = mx.random.normal((1, 1, H)).astype(DTYPE)
    mx.eval(mid, nw, buf, x)
    pos = gpu.position(context - 1)
    rope = (gpu.rope_inv_freq(D, 500000.0), pos, D, False)
    mx.eval(rope[0])

    def layer(h, s):
        down, q, k, v, o = s
        h = gpu.qmv_tc(mid, *down, GS, BITS, resid=h)
        qq, pair = gpu.qmv_tc_multi(h, (q, k, v), GS, BITS, norm=(nw, 1e-5), rope=rope,
                                    shapes=[(1, HQ, 1, D), (2, HKV, 1, D)], kv_pair=True)
        return gpu.qmv_tc(gpu.attention_decode(qq, buf, None, 0.088, pos=pos, step=(pair, 2)), *o, GS, BITS, resid=h)

    rows = []
    for _ in range(2):  # twice, alternating: the second pass's spread is the noise
        for name, sizes in GROUPINGS.items():
            op = mx.compile(lambda h, s, sizes=sizes: run_grouped(lambda: layer(h, s), sizes))
            us, wall, names = bk.chain_time(op, x, sets)
            rows.append({"grouping": name, "sizes": [str(s) for s in sizes], "gpu_us": round(us, 2),
                         "wall_us": round(wall, 2), "kernels": names})
            print(f"{name:28s} GPU {us:7.2f} us per layer  ({', '.join(f'{v:.1f}' for v in names.values())})",
                  flush=True)
    out = Path(os.environ.get("OUT", ".")) / "chain_probe.json"
    out.write_text(json.dumps({"device": bk.device_name(), "mlx": mx.__version__, "context": context,
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
