"""Parity of every fused kernel with the pure-MLX reference, on the GPU.

Runs where MLX has a GPU backend (CUDA or Metal) and is skipped, saying why, on a
CPU-only machine; CI has no GPU, so these ran on an H100 (see docs/kernels.md).
Each check draws fresh random inputs (never zeros) and compares with the reference
computed in fp32 by ||out - ref|| / ||ref||.
"""

import math

import mlx.core as mx
import pytest

from jang.kernels import gpu, reference

GPU = mx.metal.is_available() or mx.cuda.is_available()
pytestmark = pytest.mark.skipif(not GPU, reason="no GPU backend in this MLX build (CPU only): fused kernels cannot run")

DTYPES = (mx.float16, mx.bfloat16)
TOL = {mx.float16: 4e-3, mx.bfloat16: 2e-2}


def rel_err(out, ref) -> float:
    out, ref = out.astype(mx.float32), ref.astype(mx.float32)
    assert not mx.any(mx.isnan(out)).item(), "NaN in kernel output"
    return (mx.linalg.norm((out - ref).reshape(-1)) / mx.linalg.norm(ref.reshape(-1))).item()


def quantized(n, k, bits, gs, dtype, seed=0):
    mx.random.seed(seed)
    w = mx.random.normal((n, k)).astype(dtype)
    return mx.quantize(w, group_size=gs, bits=bits)


def reference_matmul(x, wq, s, b, gs, bits):
    """x @ dequantize(w).T in fp32 (MLX 0.32.4's own fp32 quantized matmul failed to
    launch for 2-bit, group 128 on the H100, so the oracle dequantizes first)."""
    w = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=gs, bits=bits)
    return x.astype(mx.float32) @ w.T


# every bit width x group size in fp16, every bit width in bf16 (the kernels'
# dtype handling is independent of the group size; compiling costs GPU time)
CASES = [(b, g, mx.float16) for b in gpu.BITS for g in gpu.GROUP_SIZES] + [(b, 64, mx.bfloat16) for b in gpu.BITS]


@pytest.mark.parametrize("bits,gs,dtype", CASES, ids=[f"{b}bit-g{g}-{'fp16' if d == mx.float16 else 'bf16'}" for b, g, d in CASES])
def test_qmv_and_qmm(bits, gs, dtype):
    n, k = 384, 512
    wq, s, b = quantized(n, k, bits, gs, dtype, seed=bits * 1000 + gs)
    for m in (1, 5):
        x = mx.random.normal((m, k)).astype(dtype)
        assert rel_err(gpu.qmv(x, wq, s, b, gs, bits), reference_matmul(x, wq, s, b, gs, bits)) < TOL[dtype]
    for m in (130,):
        x = mx.random.normal((m, k)).astype(dtype)
        ref = reference_matmul(x, wq, s, b, gs, bits)
        assert rel_err(gpu.qmm(x, wq, s, b, gs, bits), ref) < TOL[dtype]
        assert rel_err(gpu.dequant_matmul(x, wq, s, b, gs, bits), ref) < TOL[dtype]


@pytest.mark.parametrize("config", [{"R": 1, "U": 1, "WARPS": 8}, {"R": 4, "U": 2, "WARPS": 2}, {"R": 2, "U": 4, "WARPS": 4}])
def test_qmv_launch_shapes(config):
    """Every launch shape the benchmark sweeps computes the same thing, including a
    row count that does not divide evenly and a K with fewer chunks than lanes."""
    for n, k in ((1000, 4096), (77, 576)):
        wq, s, b = quantized(n, k, 4, 64, mx.float16)
        x = mx.random.normal((2, k)).astype(mx.float16)
        assert rel_err(gpu.qmv(x, wq, s, b, 64, 4, config), reference_matmul(x, wq, s, b, 64, 4)) < 4e-3


@pytest.mark.parametrize("config", [{"WM": 2, "WN": 4, "FM": 2, "FN": 2}, {"WM": 4, "WN": 2, "FM": 2, "FN": 4}])
def test_qmm_tile_shapes(config):
    wq, s, b = quantized(1000, 1024, 4, 64, mx.bfloat16)
    x = mx.random.normal((300, 1024)).astype(mx.bfloat16)
    assert rel_err(gpu.qmm(x, wq, s, b, 64, 4, config), reference_matmul(x, wq, s, b, 64, 4)) < 2e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", gpu.BITS)
