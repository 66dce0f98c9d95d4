"""jang bench quality's new paths on a tiny random model: the cost meter, mlx-lm's own
gptq/awq rows, and the degeneration pairs (mlx-lm option beside JANG at its size)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

from jang import bench
from jang.errors import JangError
from jang.evaluate import DEGENERATION_PROMPTS


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """Sensitivity tables of throwaway models go to a throwaway cache."""
    monkeypatch.setenv("JANG_CACHE", str(tmp_path / "cache"))


METER_PROBE = """
import json
import mlx.core as mx
import numpy as np
from jang import bench
with bench.Meter() as m:
    a = mx.zeros((64, 1024, 1024))  # 256 MB of fp32 in MLX
    mx.eval(a)
    b = np.ones((32, 1024, 1024), np.float32)  # 128 MB in numpy, invisible to MLX
print(json.dumps([m.mlx_peak_gb, m.rss_peak_gb, m.seconds]))
"""


def test_meter_sees_mlx_and_numpy_memory():
    """In a fresh process: inside the test run, memory freed by earlier tests (MLX's
    buffer cache, the C heap) is reused without raising the peak RSS, which made this
    check depend on which tests ran before it."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", METER_PROBE], capture_output=True, text=True, check=True, cwd=root)
    mlx_peak_gb, rss_peak_gb, seconds = json.loads(out.stdout.strip().splitlines()[-1])
    assert mlx_peak_gb >= 0.25
    assert rss_peak_gb is None or rss_peak_gb >= 0.12
    assert seconds > 0


def test_mlx_gptq_and_awq_rows(tiny_llama, own_cache):
    b = bench.Bench(tiny_llama, eval_tokens=512)
    options = {i: (name, fn) for i, name, fn in bench.mlx_option_list(gptq=(4, 3), awq=(4,))}
    gptq = b.mlx("gptq4", *options["gptq4"])
    assert b.mlx("gptq3", *options["gptq3"]) is None  # mlx-lm's gptq packs 2/4/8 bits only: recorded, no row
    assert b.skipped[0]["id"] == "gptq3" and "2, 4 or 8" in b.skipped[0]["reason"]
    # linears at 4 bits + the tied 49152 x 64 embedding at 6 bits, fp16 scales (not the fp32 it ran in)
    assert 4.5 < gptq["avg_bits"] < 6.5
    assert math.isfinite(gptq["kl"]) and gptq["seconds"] > 0 and gptq["mlx_peak_gb"] > 0
    awq = b.mlx("awq4", *options["awq4"])
    assert 4.5 < awq["avg_bits"] < 5.0  # embedding 4-bit g32 costs 5 bits, linears 4.5
    model, config = b.fresh()
    options["gptq4"][1](model, config, b.calibration)
    quantized = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert {m.bits for m in quantized} == {4} and quantized[0].scales.dtype == mx.float16


def test_degeneration_pairs_each_option_with_jang_at_its_size(tiny_llama, own_cache):
    published = []
    result = bench.run_quality(tiny_llama, methods=(), budgets=(), dynamic=(), mlx_gptq=(), mlx_awq=(),
                               eval_tokens=512, degeneration=("uniform2",), max_tokens=8,
                               on_result=lambda r: published.append(len(r["rows"])))
    assert published[:-1] == list(range(1, 13))  # a report after each of 6 mlx-lm + 6 matched rows
    assert [m["mlx"] for m in result["matched"]] == [bench.MLX_OPTIONS[i][0] for i in bench.DEFAULT_MLX_OPTIONS]
    assert all(m["jang_bits"] <= m["bits"] + 1e-6 for m in result["matched"])
    (pair,) = result["degeneration"]
    assert pair["mlx"] == "mlx-lm uniform 2-bit" and pair["jang"] == "JANG mse @ uniform 2-bit"
    assert [e["prompt"] for e in pair["examples"]] == list(DEGENERATION_PROMPTS[:4])
    assert 0 <= pair["jang_score"] <= 1 and 0 <= pair["mlx_fraction"] <= 1
    # word salad judged by the float model, and failures counted beyond the float model's own
    assert 0 <= pair["mlx_salad"] <= pair["mlx_fraction"] and 0 <= pair["jang_beyond"] <= pair["jang_fraction"]
    assert all("float" in e and isinstance(e["mlx_flags"], list) for e in pair["examples"])
    assert result["reference_degeneration"]["salad_calibration"]["threshold"] > 0
    assert len(result["reference_degeneration"]["outputs"]) == len(DEGENERATION_PROMPTS)
    md = bench.markdown(result)
    assert "| mlx-lm uniform 2-bit | 2.500 |" in md and "JANG flagged" in md
    with pytest.raises(JangError, match="unknown mlx-lm options"):
        bench.run_quality(tiny_llama, degeneration=("uniform7",), eval_tokens=512)


