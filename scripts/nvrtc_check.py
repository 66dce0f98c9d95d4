"""Compile every CUDA kernel body with NVRTC on a machine without a GPU, the way MLX's
mx.fast.cuda_kernel would (same generated signature, sm_90a), to catch errors before
spending GPU time. Needs NVRTC + CUDA headers + MLX's device headers:

    NVRTC_ROOT=/path/with/nvidia/cu13  MLX_INC=/path/with/mlx/backend/cuda/device  python scripts/nvrtc_check.py

With --sass it also builds each kernel for sm_90a and prints what the H100 would run:
registers per thread, local (spill) bytes, and the SASS instruction mix by opcode
(static counts, through nvdisasm), optionally with template values changed:

    NVDISASM=/path/to/nvdisasm python scripts/nvrtc_check.py --sass qmv_tc BITS=2 RT=2 KS=8
    NVDISASM=... python scripts/nvrtc_check.py --sass qmv_tc_stream BITS=2 RT=1 KS=8 LB=256,4  # __launch_bounds__

Use the NVRTC MLX's CUDA build runs with: the H100 machine has CUDA 13.0, and NVRTC
13.0.88 (`pip download --no-deps nvidia-cuda-nvrtc==13.0.88`) reproduces its code
(70 registers for session 4's 4-bit qmv_tc, as ncu reported; NVRTC 13.5 fuses an
and/or pair that 13.0 leaves as two LOP3s). nvdisasm: `nvidia-cuda-nvdisasm` wheel.
Set-up from the package index alone, except MLX's headers:

    pip download --no-deps -d whl nvidia-cuda-nvrtc==13.0.88 "nvidia-cuda-runtime==13.0.*" \
        "nvidia-cuda-cccl==13.0.*" nvidia-cuda-nvdisasm
    for w in whl/*.whl; do unzip -q -o "$w" -d root; done   # NVRTC_ROOT=root/nvidia/cu13
    # NVDISASM=root/nvidia/cu13/bin/nvdisasm (chmod +x). MLX's wheels do not ship its device
    # headers: MLX_INC is a checkout of ml-explore/mlx (git archive HEAD mlx/backend/cuda/device)

Not part of CI (the NVRTC wheel is ~60 MB); the GPU tests are the real check.
"""

import collections
import ctypes
import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jang.kernels import dialect, metal_export  # noqa: E402

ROOT = Path(os.environ.get("NVRTC_ROOT", "/tmp/nvrtc/ex/nvidia/cu13"))
MLX_INC = os.environ.get("MLX_INC", "/tmp/nvrtc/mlxinc")
CCCL = ROOT / "include" / "cccl"

# kernel -> (inputs with (type, ndim), template)
KERNELS = {
    "concat": ([("p0", "__half"), ("p1", "__half"), ("p2", "__half")], "using T = __half; constexpr int ROW = 2048;"),
    "qmv": ([("x", "__half"), ("w", "uint32_t"), ("scales", "__half"), ("biases", "__half")],
            "using T = __half; constexpr int BITS = 3; constexpr int GS = 64; constexpr int R = 2; "
            "constexpr int MT = 2; constexpr int U = 2; constexpr int WARPS = 4;"),
    "qmv_tc": ([("x", "__half"), ("w", "uint32_t"), ("scales", "__half"), ("biases", "__half")],
               "using T = __half; constexpr int BITS = 4; constexpr int GS = 64; constexpr int RT = 2; "
               "constexpr int KS = 4; constexpr int WG = 1; constexpr int MT = 1; constexpr int CH = 2;"),
    "qmv_tc_bf16_2bit": ([("x", "__nv_bfloat16"), ("w", "uint32_t"), ("scales", "__nv_bfloat16"), ("biases", "__nv_bfloat16")],
                         "using T = __nv_bfloat16; constexpr int BITS = 2; constexpr int GS = 128; constexpr int RT = 1; "
                         "constexpr int KS = 8; constexpr int WG = 1; constexpr int MT = 2; constexpr int CH = 4;"),
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
    "attention_split": ([("q", "__half"), ("k", "__half"), ("v", "__half"), ("pos", "int32_t"), ("scale", "float"),
                         ("counter", "int32_t")],
                        "using T = __half; constexpr int D = 128; constexpr int G = 4; constexpr int PER = 8; "
                        "constexpr int WARPS = 4;"),
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
    "qmv_tc_swiglu_norm_down": ("qmv_tc", ("JG_TC_STREAM", "JG_SWIGLU", "JG_NORM", "JG_DOWN"),
                                [("wu", "uint32_t"), ("su_", _H), ("bu_", _H)] + _NORM_IN
                                + [("wd", "uint32_t"), ("sd_", _H), ("bd_", _H), ("resid", _H), ("dsum", "float"),
                                   ("counter", "int32_t")], []),
    "qmv_tc_multi_norm_rope": ("qmv_tc", ("JG_MULTI", "JG_NORM", "JG_ROPE"),
                               _MULTI_IN + _NORM_IN + [("inv_freq", "float"), ("offset", "int32_t")], ["out1", "out2"]),
    "qmv_tc_multi_kv_pair_norm_rope": ("qmv_tc", ("JG_MULTI", "JG_KV_PAIR", "JG_NORM", "JG_ROPE"),
                                       _MULTI_IN + _NORM_IN + [("inv_freq", "float"), ("offset", "int32_t")], ["out1"]),
})

