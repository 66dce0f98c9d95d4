"""Python side of the fused GPU kernels: shapes, launch geometry, and which inputs
each kernel accepts. The bodies live in ``src/``; ``dialect.py`` builds them for
CUDA or Metal. Every function here computes exactly what its ``reference`` twin
computes (``tests/test_kernels_gpu.py`` checks it on every bit width, group size
and dtype).
"""

import math
from functools import lru_cache

import mlx.core as mx

from . import dialect

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
HALF = (mx.float16, mx.bfloat16)

# Launch shapes; the benchmark (jang bench kernels) sweeps these and the defaults are
# its winners on the H100 (docs/kernels.md).
QMV = {"R": 2, "U": 2, "WARPS": 4, "MT": 4}
QMM = {"WM": 2, "WN": 2, "FM": 2, "FN": 2}
QMV_MAX_M = 8  # up to this many tokens a GEMV re-reads the weights per block of MT
# Below this many weights a launch costs more on the host (MLX's per-op work) than on
# the GPU, and MLX's own op, with less host work, wins (SmolLM2-135M decode, H100).
FUSED_MIN_WEIGHTS = 1 << 22
# Dequantize + cuBLAS was measured at 512 tokens (1.8-3.2x MLX's quantized_matmul); it
# costs a full dequantization per call, so fewer tokens stay on MLX's op until measured.
DEQUANT_MIN_M = 512


def _dialect() -> str:
    return "metal" if mx.metal.is_available() else "cuda"


def in_features(w, bits) -> int:
    """The row length K of a packed weight matrix."""
    return w.shape[-1] * 32 // bits


def supports_weights(w, scales, biases, group_size, bits, mode="affine") -> bool:
    """The quantized layouts the dequant kernels read: a 2-D affine matrix with biases,
    16-bit scales, rows of whole 32-code chunks."""
    return (mode == "affine" and biases is not None and bits in BITS and group_size in GROUP_SIZES
            and scales.dtype in HALF and w.ndim == 2 and in_features(w, bits) % 32 == 0)


def supports_affine(x, w, scales, biases, group_size, bits, mode="affine", rows_any_shape=False) -> bool:
    """supports_weights, and activations of the scales' dtype that match the rows (x's
    last axis; with rows_any_shape, whole rows in any shape: the GEMVs read x flat)."""
    K = in_features(w, bits)
    return (supports_weights(w, scales, biases, group_size, bits, mode) and x.dtype == scales.dtype
            and (x.size % K == 0 if rows_any_shape else K == x.shape[-1]))


def _out_shape(x, N, resid):
    """A GEMV's output shape: the residual's, or x's with its last axis N."""
    return resid.shape if resid is not None else (*x.shape[:-1], N)


def _flat(x):
    return x.reshape(-1, x.shape[-1])


# Optional fusions of the GEMV (macros of qmv.body / swiglu.body / qmv_tc.body) and the
# inputs each one adds, in the kernel's argument order (defines are listed in that order:
# JG_MULTI's and JG_SWIGLU's weights before the norm's, the residual's and RoPE's inputs).
FUSION_INPUTS = {"JG_MULTI": ("w1", "scales1", "biases1", "w2", "scales2", "biases2"),
                 "JG_SWIGLU": ("wu", "su_", "bu_"),  # qmv_tc's up matrix (gate takes w / scales / biases)
                 "JG_NORM": ("norm_w", "eps"), "JG_RESID": ("resid",), "JG_ROPE": ("inv_freq", "offset"),
                 "JG_STEP_KV": ("kv_new", "rows"),  # attention_split's: the token's own k and v, its block's rows
                 "JG_DOWN": ("wd", "sd_", "bd_", "resid", "dsum", "counter")}  # qmv_tc's whole MLP


def _input_names(base: tuple, defines) -> tuple:
    """A kernel's input names: its own, then each define's (FUSION_INPUTS), in order."""
    return base + tuple(i for d in defines for i in FUSION_INPUTS.get(d, ()))


@lru_cache(maxsize=None)
def _scalar(value, dtype=mx.float32):
    """A number (eps, an attention scale, a block's first row) as an array the kernels
    read at index 0. Four copies, not one: MLX's CUDA backend keeps arrays of up to 8
    bytes in a managed-memory pool that stays on the host (cudaMemAdviseSetAccessedBy),
    and every kernel reading one waits on the bus; a larger one made from host values
    moves to the GPU when first read (session 10: the 4-byte eps took the q/k/v kernel's
    launch from ~12 to ~25 us)."""
    return mx.array([value] * 4, dtype)


_POSITIONS = {}  # "array": 0, 1, 2, ... in device memory, grown as needed; "at": (offset, its view)


