"""The kernel sources and the dispatch, checked where CI runs (no GPU): every body
translates cleanly into both dialects, the Metal translations are current and compile
for syntax against metal/include/metal_stdlib, the code layout the decoder assumes is
MLX's, and on the CPU the layers take the reference path."""

import re
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from jang import kernels
from jang.kernels import dialect, metal_export
from jang.quantizers.pack import pack

ROOT = Path(__file__).resolve().parents[1]
BODIES = sorted(p.stem for p in dialect.SRC.glob("*.body") if p.stem not in dialect.CUDA_ONLY_BODIES)
CUDA_ONLY = re.compile(r"\b(threadIdx|blockIdx|__syncthreads|__syncwarp|__shared__|__shfl_xor_sync)\b")
METAL_ONLY = re.compile(r"\b(thread_position_in_threadgroup|threadgroup_position_in_grid|simdgroup_index_in_threadgroup|"
                        r"thread_index_in_simdgroup|threadgroup_barrier|simdgroup_barrier|simd_sum)\b")


def test_every_body_has_an_export_config():
    assert BODIES == sorted(metal_export.CONFIGS)


@pytest.mark.parametrize("name", BODIES)
def test_translation_leaves_no_neutral_words(name):
    neutral = re.compile(r"\b(" + "|".join(dialect.TOKENS["cuda"]) + r")\b")
    cuda = dialect.translate(dialect.body(name), "cuda")
    metal = dialect.translate(dialect.body(name), "metal")
    assert not neutral.search(cuda) and not neutral.search(metal)
    assert not METAL_ONLY.search(cuda), "a Metal built-in leaked into the CUDA body"
    assert not CUDA_ONLY.search(metal), "a CUDA built-in leaked into the Metal body"


@pytest.mark.parametrize("name", dialect.CUDA_ONLY_BODIES)
def test_cuda_only_bodies_build_with_their_helpers(name):
    """A CUDA-only body (the tensor-core GEMV) translates cleanly and gets the CUDA-only
    helpers it uses; the Metal header never carries them."""
    neutral = re.compile(r"\b(" + "|".join(dialect.TOKENS["cuda"]) + r")\b")
    head, body = dialect.source(name, "cuda")
    assert not neutral.search(body) and not METAL_ONLY.search(body)
    used = set(re.findall(r"\bjg_\w+", body))
    assert used and all(re.search(r"\b" + helper + r"\b", head) for helper in used), used
    assert "jg_tc_" not in dialect.header("metal")


def test_conditionals_are_resolved_for_the_defines():
    text = "a\n#ifdef JG_X\nb\n#ifndef JG_Y\nc\n#else\nd\n#endif\n#else\ne\n#endif\nf"
    assert dialect.resolve_conditionals(text, ("JG_X",)) == "a\nb\nc\nf"
    assert dialect.resolve_conditionals(text, ("JG_X", "JG_Y")) == "a\nb\nd\nf"
    assert dialect.resolve_conditionals(text, ()) == "a\ne\nf"
    with pytest.raises(ValueError, match="unterminated"):
        dialect.resolve_conditionals("#ifdef JG_X\nb", ())
    with pytest.raises(ValueError, match="#ifdef / #ifndef only"):
        dialect.resolve_conditionals("#if JG_X > 1\nb\n#endif", ())


def test_a_kernel_source_keeps_only_its_own_fusions():
    """MLX hashes a kernel's whole source on every launch: a body's unused fusions are cut
    out, and the ones asked for stay."""
    _, resid = dialect.source("qmv_tc", "cuda", ("JG_RESID",))
    _, swiglu = dialect.source("qmv_tc", "cuda", ("JG_SWIGLU", "JG_NORM"))
    assert "#if" not in resid and "wu" not in resid and "inv_freq" not in resid and "resid[o]" in resid
    assert "wu" in swiglu and "norm_w" in swiglu and "resid[" not in swiglu
    assert len(resid) < 0.7 * len(dialect.minify(dialect.body("qmv_tc")))


def test_rope_speeds_are_prepared_outside_the_compiled_trace():
    """prepare_rope caches evaluated speeds, which qkv's RoPE then reads as they are
    (computed inside mx.compile they would be recomputed by every compiled call)."""
    import mlx.nn as nn

    rope = nn.RoPE(64, base=10000.0)
    kernels.prepare_rope(rope)
    inv = rope.__dict__["_jang_inv_freq"]
    expected = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(np.array(inv), expected, rtol=1e-6)
    assert kernels._rope_args(rope, 64, None)[0] is inv
    kernels.prepare_rope(None)  # attention without a rope module: nothing to do


def test_committed_metal_sources_are_current(tmp_path):
    for path in metal_export.export(tmp_path):
        committed = ROOT / "metal" / path.name
        assert committed.exists(), f"{committed} missing: run python -m jang.kernels.metal_export metal"
        assert committed.read_text() == path.read_text(), f"{committed} is stale: rerun the export"