def test_qgather(bits, dtype):
    wq, s, b = quantized(1000, 256, bits, 64, dtype)
    ids = mx.array([[3, 999, 0, 3], [500, 1, 2, 998]])
    out = gpu.qgather(ids, wq, s, b, 64, bits, dtype)
    ref = reference.embedding_lookup(ids, wq, s, b, 64, bits)
    assert out.shape == ref.shape == (2, 4, 256)
    assert rel_err(out, ref) < 1e-3  # both round the same fp32 value once


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_swiglu(bits, dtype):
    k, n = 512, 704
    gate = quantized(n, k, bits, 64, dtype, seed=1)
    up = quantized(n, k, bits, 64, dtype, seed=2)
    for m in (1, 5):
        x = mx.random.normal((m, k)).astype(dtype)
        g = reference.quantized_matmul(x, *gate, 64, bits)
        u = reference.quantized_matmul(x, *up, 64, bits)
        ref = (g.astype(mx.float32) * mx.sigmoid(g.astype(mx.float32))) * u.astype(mx.float32)
        assert rel_err(gpu.swiglu(x, gate, up, 64, bits), ref) < 3 * TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("dims", (64, 128, 256))
@pytest.mark.parametrize("traditional", (False, True))
def test_norm_rope(dims, traditional, dtype):
    B, L, H = 2, 5, 3
    x = (3 * mx.random.normal((B, L, H, dims))).astype(dtype)
    weight = (1 + 0.1 * mx.random.normal((dims,))).astype(dtype)
    for offset in (0, 37):
        ref = mx.fast.rms_norm(x, weight, 1e-6).transpose(0, 2, 1, 3)
        ref = mx.fast.rope(ref, dims, traditional=traditional, base=10000.0, scale=1.0, offset=offset)
        out = gpu.norm_rope(x, weight, 1e-6, gpu.rope_inv_freq(dims, 10000.0), offset, traditional)
        assert rel_err(out, ref) < 2 * TOL[dtype]
    plain = gpu.norm_rope(x, weight, 1e-6)
    assert rel_err(plain, mx.fast.rms_norm(x, weight, 1e-6)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("window", (0, 7))
def test_attention(window, dtype):
    B, Hq, Hkv, D, S = 2, 8, 2, 128, 50
    buf_k = mx.random.normal((B, Hkv, 64, D)).astype(dtype)  # a cache buffer; the live part is a slice
    buf_v = mx.random.normal((B, Hkv, 64, D)).astype(dtype)
    k, v = buf_k[:, :, :S], buf_v[:, :, :S]
    scale = 1 / math.sqrt(D)
    for L in (1, 6):
        q = mx.random.normal((B, L, Hq, D)).astype(dtype).transpose(0, 2, 1, 3)  # strided, as mlx-lm has it
        pos = mx.arange(S - L, S)[:, None]
        keys = mx.arange(S)[None]
        allowed = keys <= pos
        if window:
            allowed = allowed & (keys > pos - window)
        mask = mx.where(allowed, 0.0, -mx.inf).astype(mx.float32)
        up = lambda a: a.astype(mx.float32)  # noqa: E731
        ref = mx.fast.scaled_dot_product_attention(up(q), up(k), up(v), scale=scale, mask=mask)
        assert rel_err(gpu.attention(q, k, v, scale, window), ref) < TOL[dtype]


DECODE_ATTENTION = [(mx.float16, 128, 4), (mx.float16, 64, 3), (mx.float16, 256, 4), (mx.float16, 128, 8),
                    (mx.float16, 128, 1), (mx.bfloat16, 128, 4)]


# (inputs, shape of each, dtype): the 8B step's 32 KV pairs, SmolLM2's 30, and odd sizes
CONCATS = ((32, (2, 8, 1, 128), mx.float16), (30, (2, 3, 1, 64), mx.bfloat16), (2, (3, 5), mx.float32),
           (64, (1, 300), mx.float16))


@pytest.mark.parametrize("n,shape,dtype", CONCATS, ids=[f"{n}x{'x'.join(map(str, s))}" for n, s, _ in CONCATS])
def test_concatenate(n, shape, dtype):
    """The step's pairs in one launch: exactly mx.concatenate's array (a copy, no
    arithmetic), the same launch twice in a row with fresh inputs."""
    for seed in (0, 1):
        mx.random.seed(seed)
        arrays = [mx.random.normal(shape).astype(dtype) for _ in range(n)]
        assert gpu.concatenate_supported(arrays)
        out = gpu.concatenate(arrays)
        assert out.shape == (n * shape[0], *shape[1:]) and out.dtype == dtype
        assert mx.array_equal(out, mx.concatenate(arrays, axis=0)).item()


@pytest.mark.parametrize("dtype,D,G", DECODE_ATTENTION,
                         ids=[f"{'fp16' if d == mx.float16 else 'bf16'}-D{D}-G{G}" for d, D, G in DECODE_ATTENTION])
def test_attention_decode(dtype, D, G):
    """One query token over a KV cache: the whole buffer with the live length (as the
    compiled decode hands it), the whole step's buffer of two blocks' keys and values
    with the token's own key and value apart, and a slice of it (as mlx-lm's attention
    does), with the keys in one split (one launch) and in several (the merge), against
    fp32 SDPA."""
    from jang import kernels

    B, Hkv, capacity = 2, 2, 1280
    Hq = G * Hkv
    buf_k = mx.random.normal((B, Hkv, capacity, D)).astype(dtype)
    buf_v = mx.random.normal((B, Hkv, capacity, D)).astype(dtype)
    other = mx.random.normal((2 * B, Hkv, capacity, D)).astype(dtype)  # block 0's keys and values
    step_kv = mx.concatenate([other, buf_k, buf_v], axis=0)  # block 1's at rows 2 B ..
    chunk = gpu._decode_chunk(D, G)[2]
    scale = 1 / math.sqrt(D)
    up = lambda a: a.astype(mx.float32)  # noqa: E731
    for S in (1, 5, chunk - 1, chunk, chunk + 1, 3 * chunk + 7, 1200):
        q = (2 * mx.random.normal((B, 1, Hq, D))).astype(dtype).transpose(0, 2, 1, 3)  # strided, as mlx-lm has it
        k, v = buf_k[:, :, :S], buf_v[:, :, :S]
        ref = mx.fast.scaled_dot_product_attention(up(q), up(k), up(v), scale=scale)
        assert rel_err(gpu.attention_decode(q, buf_k, buf_v, scale, length=S), ref) < TOL[dtype], S
        new = mx.random.normal((2 * B, Hkv, 1, D)).astype(dtype)  # the token's own key and value
        own_k = mx.concatenate([k[:, :, :S - 1], new[:B]], axis=2)
        own_v = mx.concatenate([v[:, :, :S - 1], new[B:]], axis=2)
        own = mx.fast.scaled_dot_product_attention(up(q), up(own_k), up(own_v), scale=scale)
        out = gpu.attention_decode(q, step_kv, None, scale, pos=mx.array([S - 1], mx.int32), step=(new, 2 * B))
        assert rel_err(out, own) < TOL[dtype], S
        assert rel_err(gpu.attention_decode(q, k, v, scale), ref) < TOL[dtype], S
    assert kernels.attention(q, k, v, scale, None, op="decode_attention") is not None  # the default on CUDA
    assert kernels.attention(q, k, v, scale, None) is None  # mlx-lm's modules: opt-in (JANG_ENABLE=attention)
    with kernels.enabled(["attention"]):
        assert kernels.attention(q, k, v, scale, "causal") is None  # anything masked is MLX's


def rms_norm_ref(x, w, eps):
    x32 = x.astype(mx.float32)
    return x32 * mx.rsqrt(mx.mean(x32 * x32, axis=-1, keepdims=True) + eps) * w.astype(mx.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_qmv_fusions(bits, dtype):
    """The decode fusions: input RMSNorm, residual add, and q/k/v in one launch."""
    k = 512
    mats = [quantized(n, k, bits, 64, dtype, seed=i) for i, n in enumerate((256, 64, 64))]
    nw = (1 + 0.1 * mx.random.normal((k,))).astype(dtype)
    for m in (1, 3):
        x = mx.random.normal((m, k)).astype(dtype)
        xn = rms_norm_ref(x, nw, 1e-5)
        resid = mx.random.normal((m, 256)).astype(dtype)
        ref = reference_matmul(xn, *mats[0], 64, bits)
        assert rel_err(gpu.qmv(x, *mats[0], 64, bits, norm=(nw, 1e-5)), ref) < 2 * TOL[dtype]
        ref = resid.astype(mx.float32) + reference_matmul(x, *mats[0], 64, bits)
        assert rel_err(gpu.qmv(x, *mats[0], 64, bits, resid=resid), ref) < TOL[dtype]
        outs = gpu.qmv_multi(x, mats, 64, bits, norm=(nw, 1e-5))
        for out, mat in zip(outs, mats):
            assert out.shape == (m, mat[0].shape[0])
            assert rel_err(out, reference_matmul(xn, *mat, 64, bits)) < 2 * TOL[dtype]
        gate, up = mats[1], mats[2]
        g, u = reference_matmul(xn, *gate, 64, bits), reference_matmul(xn, *up, 64, bits)
        assert rel_err(gpu.swiglu(x, gate, up, 64, bits, norm=(nw, 1e-5)), g * mx.sigmoid(g) * u) < 3 * TOL[dtype]


# the tensor-core GEMV's layouts: every bit width it reads per dtype, every group size at 4 bits
TC_CASES = ([(4, g, mx.float16) for g in gpu.GROUP_SIZES] + [(2, 64, mx.float16), (2, 128, mx.float16), (8, 64, mx.float16)]
            + [(4, 64, mx.bfloat16), (2, 32, mx.bfloat16)])


@pytest.mark.skipif(not mx.cuda.is_available(), reason="the tensor-core GEMV is CUDA only")
@pytest.mark.parametrize("bits,gs,dtype", TC_CASES, ids=[f"{b}bit-g{g}-{'fp16' if d == mx.float16 else 'bf16'}" for b, g, d in TC_CASES])
def test_qmv_tc(bits, gs, dtype):
    """qmv_tc against the fp32 reference: rows not a multiple of the tile, K whose groups
    do not fill the last run of 8 (640 = 10 groups of 64), one and two tokens, residual."""
    assert gpu.qmv_tc_supported(mx.zeros((1, 64), dtype), bits, gs)
    for n, k, m in ((200, 640, 1), (384, 4096, 2)):
        wq, s, b = quantized(n, k, bits, gs, dtype, seed=bits * 100 + gs + n)
        x = mx.random.normal((m, k)).astype(dtype)
        ref = reference_matmul(x, wq, s, b, gs, bits)
        assert rel_err(gpu.qmv_tc(x, wq, s, b, gs, bits), ref) < TOL[dtype]
        resid = mx.random.normal((m, n)).astype(dtype)
        assert rel_err(gpu.qmv_tc(x, wq, s, b, gs, bits, resid=resid), ref + resid.astype(mx.float32)) < TOL[dtype]


TC_FUSION_CASES = [(4, mx.float16), (2, mx.float16), (8, mx.float16), (4, mx.bfloat16), (2, mx.bfloat16)]
PAIR_CONFIGS = (None, {"WG": 1}, {"WG": 2, "KS": 2})  # the paired kernels' default, both tiles per warp, 4 warps


@pytest.mark.skipif(not mx.cuda.is_available(), reason="the tensor-core GEMV is CUDA only")
@pytest.mark.parametrize("bits,dtype", TC_FUSION_CASES, ids=[f"{b}bit-{'fp16' if d == mx.float16 else 'bf16'}" for b, d in TC_FUSION_CASES])
def test_qmv_tc_fusions(bits, dtype):
    """The tensor-core decode fusions against the fp32 reference: input RMSNorm (+ the
    residual), gate + up + SwiGLU, and q/k/v in one launch, for one and two tokens; the
    paired kernels (gate + up, q/k/v) with a warp group per tile (the default) and with
    both tiles on every warp."""
    k = 640  # 10 groups of 64: the last run of 8 groups is partial
    mats = [quantized(n, k, bits, 64, dtype, seed=10 + i) for i, n in enumerate((256, 64, 96))]
    nw = (1 + 0.1 * mx.random.normal((k,))).astype(dtype)
    for m in (1, 2):
        x = (3 * mx.random.normal((m, k))).astype(dtype)  # not unit RMS: the norm must matter
        xn = rms_norm_ref(x, nw, 1e-5)
        resid = mx.random.normal((m, 256)).astype(dtype)
        ref = reference_matmul(xn, *mats[0], 64, bits)
        assert rel_err(gpu.qmv_tc(x, *mats[0], 64, bits, norm=(nw, 1e-5)), ref) < 2 * TOL[dtype]
        out = gpu.qmv_tc(x, *mats[0], 64, bits, norm=(nw, 1e-5), resid=resid)
        assert rel_err(out, ref + resid.astype(mx.float32)) < 2 * TOL[dtype]
        gate, up = mats[0], quantized(256, k, bits, 64, dtype, seed=20)
        for config in PAIR_CONFIGS:
            outs = gpu.qmv_tc_multi(x, mats, 64, bits, config, norm=(nw, 1e-5))
            for out, mat in zip(outs, mats):
                assert out.shape == (m, mat[0].shape[0])
                assert rel_err(out, reference_matmul(xn, *mat, 64, bits)) < 2 * TOL[dtype]
            for norm, xin in ((None, x.astype(mx.float32)), ((nw, 1e-5), xn)):
                g = reference_matmul(xin.astype(dtype), *gate, 64, bits)
                u = reference_matmul(xin.astype(dtype), *up, 64, bits)
                out = gpu.swiglu_tc(x, gate, up, 64, bits, config, norm=norm)
                assert out.shape == (m, 256)
                assert rel_err(out, g * mx.sigmoid(g) * u) < 3 * TOL[dtype]


DOWN_CASES = [(4, mx.float16, 4, 64, None), (4, mx.float16, 4, 64, {"WG": 8}), (2, mx.float16, 4, 32, None),
              (4, mx.bfloat16, 8, 64, None), (8, mx.float16, 2, 128, None), (2, mx.bfloat16, 2, 64, {"WG": 4})]


@pytest.mark.skipif(not mx.cuda.is_available(), reason="the tensor-core GEMV is CUDA only")
@pytest.mark.parametrize("bits,dtype,down_bits,down_group,config", DOWN_CASES,
                         ids=[f"{b}bit-{'fp16' if d == mx.float16 else 'bf16'}-down{db}g{dg}-{c and c['WG']}"
                              for b, d, db, dg, c in DOWN_CASES])
def test_swiglu_down_tc(bits, dtype, down_bits, down_group, config):
    """The whole MLP in one launch (gate + up + SwiGLU on the tensor cores, down split
    over the blocks with fp32 atomics, the last block adding the residual) against the
    fp32 reference of norm -> gate/up -> SwiGLU -> down -> + residual, for one to three
    tokens (three: two token blocks count in), twice in a row (the launch leaves its
    sums and count at zero for the next), with down's bits and group size its own."""
    H, I = 640, 512  # 10 groups of 64: the last run of 8 is partial; 4 blocks of 128 rows
    gate, up = quantized(I, H, bits, 64, dtype, seed=40), quantized(I, H, bits, 64, dtype, seed=41)
    down = quantized(H, I, down_bits, down_group, dtype, seed=42)
    assert gpu.swiglu_down_supported(I, down[0], down_bits, down_group)
    nw = (1 + 0.1 * mx.random.normal((H,))).astype(dtype)
    for m in (1, 2, 3):
        x = (3 * mx.random.normal((m, H))).astype(dtype)
        resid = mx.random.normal((m, H)).astype(dtype)
        xn = rms_norm_ref(x, nw, 1e-5).astype(dtype)
        g, u = reference_matmul(xn, *gate, 64, bits), reference_matmul(xn, *up, 64, bits)
        h = (g * mx.sigmoid(g) * u).astype(dtype)
        ref = resid.astype(mx.float32) + reference_matmul(h, *down, down_group, down_bits)
        for _ in range(2):
            out = gpu.swiglu_down_tc(x, gate, up, down, 64, bits, down_bits, down_group, resid, config,
                                     norm=(nw, 1e-5))
            assert out.shape == (m, H) and out.dtype == dtype
            assert rel_err(out, ref) < 3 * TOL[dtype], m


@pytest.mark.skipif(not mx.cuda.is_available(), reason="the tensor-core GEMV is CUDA only")
def test_mlp_residual_routes_the_whole_mlp(monkeypatch):
    """kernels.mlp_residual takes an mlx-lm-quantized MLP whose gate/up go to the tensor
    cores (route fused_mlp, opt-in), gives mlx-lm's h + down(silu(gate(norm h)) * up(norm h)),
    and declines with the route off or below the paired fusions' size."""
    import mlx.nn as nn

    from jang import kernels
    from jang.layers import adopt_all

    monkeypatch.setattr(gpu, "PAIR_TC_MIN_WEIGHTS", 0)
    mx.random.seed(5)
    mlp = nn.Module()
    mlp.gate_proj, mlp.up_proj = nn.Linear(512, 1024, bias=False), nn.Linear(512, 1024, bias=False)
    mlp.down_proj = nn.Linear(1024, 512, bias=False)
    mlp.norm = nn.RMSNorm(512, eps=1e-5)
    mlp.set_dtype(mx.float16)
    nn.quantize(mlp, group_size=64, bits=4)
    adopt_all(mlp)
    h = mx.random.normal((1, 1, 512)).astype(mx.float16)
    xn = mlp.norm(h)
    ref = h + mlp.down_proj(nn.silu(mlp.gate_proj(xn)) * mlp.up_proj(xn))
    assert kernels.mlp_residual(h, mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.norm) is None  # opt-in
    with kernels.enabled({"fused_mlp"}):
        out = kernels.mlp_residual(h, mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.norm)
        assert out is not None and out.shape == h.shape
        assert rel_err(out, ref) < 3 * TOL[mx.float16]
        monkeypatch.setattr(gpu, "PAIR_TC_MIN_WEIGHTS", 1 << 30)
        assert kernels.mlp_residual(h, mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.norm) is None


@pytest.mark.skipif(not mx.cuda.is_available(), reason="the tensor-core GEMV is CUDA only")
@pytest.mark.parametrize("config", PAIR_CONFIGS[:2], ids=["default", "wg1"])
@pytest.mark.parametrize("head_dim", (64, 128))
@pytest.mark.parametrize("traditional", (False, True))
def test_qkv_tc_with_rope(traditional, head_dim, config):
    """q/k/v on the tensor cores with RoPE on q and k (a rotation pair's rows D/2 apart
    meet in one block), against mx.fast.rope of the reference."""
    k = 512
    mats = [quantized(n, k, 4, 64, mx.float16, seed=30 + i) for i, n in enumerate((4 * head_dim, 2 * head_dim, 2 * head_dim))]
    assert gpu.multi_tc_rows_ok(mats, head_dim, traditional)
    nw = (1 + 0.1 * mx.random.normal((k,))).astype(mx.float16)
    inv_freq = gpu.rope_inv_freq(head_dim, 10000.0)
    x = mx.random.normal((2, 1, k)).astype(mx.float16)
    outs = gpu.qmv_tc_multi(x, mats, 64, 4, config, norm=(nw, 1e-5),
                            rope=(inv_freq, mx.array(37, mx.int32), head_dim, traditional))
    xn = rms_norm_ref(x, nw, 1e-5)
    for i, (out, mat) in enumerate(zip(outs, mats)):
        heads = mat[0].shape[0] // head_dim
        ref = reference_matmul(xn, *mat, 64, 4).astype(mx.float16).reshape(2, heads, 1, head_dim)
        if i < 2:
            ref = mx.fast.rope(ref, head_dim, traditional=traditional, base=10000.0, scale=1.0, offset=37)
        assert rel_err(out.reshape(2, heads, 1, head_dim), ref) < 2 * TOL[mx.float16]
    assert_kv_pair(gpu.qmv_tc_multi, x, mats, (nw, 1e-5), (inv_freq, mx.array(37, mx.int32), head_dim, traditional), outs)


def assert_kv_pair(multi, x, mats, norm, rope, outs):
    """With kv_pair the launch writes k and v as one (2 B, Hkv, 1, D) array, k's rows
    first: the same values as the three-output launch, and the same q."""
    B, D = x.shape[0], rope[2]
    Hq, Hkv = mats[0][0].shape[0] // D, mats[1][0].shape[0] // D
    q, kv = multi(x, mats, 64, 4, norm=norm, rope=rope, shapes=[(B, Hq, 1, D), (2 * B, Hkv, 1, D)], kv_pair=True)
    assert kv.shape == (2 * B, Hkv, 1, D)
    assert mx.array_equal(q.reshape(outs[0].shape), outs[0]).item()
    assert mx.array_equal(kv[:B].reshape(outs[1].shape), outs[1]).item()
    assert mx.array_equal(kv[B:].reshape(outs[2].shape), outs[2]).item()


@pytest.mark.skipif(not mx.cuda.is_available(), reason="the tensor-core GEMV is CUDA only")
def test_gemv_route_picks_the_tensor_cores_and_can_be_turned_off():
    from jang import kernels

    wq, s, b = quantized(512, 1024, 4, 64, mx.float16)
    x = mx.random.normal((1, 1024)).astype(mx.float16)
    ref = reference_matmul(x, wq, s, b, 64, 4)
    on = kernels._gemv(x, wq, s, b, 64, 4)
    with kernels.enabled(["qmv_tc=off"]):
        off = kernels._gemv(x, wq, s, b, 64, 4)
    assert rel_err(on, ref) < TOL[mx.float16] and rel_err(off, ref) < TOL[mx.float16]
    x3 = mx.random.normal((3, 1024)).astype(mx.float16)  # more tokens than QMV_TC_MAX_M: the CUDA-core kernel
    assert rel_err(kernels._gemv(x3, wq, s, b, 64, 4), reference_matmul(x3, wq, s, b, 64, 4)) < TOL[mx.float16]
    # every bit width the tensor-core GEMV reads in fp16 is routed there (_gemv checks qmv_tc_supported)
    assert all(gpu.qmv_tc_supported(x, bits, 64) for bits in (2, 4, 8)) and not gpu.qmv_tc_supported(x, 3, 64)
    w8, s8, b8 = quantized(512, 1024, 8, 64, mx.float16)
    assert rel_err(kernels._gemv(x, w8, s8, b8, 64, 8), reference_matmul(x, w8, s8, b8, 64, 8)) < TOL[mx.float16]
    # o_proj's input, attention's (B, H, 1, D) output, is one token of K = H * D: the
    # tensor cores too (session 10: it went to the CUDA-core kernel, counted as H tokens)
    xh, resid = x.reshape(1, 8, 1, 128), mx.random.normal((1, 512)).astype(mx.float16)
    assert kernels._tensor_cores(xh, 4, 64, 1024) and not kernels._tensor_cores(xh, 4, 64)
    out = kernels._gemv(xh, wq, s, b, 64, 4, resid=resid)
    assert rel_err(out, ref + resid.astype(mx.float32)) < TOL[mx.float16]


@pytest.mark.skipif(not mx.cuda.is_available(), reason="the tensor-core GEMV is CUDA only")
def test_paired_fusions_take_the_tensor_cores_from_their_size():
    """Compiled decode's q/k/v and gate/up go to the tensor cores from
    gpu.PAIR_TC_MIN_WEIGHTS weights (the 8B shape's), and stay on the CUDA cores below
    (SmolLM2's) or with the route off."""
    import mlx.nn as nn

    from jang import kernels

    small, large = nn.QuantizedLinear(576, 1536, bits=4), nn.QuantizedLinear(4096, 1024, bits=4)
    x_small, x_large = mx.zeros((1, 576), mx.float16), mx.zeros((1, 4096), mx.float16)
    assert kernels._pair_on_tensor_cores(x_large, large, mlp=True)
    assert kernels._pair_on_tensor_cores(x_large, large, mlp=False)
    assert not kernels._pair_on_tensor_cores(x_small, small, mlp=True)
    with kernels.enabled({"fused_tc=off"}):
        assert not kernels._pair_on_tensor_cores(x_large, large, mlp=False)
        assert kernels._pair_on_tensor_cores(x_large, large, mlp=True) == kernels.route("fused_tc_mlp")


def _llama_decoder(seed, prompt_len, steps, **shape):
    """(a random two-layer fp16 Llama of this shape, 4-bit group 64 by mlx-lm's
    nn.quantize, and a function decoding a random prompt plus ``steps`` greedy tokens
    with a fresh cache: every step's last logits, fp32)."""
    import mlx.nn as nn
    from mlx_lm.models import llama
    from mlx_lm.models.cache import make_prompt_cache

    args = llama.ModelArgs(model_type="llama", num_hidden_layers=2, vocab_size=1000, rms_norm_eps=1e-5, **shape)
    mx.random.seed(seed)
    model = llama.Model(args)
    model.set_dtype(mx.float16)
    nn.quantize(model, group_size=64, bits=4)
    prompt = mx.random.randint(0, 1000, (1, prompt_len))

    def decode():
        cache = make_prompt_cache(model)
        logits = [model(prompt, cache=cache)[:, -1]]
        tok = mx.argmax(logits[-1], -1)
        for _ in range(steps):
            logits.append(model(tok[:, None], cache=cache)[:, -1])
            tok = mx.argmax(logits[-1], -1)
        return mx.concatenate(logits).astype(mx.float32)
    return model, decode


@pytest.mark.parametrize("extra", [(), ("fused_mlp",), ("fused_tc=off",), ("fused_tc=off", "fused_tc_mlp"),
                                   ("decode_step=off",), ("decode_chain=off",), ("decode_attention=off",)],
                         ids=["tensor-core", "fused-mlp", "cuda-core", "tensor-core-mlp", "calls-per-boundary", "per-block",
                              "mlx-attention"])
def test_compiled_decode_with_fused_kernels(extra, monkeypatch):
    """A Llama-shaped model decoding through the compiled path with every decode fusion
    on (q/k/v and gate/up on the CUDA cores, or on the tensor cores, or the whole MLP in
    one launch; chained across blocks, or per block) gives the logits of mlx-lm's own
    modules. Its layers are under the size from which the tensor cores take the paired
    fusions, so that size is lowered here."""
    monkeypatch.setattr(gpu, "PAIR_TC_MIN_WEIGHTS", 0)
    from jang import kernels
    from jang.layers import adopt_all

    # past one split of the decode attention (128 keys here), and the KV buffers (256) grow at the 3rd token
    model, decode = _llama_decoder(3, 254, 4, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                                   num_key_value_heads=2, rope_theta=10000.0)
    ref = decode()
    with kernels.enabled({"qmv", "swiglu", "compiled_decode", *extra}):
        adopt_all(model)
        out = decode()
    assert type(model.model.layers[0]).__name__.startswith("Compiled")
    chained = bool(model.model.__dict__.get("_jang_chain_calls"))
    assert chained == ("decode_chain=off" not in extra)
    assert ("_jang_step_call" in model.model.__dict__) == (chained and "decode_step=off" not in extra)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("traditional", (False, True))
def test_qkv_with_rope(traditional):
    """q/k/v in one launch with RoPE on q and k, against mx.fast.rope of the reference."""
    k, head_dim = 512, 64
    mats = [quantized(n, k, 4, 64, mx.float16, seed=i) for i, n in enumerate((256, 128, 128))]
    nw = (1 + 0.1 * mx.random.normal((k,))).astype(mx.float16)
    inv_freq = gpu.rope_inv_freq(head_dim, 10000.0)
    offset = mx.array(37, mx.int32)
    x = mx.random.normal((2, 1, k)).astype(mx.float16)
    outs = gpu.qmv_multi(x, mats, 64, 4, norm=(nw, 1e-5), rope=(inv_freq, offset, head_dim, traditional))
    xn = rms_norm_ref(x, nw, 1e-5)
    for i, (out, mat) in enumerate(zip(outs, mats)):
        ref = reference_matmul(xn, *mat, 64, 4).astype(mx.float16)  # rounded, as RoPE reads it
        heads = mat[0].shape[0] // head_dim
        ref = ref.reshape(2, heads, 1, head_dim)
        if i < 2:
            ref = mx.fast.rope(ref, head_dim, traditional=traditional, base=10000.0, scale=1.0, offset=37)
        assert rel_err(out.reshape(2, heads, 1, head_dim), ref) < 2 * TOL[mx.float16]
    assert_kv_pair(gpu.qmv_multi, x, mats, (nw, 1e-5), (inv_freq, offset, head_dim, traditional), outs)


def _attention_half(seed, S=768, dtype=mx.float16):
    """One decode layer's attention half at the 8B shape as the whole step launches it
    (q/k/v + norm + RoPE, the step's attention, o_proj + residual), random weights and
    KV buffer: a function of the position array."""
    H, Hq, Hkv, D = 4096, 32, 8, 128
    mats = [quantized(n, H, 4, 64, dtype, seed + i) for i, n in enumerate((Hq * D, Hkv * D, Hkv * D))]
    o = quantized(H, Hq * D, 4, 64, dtype, seed + 3)
    x = mx.random.normal((1, 1, H)).astype(dtype)
    kv = mx.random.normal((4, Hkv, S, D)).astype(dtype)
    norm, inv = (mx.random.uniform(0.5, 1.5, (H,)).astype(dtype), 1e-5), gpu.rope_inv_freq(D, 5e5)
    mx.eval(mats, o, x, kv, norm[0])

    def run(pos):
        q, pair = gpu.qmv_tc_multi(x, mats, 64, 4, norm=norm, rope=(inv, pos, D, False),
                                   shapes=[(1, Hq, 1, D), (2, Hkv, 1, D)], kv_pair=True)
        return gpu.qmv_tc(gpu.attention_decode(q, kv, None, 0.088, pos=pos, step=(pair, 2)), *o, 64, 4, resid=x), pair
    return run


@pytest.mark.skipif(not mx.cuda.is_available(), reason="chained launches are CUDA only")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_chain_matches_separate_launches(dtype, monkeypatch):
    """The three launches as one chained launch (chain.py) write exactly what they write
    apart, launch after launch (each in its own epoch of the counts), at positions in
    different splits, and over KV buffers of two capacities (one kernel text, the blocks
    read at run time)."""
    from jang.kernels import chain

    chains, names = [], []
    real, real_kernel = chain.launch_chain, chain._chain_kernel
    monkeypatch.setattr(chain, "launch_chain", lambda group, key: (chains.append(len(group)), real(group, key)))
    monkeypatch.setattr(chain, "_chain_kernel", lambda name, *rest: (names.append(name), real_kernel(name, *rest))[1])
    for capacity in (768, 1024):
        run = _attention_half(7, capacity, dtype)
        for p in (5, 700, 300, 300):
            pos = gpu.position(p)
            apart = run(pos)
            together = chain.run(run, pos)
            mx.eval(apart, together)
            for a, b in zip(apart, together):
                assert mx.array_equal(a, b).item(), f"position {p} of {capacity}"
    assert chains == [3] * 8
    assert len(names) == 8 and len(set(names)) == 1, "one kernel text for both capacities"


@pytest.mark.skipif(not mx.cuda.is_available(), reason="chained launches are CUDA only")
def test_decode_step_chains_its_launches(monkeypatch):
    """A Llama model of the 8B's layer shape (two layers, a smaller vocabulary) decodes
    through the whole step with its launches chained: the logits of the step unchained
    exactly, and mlx-lm's within tolerance; each step holds two chains (q/k/v +
    attention + o_proj, then down + the next layer's three; gate/up's blocks are smaller)."""
    from jang import kernels
    from jang.kernels import chain
    from jang.layers import adopt_all

    # the KV buffers (256) grow at the 7th token: a new trace
    model, decode = _llama_decoder(4, 250, 8, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                   num_key_value_heads=8, rope_theta=500000.0)
    ref = decode()
    adopt_all(model)
    apart = decode()
    chains = []
    real = chain.launch_chain
    monkeypatch.setattr(chain, "launch_chain", lambda group, key: (chains.append(len(group)), real(group, key)))
    model.model.__dict__.pop("_jang_step_call", None)  # traced again, now with the chains
    with kernels.enabled({"chain"}):
        together = decode()
    assert chains[:2] == [3, 4], chains
    assert mx.array_equal(apart, together).item()
    assert rel_err(together, ref) < 1e-2