# more template instances of one body: name -> body
INSTANCES = {"qmv_tc_bf16_2bit": "qmv_tc"}


def source(name, launch_bounds=()):
    if name == "chain":
        return chain_source()
    body_name, defines, extra_in, extra_out = VARIANTS.get(name, (INSTANCES.get(name, name), (), [], []))
    inputs, template = KERNELS[name if name in KERNELS else body_name]
    if "JG_ROPE" in defines:
        template += " constexpr int D = 128; constexpr bool TRADITIONAL = false;"
    if "JG_DOWN" in defines:
        template += " constexpr int DBITS = 4; constexpr int DGS = 64;"
    inputs = inputs + extra_in
    head, body = dialect.source(body_name, "cuda", defines, launch_bounds, metal_export.MACROS.get(body_name, ()))
    out_t = "__nv_bfloat16" if "bfloat16" in inputs[0][1] else "__half"
    outputs = [(o, out_t) for o in ["out", *extra_out]] + list(metal_export.more_outputs(body_name, defines))
    return mlx_text(name, head, body, inputs, outputs, template)


def mlx_text(name, head, body, inputs, outputs, template=""):
    """The whole text MLX's cuda_kernel compiles for this header and body (its generated
    signature, the template values as constexpr locals)."""
    if os.environ.get("JANG_CUDA_SOURCE") != "inline":  # exactly the text MLX is handed (dialect.kernel)
        head, body = dialect.cuda_include_form(f"check_{name}", head, body, [n for n, _ in inputs])
    args = []
    for n, t in inputs:
        args.append(f"const {t}* {n}")
        for suffix, decl in (("_shape", "const __grid_constant__ Shape"), ("_strides", "const __grid_constant__ Strides"),
                             ("_ndim", "const __grid_constant__ int")):
            if n + suffix in body:
                args.append(f"{decl} {n}{suffix}")
    args += [f"{t}* {o}" for o, t in outputs]
    return ('#include "mlx/backend/cuda/device/utils.cuh"\n#include <cooperative_groups.h>\n'
            + head + "namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
            + f"__global__ void custom_kernel_{name}(" + ", ".join(args) + ") {\n" + template + "\n" + body
            + "\n}\n}\n")


def chain_source():
    """The chained launch of one decode layer of the 8B shape (chain.py): q/k/v + norm +
    RoPE, the step's attention, o_proj + residual, recorded from gpu.py's own calls."""
    import mlx.core as mx
    from jang.kernels import chain, gpu

    H, Hq, Hkv, D = 4096, 32, 8, 128
    def mat(n, k):
        return mx.quantize(mx.zeros((n, k), mx.float16), group_size=64, bits=4)
    mats, o = [mat(Hq * D, H), mat(Hkv * D, H), mat(Hkv * D, H)], mat(H, Hq * D)
    x, kv, pos = mx.zeros((1, 1, H), mx.float16), mx.zeros((4, Hkv, 768, D), mx.float16), mx.zeros((1,), mx.int32)
    with chain.recording() as rec:
        q, pair = gpu.qmv_tc_multi(x, mats, 64, 4, norm=(mx.ones((H,), mx.float16), 1e-5),
                                   rope=(gpu.rope_inv_freq(D, 5e5), pos, D, False),
                                   shapes=[(1, Hq, 1, D), (2, Hkv, 1, D)], kv_pair=True)
        gpu.qmv_tc(gpu.attention_decode(q, kv, None, 0.088, pos=pos, step=(pair, 2)), *o, 64, 4, resid=x)
    (group,) = chain.groups(rec.launches)
    external, outputs = chain.inputs_outputs(group)
    head, body, _, _ = chain.chain_text(group, external, outputs)
    inputs = [(f"jg_in{i}", chain.CUDA_TYPES[a.dtype]) for i, a in enumerate(external)] + [("jg_layout", "int32_t"), ("jg_chain", "uint64_t")]
    return mlx_text("chain", head, body, inputs, [(f"jg_out{i}", chain.CUDA_TYPES[p.dtype]) for i, p in enumerate(outputs)])