COMPILER = shutil.which("clang++") or shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler to check the Metal sources' syntax")
@pytest.mark.parametrize("name", BODIES + sorted(metal_export.VARIANTS))
def test_metal_source_compiles_for_syntax(name):
    src = ROOT / "metal" / f"{name}.metal"
    result = subprocess.run([COMPILER, "-fsyntax-only", "-std=c++17", "-x", "c++", "-Wno-attributes",
                             "-Wno-unknown-pragmas", "-I", str(ROOT / "metal" / "include"), str(src)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("bits", (2, 3, 4, 5, 6, 8))
def test_decoder_arithmetic_matches_mlx_layout(bits):
    """jg_decode32's bit arithmetic (one shift puts each code under the exponent of 1.0f)
    replayed in numpy on words packed like mx.quantize packs them."""
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=32)
    words = [int(v) for v in np.asarray(pack(codes[None], bits))[0]]
    field = ((1 << bits) - 1) << (23 - bits)
    decoded = []
    for i in range(32):
        bit = i * bits
        wi, sh = bit >> 5, bit & 31
        if sh + bits <= 32:
            d = 23 - bits - sh
            v = (words[wi] << d) & 0xFFFFFFFF if d >= 0 else words[wi] >> -d
        else:
            v = (((words[wi] >> sh) | (words[wi + 1] << (32 - sh))) << (23 - bits)) & 0xFFFFFFFF
        f = np.array([0x3F800000 | (v & field)], dtype=np.uint32).view(np.float32)[0]
        decoded.append((f - 1) * 2**bits)
    np.testing.assert_array_equal(decoded, codes)
    # and the packing agrees with MLX's own quantizer
    w = mx.random.normal((4, 64))
    wq, s, b = mx.quantize(w, group_size=32, bits=bits)
    assert np.array_equal(np.asarray(wq), np.asarray(pack(np.asarray(
        mx.round((mx.dequantize(wq, s, b, group_size=32, bits=bits) - mx.repeat(b, 32, -1)) / mx.repeat(s, 32, -1))
    ).astype(np.int64), bits)))


def test_cpu_dispatch_and_reference_override(monkeypatch):
    assert kernels.backend() == "cpu"
    monkeypatch.setenv("JANG_KERNELS", "reference")
    assert kernels.backend() == "reference"
    assert not kernels.route("qmv") and not kernels.route("embedding")
    monkeypatch.delenv("JANG_KERNELS")
    assert kernels.backend() == "cpu"


def test_fused_mlp_falls_back_to_the_same_result_off_gpu():
    from mlx_lm.models import llama

    from jang import quantize
    from jang.layers import fuse_mlps

    from conftest import TINY_LLAMA

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict({**TINY_LLAMA, "vocab_size": 256}))
    quantize(model, "JANG_4M")
    ids = mx.array([[1, 5, 9, 3]])
    before = model(ids)
    assert fuse_mlps(model) == len(model.model.layers)
    after = model(ids)
    assert mx.array_equal(before, after)
    assert all(type(layer.mlp).__name__.startswith("Fused") for layer in model.model.layers)


