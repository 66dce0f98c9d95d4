"""The tensor-core GEMV's launch-shape sweep and parity checks, on a CUDA GPU
(docs/kernels.md, "The tensor-core GEMV"): chained GPU time of 8192x8192 GEMVs for
MLX's quantized_matmul, the CUDA-core kernel and qmv_tc at several RT / KS / options,
then qmv_tc against the fp32 reference. Writes $OUT/probe_tc.json (or /tmp).

    python scripts/qmv_tc_sweep.py                 # RT / KS with and without stream
    python scripts/qmv_tc_sweep.py --configs '{"4": [{"RT": 1, "KS": 4, "stream": false}], "2:bf16": [...]}'
"""
import argparse, json, os, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlx.core as mx
from jang.kernels import gpu, reference
from jang import bench_kernels as bk

out_dir = os.environ.get("OUT", "/tmp")
res = {"parity": [], "timing": []}

def ref(x, wq, s, b, gs, bits):
    w = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=gs, bits=bits)
    return x.astype(mx.float32) @ w.T

def rel(o, r):
    o = o.astype(mx.float32)
    return (mx.linalg.norm((o - r).reshape(-1)) / mx.linalg.norm(r.reshape(-1))).item()

chain_time = bk.chain_time

ap = argparse.ArgumentParser()
ap.add_argument("--configs", help="JSON {\"BITS\" or \"BITS:bf16\": [qmv_tc config, ...]} instead of SWEEP")
args = ap.parse_args()
SWEEP = [{"RT": RT, "KS": KS, "MT": 1, "stream": stream}
            for RT, KS in ((1, 4), (1, 8), (1, 16), (2, 4), (2, 8)) for stream in (False, True)]
DTYPES = {"fp16": mx.float16, "bf16": mx.bfloat16}
# keys "BITS" or "BITS:bf16"
configs = ({(int(k.split(":")[0]), DTYPES[(k.split(":") + ["fp16"])[1]]): cs for k, cs in json.loads(args.configs).items()}
           if args.configs else {(4, mx.float16): SWEEP, (2, mx.float16): SWEEP})

PARITY = [{"RT": 1, "KS": 4, "MT": 2, "stream": False}, {"RT": 1, "KS": 4, "MT": 2},
          {"RT": 2, "KS": 2, "MT": 2, "CH": 4}]

def name_of(cfg):
    return "tc " + " ".join(f"{k}{int(v) if isinstance(v, bool) else v}" for k, v in cfg.items())

copy = bk.copy_bandwidth() / 1e9
print("copy GB/s", round(copy))
res["copy_GBps"] = copy
N = K = 8192
for bits, dt in configs:
    sets = bk._rotating(bk._random_quantized(N, K, 64, bits, dt))
    nbytes = bk._nbytes(*sets[0]) + K * 2 + N * 2
    x = mx.random.normal((1, K)).astype(dt)
    rows = []
    rows.append(("mlx",) + chain_time(lambda v, s: reference.quantized_matmul(v, *s, 64, bits), x, sets))
    R = 4 if bits == 4 else 2
    rows.append((f"old R{R}",) + chain_time(lambda v, s: gpu.qmv(v, *s, 64, bits, {"R": R}), x, sets))
    for cfg in configs[bits, dt]:
        cfg = {"MT": 1, **cfg}
        rows.append((name_of(cfg),) + chain_time(lambda v, s: gpu.qmv_tc(v, *s, 64, bits, cfg), x, sets))
        print(rows[-1][:3], flush=True)
    for name, g, w, names in rows:
        line = f"{str(dt).split('.')[-1]} {bits}bit {name:14s} gpu {g:7.1f} us  {nbytes / g / 1e3:6.0f} GB/s  wall {w:7.1f}  {names}"
        print(line, flush=True)
        json.dump(res, open(os.path.join(out_dir, "probe_tc.json"), "w"), indent=1, default=str)
        res["timing"].append([str(dt), bits, name, g, nbytes / g / 1e3, w, names])
    del sets
cases = [(mx.float16, 4, 32), (mx.float16, 4, 64), (mx.float16, 4, 128), (mx.float16, 2, 64), (mx.float16, 8, 64),
         (mx.bfloat16, 4, 64), (mx.bfloat16, 2, 128)]
# 640: 10 groups of 64, a partial last run of 8; 4160: 65 groups of 64, an odd number
shapes = ((200, 640, (1,)), (384, 4096, (3,)), (96, 4160, (2,)))
for dt, bits, gs in cases:
    for (n, k, ms) in shapes:
        if k % gs:
            continue
        mx.random.seed(bits * 7 + gs)
        wq, s, b = mx.quantize(mx.random.normal((n, k)).astype(dt), group_size=gs, bits=bits)
        for m in ms:
            x = mx.random.normal((m, k)).astype(dt)
            r = ref(x, wq, s, b, gs, bits)
            # the fixed parity configs and every config timed at these bits and dtype
            timed = [c for c in configs.get((bits, dt), []) if c not in PARITY]
            for cfg in PARITY + timed:
                try:
                    e = rel(gpu.qmv_tc(x, wq, s, b, gs, bits, cfg), r)
                except Exception as ex:
                    e = repr(ex)[:200]
                res["parity"].append([str(dt), bits, gs, n, k, m, cfg, e])
                print("parity", res["parity"][-1], flush=True)
        if (bits, gs) != (4, 64): continue
        resid = mx.random.normal((1, n)).astype(dt)
        x = mx.random.normal((1, k)).astype(dt)
        e = rel(gpu.qmv_tc(x, wq, s, b, gs, bits, resid=resid), ref(x, wq, s, b, gs, bits) + resid.astype(mx.float32))
        res["parity"].append([str(dt), bits, gs, n, k, 1, "resid", e])
bad = [p for p in res["parity"] if not isinstance(p[-1], float) or p[-1] > (2e-2 if "bfloat16" in p[0] else 4e-3)]
print("parity cases", len(res["parity"]), "bad", len(bad))
for p in bad[:20]: print("BAD", p)
worst = max((p[-1] for p in res["parity"] if isinstance(p[-1], float) and p[6] != "old"), default=None)
print("worst tc err", worst)


json.dump(res, open(os.path.join(out_dir, "probe_tc.json"), "w"), indent=1, default=str)
