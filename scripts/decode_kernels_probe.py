"""Probe: each kernel of one decode block of the Llama-3-8B shape (4 bits, group 64,
fp16), timed in a chain of dependent launches with its inputs cold (rotating copies
larger than the L2, as a decode reads them) and hot (one copy, in the L2). Where hot is
much faster than cold, the kernel waits on DRAM, and data fetched into the L2 ahead of
it (by the launch before) would pay; where the two are level, it is bound by its own
work. Each op runs under mx.compile, as in the decode step, so its small constants
(eps, scale) are made once. GPU only; writes $OUT/decode_kernels_probe.json.

    python scripts/decode_kernels_probe.py [context]
"""

import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlx.core as mx  # noqa: E402

from jang import bench_kernels as bk  # noqa: E402
from jang.kernels import gpu  # noqa: E402

GS, BITS, DTYPE = 64, 4, mx.float16
H, I, HQ, HKV, D = 4096, 14336, 32, 8, 128
# the paired kernels' launch forms: the default (a warp group per tile), the old one
# (both tiles on every warp), and more warps per group
PAIR_CONFIGS = (None, {"WG": 1}, {"WG": 2, "KS": 2}, {"WG": 2, "KS": 4})


def matrices(shapes):
    """(sets, bytes of one set): copies of the (w, scales, biases) of each (rows, K) in
    shapes, as many as overflow the L2 when launches cycle through them (at least two
    for every shape here, so "hot" is one copy and "cold" all of them)."""
    one = tuple(a for n, k in shapes for a in bk._random_quantized(n, k, GS, BITS, DTYPE))
    sets = bk._rotating(one)
    return [tuple(s[3 * i:3 * i + 3] for i in range(len(shapes))) for s in sets], bk._nbytes(*one)