def test_gemv_rows_may_come_in_another_shape():
    """The GEMVs read x as rows of the weights' K in any shape (o_proj reads attention's
    (B, H, 1, D) output flat); the fused q/k/v writes its outputs in given shapes of the
    same size, and refuses shapes of another size."""
    from jang.kernels import gpu

    w = mx.zeros((64, 256 * 4 // 32), mx.uint32)  # 64 rows of K = 256 at 4 bits
    scales = biases = mx.zeros((64, 4), mx.float16)
    attn = mx.zeros((1, 8, 1, 32), mx.float16)  # 8 heads of 32: one row of 256
    assert gpu.in_features(w, 4) == 256
    assert not gpu.supports_affine(attn, w, scales, biases, 64, 4)
    assert gpu.supports_affine(attn, w, scales, biases, 64, 4, rows_any_shape=True)
    assert not gpu.supports_affine(attn[:, :7], w, scales, biases, 64, 4, rows_any_shape=True)
    x = mx.zeros((2, 1, 256), mx.float16)
    assert gpu._multi_shapes(x, (64, 32, 32)) == [(2, 1, 64), (2, 1, 32), (2, 1, 32)]
    heads = [(2, 4, 1, 16), (2, 2, 1, 16), (2, 2, 1, 16)]
    assert gpu._multi_shapes(x, (64, 32, 32), heads) == heads
    with pytest.raises(ValueError, match="do not hold"):
        gpu._multi_shapes(x, (64, 32, 32), [(1, 4, 1, 16), *heads[1:]])


def test_launch_bounds_are_cuda_header_lines():
    """MLX writes a kernel's signature itself, so __launch_bounds__ (the register cap that
    gpu._qmv_tc_launch's min_blocks asks for) goes in as a redefinition of __global__ at
    the end of the header, for CUDA only."""
    head, body = dialect.source("qmv_tc", "cuda", ("JG_TC_STREAM",), (256, 4))
    assert head.endswith("#undef __global__\n#define __global__ __location__(global) __launch_bounds__(256, 4)\n")
    plain_head, plain_body = dialect.source("qmv_tc", "cuda", ("JG_TC_STREAM",))
    assert "__launch_bounds__" not in plain_head and body == plain_body
    with pytest.raises(ValueError, match="CUDA"):
        dialect.source("qmv", "metal", (), (128, 2))


def test_cuda_kernels_are_handed_to_mlx_as_includes(tmp_path, monkeypatch):
    """MLX hashes the text it is handed on every launch, so a CUDA kernel's header and
    body go to files named by their content, and MLX gets two #include lines plus the
    names of the shape parameters the body reads (MLX passes only those it finds)."""
    monkeypatch.setenv("JANG_CACHE", str(tmp_path))
    head, body = dialect.source("qmv_tc", "cuda", ("JG_NORM",))
    inc_head, inc_body = dialect.cuda_include_form("jang_qmv_tc_norm", head, body, ("x", "w", "scales", "biases"))
    included = [Path(re.fullmatch(r'#include "(.+)"', line).group(1))
                for line in (inc_head + inc_body).splitlines() if line.startswith("#include")]
    assert [p.read_text() for p in included] == [head + "\n", body + "\n"]
    assert all(p.is_absolute() and p.parent == (tmp_path / "cuda-sources").resolve() for p in included)
    shape_names = {f"{n}{s}" for n in ("x", "w", "scales", "biases") for s in ("_shape", "_strides", "_ndim")}
    assert {n for n in shape_names if n in body} == {n for n in shape_names if n in inc_body} != set()
    assert len(inc_head) + len(inc_body) < (len(head) + len(body)) / 10
    # the same text gives the same files; another body, other names
    assert dialect.cuda_include_form("jang_qmv_tc_norm", head, body, ("x",))[0] == inc_head
    other = dialect.cuda_include_form("jang_qmv_tc_norm", head, body + "\n// changed", ("x",))
    assert other[0] != inc_head and len(list((tmp_path / "cuda-sources").iterdir())) == 4
    # a file cut short (say by a crash) is written again
    included[1].write_text("")
    dialect.cuda_include_form("jang_qmv_tc_norm", head, body, ("x",))
    assert included[1].read_text() == body + "\n"


def test_kernel_sources_stay_inline_where_the_cache_cannot_be_written(tmp_path, monkeypatch):
    """A cache folder that cannot be made costs host time, not the kernel: the text goes
    to MLX whole, with a warning that says why."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("JANG_CACHE", str(blocker))
    head, body = dialect.source("qmv", "cuda")
    with pytest.warns(UserWarning, match="cannot write kernel sources"):
        assert dialect.cuda_include_form("jang_qmv", head, body, ("x",)) == (head, body)


def test_concatenate_takes_one_launch_only_where_it_can():
    """kernels.concatenate is mx.concatenate's result everywhere; the one-launch kernel
    takes only arrays of one shape and dtype, at most CONCAT_MAX_INPUTS of them, and its
    input list reaches the body as a macro (each list its own kernel name)."""
    arrays = [mx.full((2, 3), float(i), mx.float16) for i in range(4)]
    assert mx.array_equal(kernels.concatenate(arrays), mx.concatenate(arrays, axis=0)).item()
    assert kernels.gpu.concatenate_supported(arrays)
    assert not kernels.gpu.concatenate_supported(arrays[:1]) and not kernels.gpu.concatenate_supported([])
    assert not kernels.gpu.concatenate_supported(arrays + [mx.zeros((1, 3), mx.float16)])
    assert not kernels.gpu.concatenate_supported(arrays + [mx.zeros((2, 3), mx.float32)])
    assert not kernels.gpu.concatenate_supported(arrays * (kernels.gpu.CONCAT_MAX_INPUTS // 4 + 1))
    assert not kernels.gpu.concatenate_supported([mx.zeros((0, 3), mx.float16)] * 2)
    macros = (("JG_INPUTS", "JG_EACH(0, p0) JG_EACH(1, p1)"),)
    _, body = dialect.source("concat", "cuda", macros=macros)
    assert body.startswith("#define JG_INPUTS JG_EACH(0, p0) JG_EACH(1, p1)\n") and "JG_EACH(i, p)" in body
    with pytest.raises(ValueError, match="one line"):
        dialect.source("concat", "cuda", macros=(("JG_INPUTS", "JG_EACH(0, p0)\nJG_EACH(1, p1)"),))


def test_enabling_a_gpu_route_leaves_the_cpu_on_its_own_path():
    """JANG_ENABLE (kernels.enabled) turns on the CPU's own routes there, never a GPU
    kernel's: concatenate then stays mx.concatenate rather than launching a kernel."""
    with kernels.enabled({"concat", "decode_attention", "compiled_decode"}):
        assert kernels.route("compiled_decode", b="cpu") is True
        assert not kernels.route("concat", b="cpu") and not kernels.route("decode_attention", b="cpu")
        assert kernels.route("concat", b="cuda") is True and kernels.route("concat", b="metal") is True
        arrays = [mx.full((2, 3), float(i), mx.float16) for i in range(4)]
        assert mx.array_equal(kernels.concatenate(arrays), mx.concatenate(arrays, axis=0)).item()