def compile_one(lib, name, template=None, cubin=False):
    """Compile kernel ``name`` (template values overridden by ``template``); with
    ``cubin`` for sm_90a and return the cubin's bytes (None on failure), else print ok /
    FAILED and return whether it compiled."""
    template = dict(template or {})
    src = source(name, tuple(int(v) for v in template.pop("LB").split(",")) if "LB" in template else ())
    for key, value in template.items():
        src, n = re.subn(rf"constexpr int {key} = \d+;", f"constexpr int {key} = {value};", src)
        if n == 0:
            raise SystemExit(f"{name} has no template value {key}")
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), f"{name}.cu".encode(), 0, None, None) == 0
    arch = b"--gpu-architecture=sm_90a" if cubin else b"--gpu-architecture=compute_90a"
    opts = [b"--device-as-default-execution-space", arch, b"-std=c++17",
            f"--include-path={ROOT / 'include'}".encode(), f"--include-path={CCCL}".encode(),
            f"--include-path={MLX_INC}".encode()]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace").strip()
    if cubin:
        if rc != 0:
            print(f"{name}: FAILED\n{text[:4000]}")
            return None
        size = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, buf)
        return buf.raw
    print(f"{name}: {'ok' if rc == 0 else 'FAILED'}")
    if text:
        print(text[:4000])
    return rc == 0


EIATTR_REGCOUNT = 0x2F  # in the cubin's .nv.info section: (format 4, attribute, size, function, count)


def cubin_facts(cubin: bytes) -> dict:
    """Registers per thread, local-memory (spill) bytes and static shared-memory bytes
    of the one kernel in an ELF cubin."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]
    facts = {"local_bytes": 0}
    for name_off, _, _, _, off, size, *_ in sections:
        name = cubin[names_at + name_off:cubin.index(b"\0", names_at + name_off)].decode()
        if name == ".nv.info":
            i = off
            while i < off + size:
                fmt, attr = cubin[i], cubin[i + 1]
                length = struct.unpack_from("<H", cubin, i + 2)[0] if fmt == 4 else 0
                if fmt == 4 and attr == EIATTR_REGCOUNT:
                    facts["registers"] = struct.unpack_from("<II", cubin, i + 4)[1]
                i += 4 + length
        elif name.startswith(".nv.local."):
            facts["local_bytes"] = size
        elif name.startswith(".nv.shared.") and not name.startswith(".nv.shared.reserved"):
            facts["shared_bytes"] = size
    return facts


def sass_mix(cubin: bytes) -> collections.Counter:
    """Static SASS instruction counts by opcode (nvdisasm from $NVDISASM or the PATH)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([os.environ.get("NVDISASM", "nvdisasm"), "-c", f.name], capture_output=True,
                              text=True, check=True).stdout
    ops = re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", text, flags=re.M)
    return collections.Counter(ops)


def main():
    for builtins in sorted((ROOT / "lib").glob("libnvrtc-builtins.so.*")):  # found without LD_LIBRARY_PATH
        ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(str(ROOT / "lib" / "libnvrtc.so.13"))
    args = sys.argv[1:]
    if args[:1] == ["--sass"]:
        names = [a for a in args[1:] if "=" not in a] or [*KERNELS, *VARIANTS]
        template = dict(a.split("=") for a in args[1:] if "=" in a)
        for name in names:
            cubin = compile_one(lib, name, template, cubin=True)
            if cubin is None:
                sys.exit(1)
            mix = sass_mix(cubin)
            print(f"{name} {template or ''}: {cubin_facts(cubin)}, {sum(mix.values())} instructions;",
                  ", ".join(f"{op} {n}" for op, n in mix.most_common(12)))
        return
    names = args or [*KERNELS, *VARIANTS, "chain"]
    ok = all([compile_one(lib, n) for n in names])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