def main():
    context = int(sys.argv[1]) if len(sys.argv) > 1 else 560
    capacity = -(-context // 256) * 256 + 256
    rows = []

    def probe(name, op, x, sets, nbytes, compiled=False):
        """Chain op(v, set) cold (cycling through sets) and hot (the first set only);
        op is compiled here unless it compiles its own calls (compiled)."""
        for temp, use in (("cold", sets), ("hot", sets[:1])):
            us, wall, names = bk.chain_time(op if compiled else mx.compile(op), x, use)
            own = max(names.values())  # the probed kernel; reshapes/slices add copies of their own
            rows.append({"kernel": name, "inputs": temp, "gpu_us": round(us, 2), "own_us": round(own, 2),
                         "wall_us": round(wall, 2), "GB_s": round(nbytes / own / 1e3, 1), "names": names})
            print(f"{name:34s} {temp:4s} total {us:7.2f}  own {own:7.2f} us  {nbytes / own / 1e3:7.1f} GB/s",
                  flush=True)

    x = mx.random.normal((1, H)).astype(DTYPE)
    resid = mx.random.normal((1, H)).astype(DTYPE)  # not x: an array both traced input and constant fails to compile
    nw = (1 + 0.1 * mx.random.normal((H,))).astype(DTYPE)
    mx.eval(x, resid, nw)
    norm = (nw, 1e-5)
    pos = gpu.position(context - 1)
    rope = (gpu.rope_inv_freq(D, 500000.0), pos, D, False)
    mx.eval(rope[0])

    # q/k/v + norm + RoPE, k and v as one pair (the step's form)
    sets, qkv_bytes = matrices([(HQ * D, H), (HKV * D, H), (HKV * D, H)])
    shapes = [(1, HQ, 1, D), (2, HKV, 1, D)]
    probe("qkv cuda-core", lambda v, s: gpu.qmv_multi(v, s, GS, BITS, norm=norm, rope=rope, shapes=shapes,
                                                       kv_pair=True)[0].reshape(1, H), x, sets, qkv_bytes)
    for config in PAIR_CONFIGS:
        probe(f"qkv tc {config}", lambda v, s, c=config: gpu.qmv_tc_multi(
            v, s, GS, BITS, c, norm=norm, rope=rope, shapes=shapes, kv_pair=True)[0].reshape(1, H), x, sets, qkv_bytes)
    sets = None

    # attention over the step's buffer: cold = every launch another layer's rows
    buf = mx.random.normal((64, HKV, capacity, D)).astype(DTYPE)  # 32 layers' keys and values
    kv_new = mx.random.normal((2, HKV, 1, D)).astype(DTYPE)
    q = mx.random.normal((1, HQ, 1, D)).astype(DTYPE)
    mx.eval(buf, kv_new, q)
    att_bytes = 2 * HKV * context * D * 2
    # launch shapes: the default (gpu.decode_shape: 8 warps, 4 key rows per thread), the
    # default before session 15 (the same 64 keys per block over 4 warps), and twice the
    # blocks: at 560 keys the default's 9 splits x 8 KV heads are 72 blocks for 132 SMs,
    # so 8 warps of 2 or 1 rows (144 or 280 blocks; 56 and 40 registers against 72,
    # NVRTC 13.0) may fill the GPU better (session 16: not yet run)
    for label, warps, per in (("attention step default", None, None), ("attention step WARPS 4 PER 8", 4, 8),
                              ("attention step WARPS 4 PER 4", 4, 4), ("attention step WARPS 8 PER 2", 8, 2),
                              ("attention step WARPS 8 PER 1", 8, 1)):
        ops = [mx.compile(lambda v, row=row, warps=warps, per=per: gpu.attention_decode(
            v, buf, None, 1 / math.sqrt(D), pos=pos, warps=warps, per=per, step=(kv_new, row)))
            for row in range(0, 64, 2)]
        probe(label, lambda v, op: op(v), q, ops, att_bytes, compiled=True)
    buf = None

    # o_proj + residual on the tensor cores
    sets, o_bytes = matrices([(H, H)])
    probe("o_proj tc + resid", lambda v, s: gpu.qmv_tc(v, *s[0], GS, BITS, resid=resid), x, sets, o_bytes)
    sets = None

    # gate + up + SwiGLU (+ norm)
    sets, gu_bytes = matrices([(I, H), (I, H)])
    variants = (("gate/up cuda-core norm", lambda v, s: gpu.swiglu(v, *s, GS, BITS, norm=norm)),
                ("gate/up cuda-core", lambda v, s: gpu.swiglu(v, *s, GS, BITS)),
                *((f"gate/up tc norm {c}", lambda v, s, c=c: gpu.swiglu_tc(v, *s, GS, BITS, c, norm=norm))
                  for c in PAIR_CONFIGS),
                ("gate/up tc", lambda v, s: gpu.swiglu_tc(v, *s, GS, BITS)))
    for label, fn in variants:
        probe(label, lambda v, s, fn=fn: fn(v, s)[:, :H], x, sets, gu_bytes)
    sets = None
    sets, _ = matrices([(2 * I, H)])  # the same bytes as gate's and up's
    probe("qmv_tc 28672x4096 (gate/up's bytes)", lambda v, s: gpu.qmv_tc(v, *s[0], GS, BITS)[:, :H], x, sets, gu_bytes)
    sets = None

    # down + residual on the tensor cores
    sets, d_bytes = matrices([(H, I)])
    xi, pad = mx.random.normal((1, I)).astype(DTYPE), mx.random.normal((1, I - H)).astype(DTYPE)
    mx.eval(xi, pad)
    probe("down tc + resid", lambda v, s: mx.concatenate([gpu.qmv_tc(v, *s[0], GS, BITS, resid=resid), pad], 1),
          xi, sets, d_bytes)
    sets = None

    # the whole MLP (norm, gate/up, SwiGLU, down, residual): two launches (the default;
    # compare "total", both kernels) and one (swiglu_down_tc, route fused_mlp) at three
    # block sizes: 128, 64 and 32 rows of silu(gate) * up per block
    sets, mlp_bytes = matrices([(I, H), (I, H), (H, I)])
    probe("MLP two launches", lambda v, s: gpu.qmv_tc(gpu.swiglu_tc(v, s[0], s[1], GS, BITS, norm=norm), *s[2], GS,
                                                         BITS, resid=resid), x, sets, mlp_bytes)
    for wg in (16, 8, 4):
        probe(f"MLP one launch WG {wg}", lambda v, s, wg=wg: gpu.swiglu_down_tc(
            v, s[0], s[1], s[2], GS, BITS, BITS, GS, resid, {"WG": wg}, norm=norm), x, sets, mlp_bytes)
    sets = None

    out = Path(os.environ.get("OUT", "/tmp")) / "decode_kernels_probe.json"
    out.write_text(json.dumps({"device": bk.device_name(), "context": context, "capacity": capacity,
                               "copy_GB_s": round(bk.copy_bandwidth() / 1e9), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