def position(offset: int):
    """offset as a (1,) int32 array for the kernels' RoPE, made once per decode step
    (every layer asks for it; call it outside mx.compile: it may evaluate). It is a slice
    (a view, no kernel) of a positions array the GPU computed, not an mx.array(offset):
    MLX's CUDA backend keeps arrays of up to 8 bytes in managed memory that stays on the
    host, and every GPU kernel reading one waits on the bus (_scalar). Indexing,
    pos[offset], would not do: it gathers into a new 4-byte array, which lands there too."""
    at = _POSITIONS.get("at")
    if at is not None and at[0] == offset:
        return at[1]
    pos = _POSITIONS.get("array")
    if pos is None or pos.size <= offset:
        pos = _POSITIONS["array"] = mx.arange(max(4096, 2 * offset + 2), dtype=mx.int32)
        mx.eval(pos)
    view = pos[offset:offset + 1]
    _POSITIONS["at"] = (offset, view)
    return view


def _fusion_args(norm, resid):
    """(defines, extra inputs) for an optional input RMSNorm (weight, eps) and residual."""
    defines, extra = (), []
    if norm is not None:
        defines, extra = ("JG_NORM",), [norm[0], _scalar(float(norm[1]))]
    if resid is not None:
        defines, extra = defines + ("JG_RESID",), extra + [resid]
    return defines, extra


@lru_cache(maxsize=None)
def _qmv_launch(M, Ns, bits, group_size, dtype, R, U, WARPS, MT, defines=(), head_dim=0, traditional=False):
    """Kernel object, template and geometry for one GEMV shape: computed once, since at
    decode the host's per-launch work is what separates a fast kernel from a fast model.
    Ns: the rows of each weight matrix (three with JG_MULTI); head_dim, traditional:
    the RoPE of JG_ROPE."""
    mt = min(MT, M)
    template = (("T", dtype), ("BITS", bits), ("GS", group_size), ("R", R), ("MT", mt), ("U", U), ("WARPS", WARPS))
    if "JG_ROPE" in defines:
        template += (("D", head_dim), ("TRADITIONAL", traditional))
    blocks = sum(math.ceil(n / (WARPS * R)) for n in Ns)
    grid = (blocks * WARPS * 32, math.ceil(M / mt), 1)
    inputs = _input_names(("x", "w", "scales", "biases"), defines)
    kern = dialect.kernel("qmv", inputs, _outputs(defines), _dialect(), defines=defines)
    return kern, list(template), grid, (WARPS * 32, 1, 1)


def qmv(x, w, scales, biases, group_size, bits, config=None, *, norm=None, resid=None):
    """Dequant + GEMV for a few tokens: x (..., K) -> (..., N). norm=(weight, eps): x is
    RMS-normalised first; resid: added to the result (both fused into the launch), whose
    shape the output then has (x may then be rows of K in any shape: supports_affine)."""
    c = QMV if config is None else {**QMV, **config}
    N, K = w.shape[0], in_features(w, bits)
    defines, extra = _fusion_args(norm, resid)
    kern, template, grid, tg = _qmv_launch(x.size // K, (N,), bits, group_size, x.dtype,
                                           c["R"], c["U"], c["WARPS"], c["MT"], defines)
    return kern(inputs=[x, w, scales, biases, *extra], template=template, grid=grid, threadgroup=tg,
                output_shapes=[_out_shape(x, N, resid)], output_dtypes=[x.dtype])[0]


# Tensor-core GEMV (qmv_tc.body, CUDA only): the bit widths whose codes pair up into
# 16-bit floats with one and-or (see src/cuda.inc), per activation dtype.
QMV_TC_BITS = {mx.float16: (2, 4, 8), mx.bfloat16: (2, 4)}
# Launch shape (docs/kernels.md, H100 sweep of 8192x8192): 16-row tiles per warp (RT),
# warps per block sharing K (KS), tokens per block (MT), accumulator chains per tile
# (CH); per bit width where the winner differs. stream: the weights' loads bypass L1 and
# ask L2 for 256 bytes (src/cuda.inc jg_tc_load_stream).
# KS None: enough warps sharing K that the launch has ~QMV_TC_WARPS warps (the
# sweep's winners on 8192 rows, KS 4 at RT 1 and KS 8 at RT 2, are that rule); fewer
# rows would otherwise leave the GPU with too few warps to keep loads in flight.
QMV_TC = {"RT": 1, "KS": None, "MT": 2, "CH": 2, "stream": True, "MINB": 0, "WG": 1}
QMV_TC_BY_BITS = {2: {"RT": 2}}
QMV_TC_WARPS = 2048
# At most 8 warps per block: 16 warps of the 2-bit bf16 kernel failed to launch on the
# H100 ("too many resources requested for launch": registers), and the 8192x8192
# sweep never chose 16.
QMV_TC_MAX_KS = 8
QMV_TC_OPTIONS = {"stream": "JG_TC_STREAM"}  # config key -> macro
QMV_TC_MAX_M = 2  # measured at 1 and 2 tokens; more go to the CUDA-core kernel
# A plain layer call (no fusion) goes to the tensor-core GEMV from this many weights:
# there its GPU time saved (~2x MLX's) outweighs the custom launch's extra host time
# (the output head of a large vocabulary at decode: 128256 x 4096 in Llama-3-8B).
QMV_TC_ALONE_MIN_WEIGHTS = 1 << 25  # at least FUSED_MIN_WEIGHTS: kernels.quantized_matmul asks that first


