"""End to end on real models and real text: convert, both loaders, generation,
GGUF import fidelity, and a conversion killed midway."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm import utils as mlx_utils

import jang
from jang.evaluate import for_evaluation, log_probs, next_token_stats
from jang.cli import main as cli

pytestmark = pytest.mark.real


def assert_same_parameters(a, b):
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and mx.array_equal(pa[k], pb[k]), k


def test_readme_main_job_on_smollm2(tmp_path, smollm2_float, austen_text, capsys, monkeypatch):
    """What the README's main command does: convert with JANG_2M, print per-role bits and
    the true average, load with both loaders (identical logits), generate."""
    monkeypatch.setenv("JANG_KERNELS", "reference")  # bit-exact comparisons with mlx-lm
    out = tmp_path / "smollm2-JANG_2M"
    assert cli(["convert", "--model", str(smollm2_float), "--profile", "JANG_2M", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "jang_config.json").read_text())
    assert f"{summary['avg_bits']:.3f}" in printed
    for role in ("attn_q", "mlp_down", "embed_tied"):
        assert role in printed

    model, tok = jang.load(str(out))
    stock, _ = mlx_lm.load(str(out))
    in_memory, _ = mlx_utils.load_model(Path(smollm2_float), lazy=True)
    jang.quantize(in_memory, "JANG_2M", progress=False)
    assert_same_parameters(model, stock)
    assert_same_parameters(model, in_memory)
    # MLX's fp16 quantized matmul is slow on CPU (~40 ms per row per matrix), so the
    # bit-exact logits comparison runs on a short stretch of real text.
    x = mx.array([tok.encode(austen_text)[:4]])
    logits = model(x)
    assert mx.array_equal(logits, stock(x))
    assert mx.array_equal(logits, in_memory(x))

    monkeypatch.delenv("JANG_KERNELS")  # the fast CPU path for generation
    assert cli(["generate", "--model", str(out), "--prompt", "Who wrote Romeo and Juliet?", "--max-tokens", "8"]) == 0
    assert len(capsys.readouterr().out.strip()) > 0


def test_smollm2_import_is_faithful_and_jang_4m_stays_close(tmp_path, smollm2_float, austen_text):
    """The imported float model reads Austen well (a wrong q/k un-permutation would not),
    and JANG_4M is close to it while JANG_2M is not as close."""
    ref = for_evaluation(mlx_utils.load_model(Path(smollm2_float))[0])
    tok = mlx_utils.load_tokenizer(Path(smollm2_float))
    ids = tok.encode(austen_text)[:256]
    ref_logp = log_probs(ref, ids)
    ppl_ref, _, _ = next_token_stats(ref_logp, ref_logp, ids)
    assert ppl_ref < 40, ppl_ref
    stats = {}
    for profile in ("JANG_4M", "JANG_2M"):
        q, _ = mlx_utils.load_model(Path(smollm2_float))
        jang.quantize(q, profile, progress=False)
        stats[profile] = next_token_stats(log_probs(for_evaluation(q), ids), ref_logp, ids)
    # measured: JANG_4M KL 0.19, top-1 0.71; JANG_2M KL 2.86, top-1 0.15 (RTN, 256 tokens)
    assert stats["JANG_4M"][1] < 0.3 and stats["JANG_4M"][2] > 0.6, stats
    assert stats["JANG_2M"][1] > stats["JANG_4M"][1], stats


def test_gemma3_gguf_import_convert_and_load(tmp_path, gemma_float, austen_text, monkeypatch):
    """Gemma-3-270m from its GGUF: norms shifted back (llama.cpp stores 1+w), BOS added,
    the float model reads Austen well, and a JANG_4M folder loads identically both ways."""
    ref, config = mlx_utils.load_model(Path(gemma_float))
    ref = for_evaluation(ref)
    assert config["model_type"] == "gemma3_text"
    tok = mlx_utils.load_tokenizer(Path(gemma_float))
    ids = tok.encode(austen_text)[:192]
    assert ids[0] == tok.bos_token_id
    ref_logp = log_probs(ref, ids)
    ppl_ref, _, _ = next_token_stats(ref_logp, ref_logp, ids)
    assert ppl_ref < 60, ppl_ref

    monkeypatch.setenv("JANG_KERNELS", "reference")
    out = tmp_path / "gemma-JANG_4M"
    jang.convert(str(gemma_float), out, "JANG_4M", progress=False)
    model, _ = jang.load(str(out))
    stock, _ = mlx_lm.load(str(out))
    assert_same_parameters(model, stock)
    x = mx.array([ids[:2]])  # fp16 on CPU is slow; see the SmolLM2 test
    assert mx.array_equal(model(x), stock(x))
    monkeypatch.delenv("JANG_KERNELS")  # the fast CPU path for the quality numbers
    _, kl, top1 = next_token_stats(log_probs(for_evaluation(model), ids), ref_logp, ids)
    assert kl < 0.3 and top1 > 0.6, (kl, top1)  # measured: KL 0.175, top-1 0.70 (192 tokens)
    plan = json.loads((out / "jang_config.json").read_text())
    assert plan["roles"]["embed_tied"]["bits"] == {"6": 1}  # max(embed 4, lm_head 6)


def _partial_folders(parent: Path):
    return [p for p in parent.iterdir() if ".jang-partial" in p.name]


def test_killed_conversion_leaves_no_model(tmp_path, smollm2_float):
    """kill -9 while the output is being written: the target never appears, and the
    hidden partial folder does not load as a model."""
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "jang", "convert", "--model", str(smollm2_float), "-o", str(out),
           "--profile", "JANG_4M"]
    killed_midway = 0
    for attempt in range(4):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not _partial_folders(tmp_path):
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_midway += 1
            assert not out.exists()
            for partial in _partial_folders(tmp_path):
                with pytest.raises(Exception):
                    mlx_lm.load(str(partial))
                with pytest.raises(jang.JangError):
                    jang.load(str(partial))
        else:  # finished before we saw it: the output must then be whole
            jang.load(str(out))
            subprocess.run(["rm", "-rf", str(out)], check=True)
        if killed_midway >= 2:
            break
    assert killed_midway >= 2
