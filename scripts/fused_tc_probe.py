"""Probe: GPU time of each decode GEMV of the Llama-3-8B shape on the tensor cores at
several KS (warps per block sharing K), against the CUDA-core kernels and MLX's ops:
q/k/v (6144x4096) with RMSNorm and RoPE, gate + up + SwiGLU (2x14336x4096) with
RMSNorm, o_proj (4096x4096) and down_proj (4096x14336) with the residual, and the
output head (128256x4096). GPU only; prints a table and writes
$OUT/fused_tc_probe_BITS.json (or /tmp).

Launches here are queued back to back and independent (not chained), and their ranking
did not hold inside the decode (docs/kernels.md, session 5: KS 8 for gate + up and the
first run's loads overlapping the RMSNorm sum looked faster here and were slower in
scripts/profile_decode.py); decide defaults from the decode profile.

    python scripts/fused_tc_probe.py [bits]
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlx.core as mx  # noqa: E402

from jang import bench_kernels as bk  # noqa: E402
from jang.kernels import gpu, reference  # noqa: E402

GS, DTYPE = 64, mx.float16


def main():
    bits = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    rows = []

    def probe(name, make_calls, **info):
        t = bk.measure({}, "t", make_calls)
        rows.append({"case": name, "gpu_us": t * 1e6, **info})
        print(f"{name:40s} {t * 1e6:8.1f} us", flush=True)

    def matrices(shapes):
        sets = bk._rotating(tuple(a for n, k in shapes for a in bk._random_quantized(n, k, GS, bits, DTYPE)))
        return [tuple(s[3 * i:3 * i + 3] for i in range(len(shapes))) for s in sets]

    x = mx.random.normal((1, 4096)).astype(DTYPE)
    nw = (1 + 0.1 * mx.random.normal((4096,))).astype(DTYPE)
    norm = (nw, 1e-5)
    rope = (gpu.rope_inv_freq(128, 500000.0), mx.array(300, mx.int32), 128, False)
    mx.eval(x, nw, *rope[:2])

    sets = matrices([(4096, 4096), (1024, 4096), (1024, 4096)])
    probe("qkv: mlx", lambda: [lambda s=s: [reference.quantized_matmul(x, *m, GS, bits) for m in s] for s in sets])
    probe("qkv: cuda-core norm rope", lambda: [lambda s=s: gpu.qmv_multi(x, s, GS, bits, norm=norm, rope=rope) for s in sets])
    for ks in (None, 2, 4, 8):
        probe(f"qkv: tc norm rope KS{ks}", lambda: [lambda s=s: gpu.qmv_tc_multi(x, s, GS, bits, {"KS": ks}, norm=norm, rope=rope)
                                                     for s in sets], KS=ks)
    sets = matrices([(14336, 4096), (14336, 4096)])
    probe("swiglu: cuda-core norm", lambda: [lambda s=s: gpu.swiglu(x, *s, GS, bits, norm=norm) for s in sets])
    for ks in (None, 2, 4, 8):
        probe(f"swiglu: tc norm KS{ks}", lambda: [lambda s=s: gpu.swiglu_tc(x, *s, GS, bits, {"KS": ks}, norm=norm)
                                                   for s in sets], KS=ks)
    for name, n, k in (("o_proj", 4096, 4096), ("down", 4096, 14336), ("head", 128256, 4096)):
        sets = matrices([(n, k)])
        xk = mx.random.normal((1, k)).astype(DTYPE)
        resid = None if name == "head" else mx.random.normal((1, n)).astype(DTYPE)
        probe(f"{name}: mlx", lambda: [lambda s=s: reference.quantized_matmul(xk, *s[0], GS, bits) for s in sets])
        probe(f"{name}: cuda-core", lambda: [lambda s=s: gpu.qmv(xk, *s[0], GS, bits, resid=resid) for s in sets])
        for ks in (None, 1, 2, 4, 8):
            probe(f"{name}: tc KS{ks}", lambda: [lambda s=s: gpu.qmv_tc(xk, *s[0], GS, bits, {"KS": ks}, resid=resid)
                                                  for s in sets], KS=ks)
        sets = None  # frees this shape's copies before the next
    out = Path(os.environ.get("OUT", "/tmp")) / f"fused_tc_probe_{bits}.json"
    out.write_text(json.dumps({"device": bk.device_name(), "bits": bits, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