def test_uniform_2_bit_group_32_is_3_bits_as_stored(tiny_llama, own_cache):
    b = bench.Bench(tiny_llama, eval_tokens=512)
    name, fn = bench.MLX_OPTIONS["uniform2_g32"]
    row = b.mlx("uniform2_g32", name, fn)
    assert row["avg_bits"] == pytest.approx(3.0, abs=0.01)  # 2 + (16 + 16) / 32


def test_merge_keeps_first_row_per_option_and_rebuilds_the_tables():
    def row(name, family, bits, kl, **kw):
        return {"name": name, "family": family, "method": "x", "avg_bits": bits, "kl": kl, "ppl": 1.0, "top1": 1.0,
                "seconds": 1.0, "mlx_peak_gb": 0.1, "rss_peak_gb": 0.1, **kw}

    base = {"model": "m", "eval_book": "b", "eval_tokens": 1024, "max_tokens": 60, "skipped": []}
    a = {**base, "command": "jang bench quality --mlx-options uniform2", "rows": [
        row("mlx-lm uniform 2-bit", "mlx-lm", 2.5, 10.0, id="uniform2"),
        row("JANG mse @ uniform 2-bit", "jang", 2.5, 4.0, matched_to="uniform2")]}
    b = {**base, "command": "jang bench quality --mlx-options uniform2 uniform3", "rows": [
        row("mlx-lm uniform 2-bit", "mlx-lm", 2.5, 99.0, id="uniform2"),
        row("mlx-lm uniform 3-bit", "mlx-lm", 3.5, 2.0, id="uniform3"),
        row("JANG mse @ uniform 3-bit", "jang", 3.5, 1.0, matched_to="uniform3")]}
    merged = bench.merge_results([a, b])
    assert [(m["mlx"], m["ratio"]) for m in merged["matched"]] == [("mlx-lm uniform 2-bit", 0.4),
                                                                  ("mlx-lm uniform 3-bit", 0.5)]
    assert merged["command"].count("jang bench quality") == 2
    with pytest.raises(JangError, match="eval_tokens"):
        bench.merge_results([a, {**b, "eval_tokens": 2048}])


def test_kv_cache_step_for_a_decode_config():
    """`jang bench decode --configs kv_step=320`: the KV cache grows in steps of 320 for
    that config's runs (MLX's vector attention instead of cuDNN on CUDA), then 256 again."""
    from mlx_lm.models.cache import KVCache

    from jang.bench_kernels import kv_cache_step

    def grown():
        cache = KVCache()
        cache.update_and_fetch(mx.zeros((1, 2, 1, 8)), mx.zeros((1, 2, 1, 8)))
        return cache.keys.shape[2]

    with kv_cache_step(320):
        assert grown() == 320
    assert grown() == 256
    with kv_cache_step(None):
        assert grown() == 256


def test_decode_rows_keep_each_rounds_speed_up():
    """jang bench decode: medians over the rounds, and each round's JANG / mlx-lm ratio
    (the spread between machines and rounds is what the decode target has to survive)."""
    from jang.bench_kernels import decode_markdown, decode_row

    mlx_runs = [{"decode_tps": t, "prefill_tps": 1000.0} for t in (100.0, 150.0, 120.0)]
    jang_runs = [{"decode_tps": t, "prefill_tps": 2000.0} for t in (200.0, 180.0, 240.0)]
    row = decode_row("llama-3-8b", 4, "", 4e9, 700.0, mlx_runs, jang_runs)
    assert row["mlx"]["decode_tps"] == 120.0 and row["jang"]["decode_tps"] == 200.0 and row["rounds"] == 3
    assert row["speedup_rounds"] == [2.0, 1.2, 2.0]
    assert row["decode_tps_rounds"]["jang"] == [200.0, 180.0, 240.0]
    md = decode_markdown({"device": "test", "mlx": mx.__version__, "copy_GBps": 2800.0, "prompt": 512,
                          "new_tokens": 128, "rounds": 3, "rows": [row]})
    assert "| 120.0 | 200.0 | 1.67x | 1.20–2.00x |" in md
