"""Host time per launch of each way to run one small quantized GEMV on the GPU.

At decode a Llama-3-8B-shaped model runs ~25 ops per layer, each a few microseconds of
GPU work, so the host's work per op (building the graph in Python, then MLX's eval
of each node) decides tokens/s. This chains LAUNCHES dependent launches of a 512x512
4-bit GEMV (GPU time ~2 us each) and reports per launch: the time to build the graph
and the time mx.eval then takes. GPU only. Writes JSON to argv[1] if given.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlx.core as mx  # noqa: E402

from jang import kernels  # noqa: E402
from jang.kernels import dialect, gpu  # noqa: E402
from jang.layers import QuantizedLinear, adopt  # noqa: E402

LAUNCHES = 400
N = K = 512


def per_launch(step, x0, repeats=7):
    """(build us, eval us) per launch, each the median over repeats."""
    builds, evals = [], []
    for _ in range(repeats + 1):
        mx.synchronize()
        t0 = time.perf_counter()
        v = x0
        for _ in range(LAUNCHES):
            v = step(v)
        t1 = time.perf_counter()
        mx.eval(v)
        mx.synchronize()
        t2 = time.perf_counter()
        builds.append((t1 - t0) / LAUNCHES * 1e6)
        evals.append((t2 - t1) / LAUNCHES * 1e6)
    builds, evals = sorted(builds[1:]), sorted(evals[1:])
    return builds[len(builds) // 2], evals[len(evals) // 2]


def unminified_qmv():
    """The GEMV kernel built the way it was before sources were minified and cut."""
    body = dialect.translate(dialect.body("qmv"), "cuda")
    return mx.fast.cuda_kernel(name="jang_qmv_full", input_names=["x", "w", "scales", "biases"],
                               output_names=["out"], source=body, header=dialect.header("cuda"))


def main():
    import mlx.nn as nn

    mx.random.seed(0)
    lin = nn.QuantizedLinear(K, N, bias=False, group_size=64, bits=4)
    lin.set_dtype(mx.float16)
    w, s, b = lin.weight, lin.scales, lin.biases
    x0 = mx.random.normal((1, K)).astype(mx.float16)
    mx.eval(w, s, b, x0)
    jl = adopt(lin)
    assert isinstance(jl, QuantizedLinear)

    kern, template, grid, tg = gpu._qmv_launch(1, (N,), 4, 64, mx.float16, **gpu.QMV)
    full = unminified_qmv()
    trivial = mx.fast.cuda_kernel(name="jang_trivial", input_names=["x"], output_names=["out"],
                                  source="const int i = threadIdx.x + blockIdx.x * blockDim.x;\n"
                                         "if (i < 512) out[i] = x[i];")

    def raw(k):
        return lambda v: k(inputs=[v, w, s, b], template=template, grid=grid, threadgroup=tg,
                           output_shapes=[v.shape], output_dtypes=[v.dtype])[0]

    one_qmv = lambda v: gpu.qmv(v, w, s, b, 64, 4)  # noqa: E731
    eight = mx.compile(lambda v: _repeat(one_qmv, v, 8))
    eight_mlx = mx.compile(lambda v: _repeat(lambda u: mx.quantized_matmul(u, w, s, b, True, 64, 4), v, 8))
    variants = {
        "mx.add (baseline MLX op)": lambda v: v + 1,
        "mx.quantized_matmul": lambda v: mx.quantized_matmul(v, w, s, b, transpose=True, group_size=64, bits=4),
        "mlx-lm QuantizedLinear.__call__": lin,
        "cuda_kernel, 1-line source": lambda v: trivial(inputs=[v], template=[], grid=(512, 1, 1),
                                                       threadgroup=(256, 1, 1), output_shapes=[v.shape],
                                                       output_dtypes=[v.dtype])[0],
        "JANG qmv kernel, full source (before)": raw(full),
        "JANG qmv kernel, minified source": raw(kern),
        "jang gpu.qmv()": one_qmv,
        "jang kernels.quantized_matmul (qmv route)": lambda v: kernels.quantized_matmul(v, w, s, b, 64, 4),
        "JANG QuantizedLinear.__call__ (qmv route)": jl,
        "mx.compile(gpu.qmv)": mx.compile(one_qmv),
        "mx.compile(8 x gpu.qmv) / 8": None,
        "mx.compile(8 x mx.quantized_matmul) / 8": None,
    }
    kernels.ROUTES["cuda"]["qmv"] = True
    saved = gpu.FUSED_MIN_WEIGHTS
    gpu.FUSED_MIN_WEIGHTS = 0
    rows = []
    for name, step in variants.items():
        if name.startswith("mx.compile(8"):
            f = eight if "qmv" in name else eight_mlx
            bu, ev = per_launch(f, x0)
            bu, ev = bu / 8, ev / 8
        else:
            bu, ev = per_launch(step, x0)
        rows.append({"variant": name, "build_us": bu, "eval_us": ev, "total_us": bu + ev})
        print(f"{name:45s} build {bu:6.2f} us  eval {ev:6.2f} us  total {bu + ev:6.2f} us", flush=True)
    gpu.FUSED_MIN_WEIGHTS = saved
    out = {"device": _device(), "mlx": mx.__version__, "launches": LAUNCHES, "shape": [N, K], "rows": rows}
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(out, indent=1))


def _repeat(f, v, n):
    for _ in range(n):
        v = f(v)
    return v


def _device():
    from jang.bench_kernels import device_name

    return device_name()


if __name__ == "__main__":
    main()
