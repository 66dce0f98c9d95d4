"""Compile every CUDA kernel body with NVRTC on a machine without a GPU, the way MLX's
mx.fast.cuda_kernel would (same generated signature, sm_90a), to catch errors before
spending GPU time. Needs NVRTC + CUDA headers + MLX's device headers:

    NVRTC_ROOT=/path/with/nvidia/cu13  MLX_INC=/path/with/mlx/backend/cuda/device  python scripts/nvrtc_check.py

Not part of CI (the NVRTC wheel is ~60 MB); the GPU tests are the real check.
"""

import ctypes
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jang.kernels import dialect, metal_export  # noqa: E402

ROOT = Path(os.environ.get("NVRTC_ROOT", "/tmp/nvrtc/ex/nvidia/cu13"))
MLX_INC = os.environ.get("MLX_INC", "/tmp/nvrtc/mlxinc")
CCCL = ROOT / "include" / "cccl"

# kernel -> (inputs with (type, ndim), template)
KERNELS = {
    "qmv": ([("x", "__half"), ("w", "uint32_t"), ("scales", "__half"), ("biases", "__half")],
            "using T = __half; constexpr int BITS = 3; constexpr int GS = 64; constexpr int R = 2; "
            "constexpr int MT = 2; constexpr int U = 2; constexpr int WARPS = 4;"),
    "qmv_tc": ([("x", "__half"), ("w", "uint32_t"), ("scales", "__half"), ("biases", "__half")],
               "using T = __half; constexpr int BITS = 4; constexpr int GS = 64; constexpr int RT = 2; "
               "constexpr int KS = 4; constexpr int MT = 1; constexpr int CH = 4;"),
    "qmv_tc_bf16_2bit": ([("x", "__nv_bfloat16"), ("w", "uint32_t"), ("scales", "__nv_bfloat16"), ("biases", "__nv_bfloat16")],
                         "using T = __nv_bfloat16; constexpr int BITS = 2; constexpr int GS = 128; constexpr int RT = 1; "
                         "constexpr int KS = 8; constexpr int MT = 2; constexpr int CH = 2;"),
    "qmm": ([("x", "__nv_bfloat16"), ("w", "uint32_t"), ("scales", "__nv_bfloat16"), ("biases", "__nv_bfloat16")],
            "using T = __nv_bfloat16; constexpr int BITS = 5; constexpr int GS = 32; constexpr int WM = 2; "
            "constexpr int WN = 2; constexpr int FM = 2; constexpr int FN = 2;"),
    "swiglu": ([("x", "__half"), ("wg", "uint32_t"), ("sg_", "__half"), ("bg_", "__half"), ("wu", "uint32_t"),
                ("su_", "__half"), ("bu_", "__half")],
               "using T = __half; constexpr int BITS = 4; constexpr int GS = 64; constexpr int MT = 1; constexpr int WARPS = 4;"),
    "qgather": ([("ids", "uint32_t"), ("w", "uint32_t"), ("scales", "__half"), ("biases", "__half")],
                "using T = __half; constexpr int BITS = 6; constexpr int GS = 128;"),
    "norm_rope": ([("x", "__half"), ("weight", "__half"), ("inv_freq", "float"), ("offset", "int32_t"), ("eps", "float")],
                  "using T = __half; constexpr int D = 128; constexpr bool ROPE = true; constexpr bool TRADITIONAL = false; "
                  "constexpr int WARPS = 4;"),
    "attention": ([("q", "__half"), ("k", "__half"), ("v", "__half"), ("scale", "float")],
                  "using T = __half; constexpr int D = 128; constexpr int WINDOW = 0; constexpr int WARPS = 4;"),
}

# the fused decode variants, as metal_export lists them, with CUDA's type names
_CUDA_TYPE = {"half": "__half", "int": "int32_t"}
VARIANTS = {name: (body, defines, [(n, _CUDA_TYPE.get(t, t)) for n, t in extra_in], extra_out)
            for name, (body, defines, extra_in, extra_out) in metal_export.VARIANTS.items()}

# the tensor-core GEMV's fusions (CUDA only, so not in metal_export)
_H = "__half"
_MULTI_IN = [(n, t) for i in "12" for n, t in ((f"w{i}", "uint32_t"), (f"scales{i}", _H), (f"biases{i}", _H))]
_NORM_IN = [("norm_w", _H), ("eps", "float")]
VARIANTS.update({
    "qmv_tc_norm_resid": ("qmv_tc", ("JG_TC_STREAM", "JG_NORM", "JG_RESID"), _NORM_IN + [("resid", _H)], []),
    "qmv_tc_swiglu_norm": ("qmv_tc", ("JG_SWIGLU", "JG_NORM"),
                           [("wu", "uint32_t"), ("su_", _H), ("bu_", _H)] + _NORM_IN, []),
    "qmv_tc_stream": ("qmv_tc", ("JG_TC_STREAM",), [], []),
    "qmv_tc_multi_norm_rope": ("qmv_tc", ("JG_MULTI", "JG_NORM", "JG_ROPE"),
                               _MULTI_IN + _NORM_IN + [("inv_freq", "float"), ("offset", "int32_t")], ["out1", "out2"]),
})

# more template instances of one body: name -> body
INSTANCES = {"qmv_tc_bf16_2bit": "qmv_tc"}


def source(name):
    body_name, defines, extra_in, extra_out = VARIANTS.get(name, (INSTANCES.get(name, name), (), [], []))
    inputs, template = KERNELS[name if name in KERNELS else body_name]
    if "JG_ROPE" in defines:
        template += " constexpr int D = 128; constexpr bool TRADITIONAL = false;"
    inputs = inputs + extra_in
    head, body = dialect.source(body_name, "cuda", defines)  # exactly the text MLX is handed
    args = []
    for n, t in inputs:
        args.append(f"const {t}* {n}")
        for suffix, decl in (("_shape", "const __grid_constant__ Shape"), ("_strides", "const __grid_constant__ Strides"),
                             ("_ndim", "const __grid_constant__ int")):
            if n + suffix in body:
                args.append(f"{decl} {n}{suffix}")
    out_t = "__nv_bfloat16" if "bfloat16" in inputs[0][1] else "__half"
    args += [f"{out_t}* {o}" for o in ["out", *extra_out]]
    return ('#include "mlx/backend/cuda/device/utils.cuh"\n#include <cooperative_groups.h>\n'
            + head + "namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
            + f"__global__ void custom_kernel_{name}(" + ", ".join(args) + ") {\n" + template + "\n" + body
            + "\n}\n}\n")


def compile_one(lib, name):
    src = source(name).encode()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, f"{name}.cu".encode(), 0, None, None) == 0
    opts = [b"--device-as-default-execution-space", b"--gpu-architecture=compute_90a", b"-std=c++17",
            f"--include-path={ROOT / 'include'}".encode(), f"--include-path={CCCL}".encode(),
            f"--include-path={MLX_INC}".encode()]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace").strip()
    print(f"{name}: {'ok' if rc == 0 else 'FAILED'}")
    if text:
        print(text[:4000])
    return rc == 0


def main():
    lib = ctypes.CDLL(str(ROOT / "lib" / "libnvrtc.so.13"))
    names = sys.argv[1:] or [*KERNELS, *VARIANTS]
    ok = all([compile_one(lib, n) for n in names])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