# The routes take it wherever it reads the layout: it beats the CUDA-core GEMV at every bit
# width it reads. At 8 bits only since the subnormal codes (session 9: 27.5 vs 32.4 us,
# 8192x8192 fp16, H100, docs/kernels-qmv-tc-s9-3.json; session 8 had 36.0 vs 31.9).
def qmv_tc_supported(x, bits, group_size) -> bool:
    return _dialect() == "cuda" and bits in QMV_TC_BITS.get(x.dtype, ()) and group_size in GROUP_SIZES


@lru_cache(maxsize=None)
def _qmv_tc_launch(M, Ns, K, bits, group_size, dtype, RT, KS, MT, CH, defines=(), head_dim=0, traditional=False,
                   min_blocks=0, WG=1, down=None):
    """Kernel object, template and geometry of one tensor-core GEMV shape. Ns: the rows
    of each matrix (three with JG_MULTI; gate's with JG_SWIGLU, whose up doubles them).
    min_blocks: blocks per SM the registers are capped for (__launch_bounds__), 0: none.
    WG: groups of KS warps per block, each with RT tiles of its own (qmv_tc.body).
    down: (bits, group size) of JG_DOWN's down matrix."""
    mt = min(MT, M)
    runs = math.ceil(K // group_size / 8)  # runs of 8 groups: the warps of a block share them out
    per_row = 2 if "JG_SWIGLU" in defines else 1  # weight rows read per output row (gate and up)
    tiles = sum(Ns) * per_row // 16  # 16-row tiles of weights read
    if KS is None:
        KS = 1 << max(0, round(math.log2(max(1.0, QMV_TC_WARPS * RT / tiles))))
    ks = max(1, min(KS, QMV_TC_MAX_KS // WG, runs))
    template = [("T", dtype), ("BITS", bits), ("GS", group_size), ("RT", RT), ("KS", ks), ("WG", WG), ("MT", mt),
                ("CH", CH)]
    if "JG_ROPE" in defines:
        template += [("D", head_dim), ("TRADITIONAL", traditional)]
    if down is not None:
        template += [("DBITS", down[0]), ("DGS", down[1])]
    inputs = _input_names(("x", "w", "scales", "biases"), defines)
    outputs = _outputs(defines)
    smem = mt * K * 2 if "JG_NORM" in defines else 0  # the normalised x of the block's tokens
    kern = dialect.kernel("qmv_tc", inputs, outputs, "cuda", defines=defines, shared_memory=smem,
                          launch_bounds=(WG * ks * 32, min_blocks) if min_blocks else ())
    blocks = sum(math.ceil(n / (16 * WG * RT // per_row)) for n in Ns)
    return kern, template, (blocks * WG * ks * 32, math.ceil(M / mt), 1), (WG * ks * 32, 1, 1)


def _tc_config(bits, config=None, pair=False):
    """The launch config for these bits (QMV_TC, its per-bits winners, PAIR_TC for a
    paired kernel, then config) and the option macros it turns on."""
    c = {**QMV_TC, **QMV_TC_BY_BITS.get(bits, {}), **(PAIR_TC if pair else {}), **(config or {})}
    return c, tuple(d for key, d in QMV_TC_OPTIONS.items() if c.get(key))


# The fusions whose rows pair up in a block, gate's and up's of JG_SWIGLU and a RoPE
# pair's of JG_ROPE (rows i and i + D/2 of a head), hold PAIR_TILES 16-row tiles per
# block: one per group of KS warps (WG 2, RT 1: each warp reads one tile, as the plain
# GEMV does) or both on every warp (WG 1, RT 2, sessions 4-13).
PAIR_TILES = 2
PAIR_TC = {"WG": 2}
# Compiled decode puts its paired fusions on the tensor cores from this many weights per
# matrix (q's, gate's): faster at the 8B shape (gate 14336 x 4096), slower end to end on
# SmolLM2's (1536 x 576: 415 vs 446 and 483 vs 524 tok/s in two H100 runs, session 14),
# where the decode is bound by host time and the CUDA-core kernels are as fast.
PAIR_TC_MIN_WEIGHTS = FUSED_MIN_WEIGHTS


def _pair_rt(c) -> int:
    """RT of a paired kernel's config: the tiles per warp that make PAIR_TILES per block."""
    if PAIR_TILES % c["WG"]:
        raise ValueError(f"a paired kernel holds {PAIR_TILES} tiles per block: WG {c['WG']} does not divide them")
    return PAIR_TILES // c["WG"]


def qmv_tc(x, w, scales, biases, group_size, bits, config=None, *, norm=None, resid=None):
    """qmv on the tensor cores (CUDA; qmv_tc_supported): x (..., K) -> (..., N).
    norm=(weight, eps): x is RMS-normalised first; resid: added to the result."""
    c, options = _tc_config(bits, config)
    N, K = w.shape[0], in_features(w, bits)
    defines, extra = _fusion_args(norm, resid)
    kern, template, grid, tg = _qmv_tc_launch(x.size // K, (N,), K, bits, group_size, x.dtype,
                                              c["RT"], c["KS"], c["MT"], c["CH"], options + defines,
                                              min_blocks=c["MINB"], WG=c["WG"])
    return kern(inputs=[x, w, scales, biases, *extra], template=template, grid=grid, threadgroup=tg,
                output_shapes=[_out_shape(x, N, resid)], output_dtypes=[x.dtype])[0]


def swiglu_tc(x, gate, up, group_size, bits, config=None, *, norm=None):
    """swiglu on the tensor cores (CUDA; qmv_tc_supported): each block's even tiles
    read gate, its odd tiles up, for the same rows."""
    c, options = _tc_config(bits, config, pair=True)
    N, K = gate[0].shape[0], x.shape[-1]
    defines, extra = _fusion_args(norm, None)
    kern, template, grid, tg = _qmv_tc_launch(x.size // K, (N,), K, bits, group_size, x.dtype,
                                              _pair_rt(c), c["KS"], c["MT"], c["CH"],
                                              options + ("JG_SWIGLU",) + defines, min_blocks=c["MINB"], WG=c["WG"])
    return kern(inputs=[x, *gate, *up, *extra], template=template, grid=grid, threadgroup=tg,
                output_shapes=[(*x.shape[:-1], N)], output_dtypes=[x.dtype])[0]


# The whole MLP in one launch (swiglu_down_tc, qmv_tc.body's JG_DOWN): WG groups of one
# warp and one tile each, so a block holds 8 WG rows of silu(gate) * up and multiplies
# them by as many of down's columns. WG 16: 128 columns, 112 blocks of 16 warps at the
# 8B shape (14336 rows), as many warps as swiglu_tc's 896 blocks of 2, and 4096 fp32
# atomics per block. MINB 1: 512 threads, registers capped at 128.
MLP_TC = {"WG": 16, "RT": 1, "KS": 1, "MINB": 1}
MLP_DOWN_BITS = (2, 4, 8)  # the widths whose codes never straddle two words


def swiglu_down_supported(gate_rows: int, down, down_bits: int, down_group: int) -> bool:
    """Whether swiglu_down_tc covers this MLP: down (hidden, intermediate) of 2, 4 or 8
    bits, and whole blocks of intermediate rows."""
    rows = 8 * MLP_TC["WG"]
    return (down_bits in MLP_DOWN_BITS and down_group in GROUP_SIZES and gate_rows % rows == 0
            and in_features(down, down_bits) == gate_rows and rows * down_bits // 32 <= 32)


@lru_cache(maxsize=None)
def _mlp_scratch(n: int):
    """swiglu_down_tc's fp32 sums (n of them) and block count: zeros, and zero again after
    every launch (its last block resets them). Launches share them: each layer's MLP
    waits on the one before (its input is that one's output)."""
    dsum, counter = mx.zeros((max(4, n),), mx.float32), mx.zeros((4,), mx.int32)
    mx.eval(dsum, counter)
    return dsum, counter


def swiglu_down_tc(x, gate, up, down, group_size, bits, down_bits, down_group, resid, config=None, *, norm=None):
    """resid + down(silu(gate(x)) * up(x)) in one launch on the tensor cores (CUDA;
    qmv_tc_supported, swiglu_down_supported): x (..., H) -> resid's shape. gate, up and
    down are (w, scales, biases); norm=(weight, eps): x is RMS-normalised first."""
    c, options = _tc_config(bits, {**MLP_TC, **(config or {})})
    N, K = gate[0].shape[0], x.shape[-1]
    M = x.size // K
    defines, extra = _fusion_args(norm, None)
    kern, template, grid, tg = _qmv_tc_launch(M, (N,), K, bits, group_size, x.dtype, c["RT"], c["KS"], c["MT"],
                                              c["CH"], options + ("JG_SWIGLU",) + defines + ("JG_DOWN",),
                                              min_blocks=c["MINB"], WG=c["WG"], down=(down_bits, down_group))
    dsum, counter = _mlp_scratch(M * resid.shape[-1])
    return kern(inputs=[x, *gate, *up, *extra, *down, resid, dsum, counter], template=template, grid=grid,
                threadgroup=tg, output_shapes=[resid.shape], output_dtypes=[x.dtype])[0]


def multi_tc_rows_ok(mats, head_dim=None, traditional=False) -> bool:
    """Whether qmv_tc_multi can serve these matrices: whole blocks of 16 * PAIR_TILES rows
    per matrix; with RoPE whole heads, each a whole number of blocks."""
    rows = 16 * PAIR_TILES
    if head_dim is not None and (head_dim % (2 if traditional else rows) or any(m[0].shape[0] % head_dim for m in mats)):
        return False
    return all(m[0].shape[0] % rows == 0 for m in mats)


def qmv_tc_multi(x, mats, group_size, bits, config=None, *, norm=None, rope=None, shapes=None, kv_pair=False):
    """qmv_multi on the tensor cores (CUDA; qmv_tc_supported, multi_tc_rows_ok)."""
    c, options = _tc_config(bits, config, pair=True)
    Ns, K = tuple(m[0].shape[0] for m in mats), x.shape[-1]
    defines, extra = _fusion_args(norm, None)
    head_dim = traditional = 0
    if rope is not None:
        inv_freq, offset, head_dim, traditional = rope
        defines, extra = defines + ("JG_ROPE",), extra + [inv_freq, offset]
    kern, template, grid, tg = _qmv_tc_launch(x.size // K, Ns, K, bits, group_size, x.dtype, _pair_rt(c), c["KS"],
                                              c["MT"], c["CH"],
                                              options + ("JG_MULTI",) + _kv_pair_defines(mats, kv_pair) + defines,
                                              head_dim, bool(traditional), min_blocks=c["MINB"], WG=c["WG"])
    out_shapes = _multi_shapes(x, Ns, shapes, kv_pair)
    return kern(inputs=[x, *mats[0], *mats[1], *mats[2], *extra], template=template, grid=grid, threadgroup=tg,
                output_shapes=out_shapes, output_dtypes=[x.dtype] * len(out_shapes))


def multi_rows_ok(mats, head_dim=None) -> bool:
    """Whether qmv_multi can serve these three matrices: each block serves one matrix;
    with RoPE (head_dim) each warp one rotation pair of a head."""
    rows = QMV["WARPS"] * QMV["R"]
    if head_dim is not None and (QMV["R"] != 2 or head_dim % 2):
        return False
    return all(m[0].shape[0] % rows == 0 and (head_dim is None or m[0].shape[0] % head_dim == 0) for m in mats)


def _outputs(defines) -> tuple:
    """The output names of a GEMV kernel: q, k and v with JG_MULTI (k and v in one with
    JG_KV_PAIR), else one."""
    if "JG_MULTI" not in defines:
        return ("out",)
    return ("out", "out1") if "JG_KV_PAIR" in defines else ("out", "out1", "out2")


def _multi_shapes(x, Ns, shapes=None, kv_pair=False):
    """The outputs' shapes: (..., N) each, or the given shapes of as many elements
    (each output is written row-major, so (B, 1, H*D) may come out as (B, H, 1, D)).
    kv_pair: k and v as one output of both (k's rows, then v's), so shapes holds two."""
    M = x.size // x.shape[-1]
    Ns = (Ns[0], 2 * Ns[1]) if kv_pair else Ns
    if shapes is None:
        return [(*x.shape[:-1], n) if i == 0 or not kv_pair else (2, *x.shape[:-1], n // 2)
                for i, n in enumerate(Ns)]
    if [math.prod(s) for s in shapes] != [M * n for n in Ns]:
        raise ValueError(f"output shapes {shapes} do not hold {M} rows of {Ns}")
    return [tuple(s) for s in shapes]


def _kv_pair_defines(mats, kv_pair: bool) -> tuple:
    """The define that makes a q/k/v launch write k and v as one array (k's matrix and
    v's must then have one shape), or none."""
    if not kv_pair:
        return ()
    if mats[1][0].shape != mats[2][0].shape:
        raise ValueError(f"kv_pair needs k and v of one shape, not {mats[1][0].shape} and {mats[2][0].shape}")
    return ("JG_KV_PAIR",)


def qmv_multi(x, mats, group_size, bits, *, norm=None, rope=None, shapes=None, kv_pair=False):
    """Three GEMVs of one x in one launch (q, k and v): mats = three (w, scales, biases)
    of the same bits and group size -> three outputs (of ``shapes`` if given: see
    _multi_shapes); with kv_pair two, q and k + v in one array (k's rows first).
    rope=(inv_freq, offset, head_dim, traditional): q and k rotated at position offset
    (every token of x at that one position: one-token decode of a batch)."""
    c = QMV
    Ns = tuple(m[0].shape[0] for m in mats)
    defines, extra = _fusion_args(norm, None)
    head_dim = traditional = 0
    if rope is not None:
        inv_freq, offset, head_dim, traditional = rope
        defines, extra = defines + ("JG_ROPE",), extra + [inv_freq, offset]
    kern, template, grid, tg = _qmv_launch(x.size // x.shape[-1], Ns, bits, group_size, x.dtype,
                                           c["R"], c["U"], c["WARPS"], c["MT"],
                                           ("JG_MULTI",) + _kv_pair_defines(mats, kv_pair) + defines,
                                           head_dim, bool(traditional))
    out_shapes = _multi_shapes(x, Ns, shapes, kv_pair)
    return kern(inputs=[x, *mats[0], *mats[1], *mats[2], *extra], template=template, grid=grid, threadgroup=tg,
                output_shapes=out_shapes, output_dtypes=[x.dtype] * len(out_shapes))


def qmm(x, w, scales, biases, group_size, bits, config=None):
    """Dequant + GEMM on the matrix units for many tokens: x (..., K) -> (..., N)."""
    c = {**QMM, **(config or {})}
    x2 = _flat(x)
    M, N = x2.shape[0], w.shape[0]
    bm, bn, nt = c["WM"] * c["FM"] * 16, c["WN"] * c["FN"] * 16, c["WM"] * c["WN"] * 32
    k = dialect.kernel("qmm", ("x", "w", "scales", "biases"), ("out",), _dialect())
    (y,) = k(inputs=[x2, w, scales, biases],
             template=[("T", x.dtype), ("BITS", bits), ("GS", group_size)] + [(n, c[n]) for n in ("WM", "WN", "FM", "FN")],
             grid=(math.ceil(N / bn) * nt, math.ceil(M / bm), 1), threadgroup=(nt, 1, 1),
             output_shapes=[(M, N)], output_dtypes=[x.dtype])
    return y.reshape(*x.shape[:-1], N)


def qgather(ids, w, scales, biases, group_size, bits, dtype):
    """Dequantized rows ``ids`` of a quantized matrix: ids (...,) -> (..., K)."""
    flat = ids.reshape(-1)
    if flat.dtype not in (mx.int32, mx.uint32):
        flat = flat.astype(mx.int32)
    T, K = flat.shape[0], in_features(w, bits)
    k = dialect.kernel("qgather", ("ids", "w", "scales", "biases"), ("out",), _dialect())
    (y,) = k(inputs=[flat, w, scales, biases], template=[("T", dtype), ("BITS", bits), ("GS", group_size)],
             grid=(math.ceil(T * K // 32 / 256) * 256, 1, 1), threadgroup=(256, 1, 1),
             output_shapes=[(T, K)], output_dtypes=[dtype])
    return y.reshape(*ids.shape, K)


def dequant_matmul(x, w, scales, biases, group_size, bits):
    """Prefill as dequantize-then-GEMM: the dense weights go through the BLAS matmul
    (cuBLAS on CUDA), which wins once enough tokens share each weight read."""
    dense = qgather(mx.arange(w.shape[0]), w, scales, biases, group_size, bits, x.dtype)
    return x @ dense.T


@lru_cache(maxsize=None)
def _swiglu_launch(M, N, bits, group_size, dtype, warps, mt, defines=()):
    mt = min(mt, M)
    inputs = ("x", "wg", "sg_", "bg_", "wu", "su_", "bu_") + tuple(i for d in defines for i in FUSION_INPUTS[d])
    kern = dialect.kernel("swiglu", inputs, ("out",), _dialect(), defines=defines)
    template = [("T", dtype), ("BITS", bits), ("GS", group_size), ("MT", mt), ("WARPS", warps)]
    return kern, template, (math.ceil(N / warps) * warps * 32, math.ceil(M / mt), 1), (warps * 32, 1, 1)


def swiglu(x, gate, up, group_size, bits, warps=4, mt=4, *, norm=None):
    """silu(x @ Wg.T) * (x @ Wu.T) in one launch; gate and up are (w, scales, biases).
    norm=(weight, eps): x is RMS-normalised first, in the same launch."""
    N = gate[0].shape[0]
    defines, extra = _fusion_args(norm, None)
    kern, template, grid, tg = _swiglu_launch(x.size // x.shape[-1], N, bits, group_size, x.dtype, warps, mt, defines)
    return kern(inputs=[x, *gate, *up, *extra], template=template, grid=grid, threadgroup=tg,
                output_shapes=[(*x.shape[:-1], N)], output_dtypes=[x.dtype])[0]


def rope_inv_freq(dims: int, base: float, scale: float = 1.0, freqs=None):
    """Per-pair angular speeds as mx.fast.rope uses them, with the position scale folded in."""
    if freqs is not None:
        return (scale / freqs).astype(mx.float32)
    return (scale * base ** (-mx.arange(0, dims, 2, dtype=mx.float32) / dims)).astype(mx.float32)


def norm_rope(x, weight, eps, inv_freq=None, offset=0, traditional=False, warps=4):
    """x (B, L, H, D): RMSNorm over D, then (with inv_freq) RoPE at positions offset + l and
    the transpose to (B, H, L, D). Without inv_freq: a plain RMSNorm, same layout."""
    B, L, H, D = x.shape
    rope = inv_freq is not None
    inv = inv_freq if rope else mx.zeros((D // 2,), mx.float32)
    k = dialect.kernel("norm_rope", ("x", "weight", "inv_freq", "offset", "eps"), ("out",), _dialect())
    rows = B * L * H
    (y,) = k(inputs=[x, weight.astype(x.dtype), inv, position(offset), _scalar(float(eps))],
             template=[("T", x.dtype), ("D", D), ("ROPE", rope), ("TRADITIONAL", traditional), ("WARPS", warps)],
             grid=(math.ceil(rows / warps) * warps * 32, 1, 1), threadgroup=(warps * 32, 1, 1),
             output_shapes=[(B, H, L, D) if rope else (B, L, H, D)], output_dtypes=[x.dtype])
    return y


# Decode attention (attention_split, one launch): the block's warps and key rows per
# thread, by backend and G (query heads per KV head): (largest G, shape), smallest first.
# jg_red holds ROWS G D = WARPS G 256 floats (4 KB per warp and query head).
# CUDA: where G <= 4, 8 warps of 4 rows hold the same keys per block (64 at D 128) as 4
# warps of 8 rows, but each warp's chain of dependent steps is half as long: 12.5 ->
# 8.5 us per layer at 560 keys, keys cold (10.7 -> 7.9 in the L2; 8B shape, H200,
# scripts/decode_kernels_probe.py, session 15). 32 KB of jg_red, under the 48 KB of
# static shared memory a CUDA block may have.
# Metal: a threadgroup has 32 KB, so at most 16 KB of jg_red (compiled for syntax only).
# ATTENTION_SWEEP in bench_kernels times other shapes.
ATTENTION_DECODE = {"cuda": ((4, {"WARPS": 8, "PER": 4}), (8, {"WARPS": 4, "PER": 4})),
                    "metal": ((4, {"WARPS": 4, "PER": 8}), (8, {"WARPS": 2, "PER": 8}))}
ATTENTION_MAX_G = 8


def decode_shape(G) -> dict:
    """attention_split's default launch shape for G query heads per KV head."""
    return next(shape for max_g, shape in ATTENTION_DECODE[_dialect()] if G <= max_g)


def attention_decode_supported(q, k) -> bool:
    """Whether attention_decode covers these heads, head dim, dtype and keys: the last
    block merges the splits through 2 G splits floats of its ROWS G D shared ones, so at
    most ROWS D / 2 splits (on CUDA: 64k keys for G <= 4, 16k for G up to 8)."""
    B, Hq, L, D = q.shape
    if not (L == 1 and q.dtype in HALF and k.dtype == q.dtype and D % 8 == 0 and 32 % (D // 8) == 0
            and Hq % k.shape[1] == 0 and Hq // k.shape[1] <= ATTENTION_MAX_G):
        return False
    _, per, C = _decode_chunk(D, Hq // k.shape[1])
    return -(-k.shape[2] // C) <= (C // per) * D // 2  # C // per: the block's ROWS


def _decode_chunk(D, G, warps=None, per=None):
    """(warps, key rows per thread, keys per block) of attention_split; None: G's default."""
    shape = decode_shape(G)
    warps, per = warps or shape["WARPS"], per or shape["PER"]
    return warps, per, per * warps * 32 // (D // 8)


ATTENTION_INPUTS = ("q", "k", "v", "pos", "scale", "counter")  # attention_split's, before its defines' own


@lru_cache(maxsize=None)
def _attention_counter(n: int):
    """attention_split's per-(batch row, KV head) block counts: zeros, and zero again
    after every launch (its last block resets them). At least 4 ints: an array of up to
    8 bytes would live in MLX's host-side pool (_scalar). Launches share it; they run
    one after another (each layer's attention waits on the previous layer's output)."""
    counter = mx.zeros((max(4, n),), mx.int32)
    mx.eval(counter)
    return counter


def attention_decode(q, k, v, scale, length=None, pos=None, warps=None, per=None, step=None):
    """Attention of one query token, q (B, Hq, 1, D), over keys/values (B, Hkv, S, D)
    (any strides, last axis contiguous): (B, Hq, 1, D), in one launch, split over the
    keys in chunks of C (flash-decoding) with the last block merging them. Which keys
    count:
    - pos, a (1,) int32 device array holding the query's position: keys 0 .. pos;
    - else length: the first ``length`` keys; else all S.
    The launch covers all S keys whichever count (chunks past the live ones add
    nothing), so over a KV cache's whole buffer it keeps its shapes, and one trace of
    mx.compile serves every step until the buffer grows.
    step=(kv_new, row): k is the whole decode step's buffer of every block's keys and
    values, (L 2 B, Hkv, S, D), this block's keys at rows row .. row + B - 1 and its
    values at the B after them (v is ignored); the query's own key and value, not in the
    buffer yet, are kv_new's (2 B, Hkv, 1, D), keys then values."""
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if pos is None:
        pos = position((S if length is None else length) - 1)
    warps, per, C = _decode_chunk(D, G, warps, per)
    splits = -(-S // C)
    final = splits == 1
    defines = ("JG_FINAL",) * final + ("JG_STEP_KV",) * (step is not None)
    inputs = [q, k, v if step is None else k, pos, _scalar(float(scale)), _attention_counter(B * Hkv)]
    if step is not None:
        inputs += [step[0], _scalar(step[1], mx.int32)]
    kern = dialect.kernel("attention_split", _input_names(ATTENTION_INPUTS, defines),
                          ("out",) if final else ("out", "part"), _dialect(), contiguous=False, defines=defines)
    shapes, dtypes = [(B, Hq, 1, D)], [q.dtype]
    if not final:
        shapes, dtypes = shapes + [(B, Hq, splits, D + 4)], dtypes + [mx.float32]
    return kern(inputs=inputs,
                template=[("T", q.dtype), ("D", D), ("G", G), ("PER", per), ("WARPS", warps)],
                grid=(splits * warps * 32, Hkv, B), threadgroup=(warps * 32, 1, 1),
                output_shapes=shapes, output_dtypes=dtypes)[0]


def attention(q, k, v, scale, window=0, warps=4):
    """Causal GQA attention: q (B, Hq, L, D), k/v (B, Hkv, S, D), any strides -> (B, Hq, L, D)."""
    B, Hq, L, D = q.shape
    kern = dialect.kernel("attention", ("q", "k", "v", "scale"), ("out",), _dialect(), contiguous=False)
    (y,) = kern(inputs=[q, k, v, _scalar(float(scale))],
                template=[("T", q.dtype), ("D", D), ("WINDOW", window), ("WARPS", warps)],
                grid=(Hq * warps * 32, L, B), threadgroup=(warps * 32, 1, 1),
                output_shapes=[(B, Hq, L, D)], output_dtypes=[q.dtype])
    return y


# mx.concatenate's inputs in one launch: at most this many. Every thread picks its input
# by comparing its block's index with each in turn, so the chain grows with the inputs;
# 64 is the most tested (tests/test_kernels_gpu.py), and a decode step has one per layer
CONCAT_MAX_INPUTS = 64


def concatenate_supported(arrays) -> bool:
    if not 1 < len(arrays) <= CONCAT_MAX_INPUTS:
        return False
    first = arrays[0]
    return (first.ndim > 0 and 0 < len(arrays) * first.size < 2**31
            and all(a.shape == first.shape and a.dtype == first.dtype for a in arrays))


def concatenate(arrays):
    """mx.concatenate(arrays, axis=0) of arrays of one shape and dtype, in one launch
    (concat.body; see concatenate_supported)."""
    first, n = arrays[0], len(arrays)
    names = tuple(f"p{i}" for i in range(n))
    kern = dialect.kernel("concat", names, ("out",), _dialect(),
                          macros=(("JG_INPUTS", " ".join(f"JG_EACH({i}, {p})" for i, p in enumerate(names))),))
    return kern(inputs=list(arrays), template=[("T", first.dtype), ("ROW", first.size)],
                grid=(-(-first.size // 256) * 256, n, 1), threadgroup=(256, 1, 1),
                output_shapes=[(n * first.shape[0], *first.shape[1:])], output_dtypes=[first.dtype])[0]
