"""Streaming conversion: same bytes as the in-memory path, Hugging Face names through
mlx-lm's sanitize, MoE experts per-expert and fused, kills at random points resumed
to byte-identical output, write/read errors named, progress as JSON lines."""

import filecmp
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import utils as mlx_utils

import jang
from jang import stream, stream_gptq
from jang.errors import CorruptShardError

from conftest import TINY_LLAMA, make_tiny_model
from test_moe import TINY_QWEN3_MOE

ROOT = Path(__file__).resolve().parents[1]
SHARD = 150_000  # bytes: several output shards from a tiny model


def same_folders(a: Path, b: Path):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


def in_memory(source: Path, out: Path, profile="JANG_4M"):
    """What jang.quantize + jang.save write: the reference for the streaming path."""
    model, config = mlx_utils.load_model(source, lazy=True)
    plan = jang.quantize(model, profile, progress=False)
    jang.save(model, mlx_utils.load_tokenizer(source), out, config, plan, source=str(source), copy_from=source)
    return model


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def hf_llama(tmp_path, smollm2_float):
    """A tiny Llama saved with the extras a Hugging Face checkpoint carries and mlx-lm's
    sanitize drops: an lm_head.weight beside tied embeddings, rotary inv_freq buffers."""
    folder = make_tiny_model(tmp_path / "hf-llama", TINY_LLAMA, smollm2_float)
    weights = mx.load(str(folder / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = mx.ones((8,))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return folder


def test_stream_writes_the_bytes_the_in_memory_path_writes(tmp_path, hf_llama):
    out, ref = tmp_path / "stream", tmp_path / "ref"
    jang.convert(str(hf_llama), out, "JANG_3M", progress=False, max_shard_bytes=SHARD)
    model = in_memory(hf_llama, ref, "JANG_3M")
    assert len(list(out.glob("model-*.safetensors"))) > 3
    # same tensors (the in-memory save uses one shard size, so compare tensors, not files)
    loaded, _ = jang.load(str(out))
    a, b = dict(tree_flatten(loaded.parameters())), dict(tree_flatten(model.parameters()))
    assert a.keys() == b.keys() and "lm_head.weight" not in a
    assert all(a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]) for k in a)
    # and byte-identical files at equal shard size
    same = tmp_path / "stream-one-shard"
    jang.convert(str(hf_llama), same, "JANG_3M", progress=False)
    same_folders(same, ref)


def convert_cmd(source, out, *extra):
    return [sys.executable, "-m", "jang", "convert", "--model", str(source), "-o", str(out), "--profile", "JANG_4M",
            "--max-shard-gb", str(SHARD / 1e9), *extra]


def test_killed_at_random_points_resumes_to_identical_output(tmp_path, tiny_llama):
    """SIGKILL at 10 random points (mid-shard, between a shard and its journal line,
    while writing config, after the rename); each resume ends byte-identical."""
    ref = tmp_path / "ref"
    before = stream.steps_taken()
    jang.convert(str(tiny_llama), ref, "JANG_4M", progress=False, max_shard_bytes=SHARD)
    steps = stream.steps_taken() - before
    assert steps > 20
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(5)
    points = sorted(rng.sample(range(1, steps + 1), 10))
    points[-1] = steps  # always include the last one: killed after the rename
    source_digest = digest(tiny_llama)
    for i, step in enumerate(points):
        out = tmp_path / f"out{i}"
        r = subprocess.run(convert_cmd(tiny_llama, out, "--progress", "none"), env={**env, "JANG_KILL_AT_STEP": str(step)},
                           capture_output=True, text=True)
        assert r.returncode == -9, (step, r.stderr[-2000:])
        partial = tmp_path / f".out{i}.jang-partial"
        if out.exists():  # killed after the rename: the folder is complete
            assert step == steps and not partial.exists()
        else:
            assert partial.exists()
            jang.convert(str(tiny_llama), out, "JANG_4M", progress=False, max_shard_bytes=SHARD, resume=True)
        same_folders(out, ref)
        assert not partial.exists()
    assert digest(tiny_llama) == source_digest


def test_resume_refuses_other_settings(tmp_path, tiny_llama):
    out = tmp_path / "out"
    r = subprocess.run(convert_cmd(tiny_llama, out, "--progress", "none"),
                       env={**os.environ, "PYTHONPATH": str(ROOT), "JANG_KILL_AT_STEP": "12"})
    assert r.returncode == -9
    with pytest.raises(jang.JangError, match="other settings"):
        jang.convert(str(tiny_llama), out, "JANG_2M", progress=False, max_shard_bytes=SHARD, resume=True)


def test_write_error_names_the_file_keeps_the_source_and_resumes(tmp_path, tiny_llama):
    """A file-size limit makes the second shard's write fail (EFBIG), as a full disk would."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    source_digest = digest(tiny_llama)
    limit = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({SHARD // 2}, {SHARD // 2})); "
             "from jang.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", limit, *convert_cmd(tiny_llama, out, "--progress", "none")[3:]],
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "model-00001-of-" in r.stderr and "writing failed" in r.stderr
    assert not out.exists() and (tmp_path / ".out.jang-partial").exists()
    assert digest(tiny_llama) == source_digest
    jang.convert(str(tiny_llama), out, "JANG_4M", progress=False, max_shard_bytes=SHARD, resume=True)
    jang.convert(str(tiny_llama), ref, "JANG_4M", progress=False, max_shard_bytes=SHARD)
    same_folders(out, ref)


def test_truncated_source_is_named(tmp_path, tiny_llama):
    shard = tiny_llama / "model.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(CorruptShardError, match="model.safetensors"):
        jang.convert(str(tiny_llama), tmp_path / "out", "JANG_4M", progress=False)


def test_progress_json_lines(tmp_path, tiny_llama):
    r = subprocess.run(convert_cmd(tiny_llama, tmp_path / "out", "--progress", "json"),
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    tensors = [e for e in events if e["event"] == "tensor"]
    assert events[-1]["event"] == "done"
    last = tensors[-1]
    assert last["tensors_done"] == last["tensors_total"] == len(tensors)
    assert last["bytes_done"] == last["bytes_total"] > 0
    assert all(e["gb_per_s"] >= 0 and "eta_s" in e for e in tensors)


# ---------------------------------------------------------------- MoE

def hf_moe_checkpoint(folder: Path, fused: bool):
    """Rewrite a tiny Qwen3-MoE folder (mlx-lm's switch layout) the way Hugging Face
    stores it: experts.N.{gate,up,down}_proj, or fused 3-D experts.gate_up_proj /
    experts.down_proj as transformers 5 writes them."""
    weights = mx.load(str(folder / "model.safetensors"))
    for name in [n for n in weights if ".switch_mlp." in n]:
        prefix, proj = name.split(".switch_mlp.")
        proj = proj.removesuffix(".weight")
        w = weights.pop(name)
        if not fused:
            for e in range(w.shape[0]):
                weights[f"{prefix}.experts.{e}.{proj}.weight"] = w[e]
        elif proj == "down_proj":
            weights[f"{prefix}.experts.down_proj"] = w
        else:
            weights.setdefault(f"{prefix}.experts.gate_up_proj", {})[proj] = w
    for name, parts in [(n, v) for n, v in weights.items() if isinstance(v, dict)]:
        weights[name] = mx.concatenate([parts["gate_proj"], parts["up_proj"]], axis=1)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused"])
def test_moe_experts_stream_into_switch_layers(tmp_path, smollm2_float, reference_kernels, fused):
    mlx_form = make_tiny_model(tmp_path / "mlx-form", TINY_QWEN3_MOE, smollm2_float)
    reference, _ = mlx_utils.load_model(mlx_form, lazy=True)
    plan = jang.quantize(reference, "JANG_3M", progress=False)

    hf = make_tiny_model(tmp_path / "hf", TINY_QWEN3_MOE, smollm2_float)
    hf_moe_checkpoint(hf, fused)
    out = tmp_path / "out"
    jang.convert(str(hf), out, "JANG_3M", progress=False)
    model, _ = jang.load(str(out))
    records = json.loads((out / "config.json").read_text())["quantization"]
    assert records["model.layers.0.mlp.gate"] is False  # router stays float
    layer = model.model.layers[1].mlp.switch_mlp.gate_proj
    assert layer.weight.shape[0] == TINY_QWEN3_MOE["num_experts"] and layer.bits == plan["model.layers.1.mlp.switch_mlp.gate_proj"].bits
    x = mx.array([[5, 6, 7, 8, 9]])
    assert mx.array_equal(model(x), reference(x))


# ---------------------------------------------------------------- GPTQ, layer by layer

def test_gptq_streams_layer_by_layer_same_tensors_as_in_memory(tmp_path, tiny_llama):
    """The streamed GPTQ (one layer's weights + calibration activations in memory) gives
    the very tensors of jang.quantize's in-memory GPTQ; a kill mid-stage resumes to the
    same bytes."""
    out = tmp_path / "out"
    jang.convert(str(tiny_llama), out, "JANG_4M", method="gptq", progress=False, max_shard_bytes=SHARD)
    model, _ = mlx_utils.load_model(tiny_llama, lazy=True)
    plan = jang.quantize(model, "JANG_4M", method="gptq", tokenizer=mlx_utils.load_tokenizer(tiny_llama), progress=False)
    streamed, _ = jang.load(str(out))
    a, b = dict(tree_flatten(streamed.parameters())), dict(tree_flatten(model.parameters()))
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]) for k in a)
    records = json.loads((out / "config.json").read_text())
    assert plan["model.layers.1.mlp.down_proj"].method == "gptq"
    assert "used mse" in plan["model.embed_tokens"].note and records["quantization"]["group_size"] == 64

    resumed = tmp_path / "resumed"
    r = subprocess.run(convert_cmd(tiny_llama, resumed, "--method", "gptq", "--progress", "none"),
                       env={**os.environ, "PYTHONPATH": str(ROOT), "JANG_KILL_AT_STEP": "9"})  # in layer 1 of GPTQ
    assert r.returncode == -9 and not resumed.exists()
    assert (tmp_path / ".resumed.jang-partial" / "gptq").is_dir()
    jang.convert(str(tiny_llama), resumed, "JANG_4M", method="gptq", progress=False, resume=True,
                 max_shard_bytes=SHARD)
    same_folders(resumed, out)


TINY_GEMMA3 = {**TINY_LLAMA, "model_type": "gemma3_text", "head_dim": 16, "query_pre_attn_scalar": 16,
               "sliding_window": 32, "sliding_window_pattern": 2}


@pytest.mark.parametrize("tied", [True, False])
def test_gemma3_gptq_streams_same_tensors_as_in_memory(tmp_path, smollm2_float, monkeypatch, tied):
    """Gemma 3 streams too, to the tensors of in-memory GPTQ: its sliding-window and global
    layers are called with different masks (a 32-token window on 128-token calibration
    chunks), layer 0's input is the embedding scaled by sqrt(hidden), and the head is
    tied (mse on the float activations) or untied (GPTQ on the quantized stream)."""
    source = make_tiny_model(tmp_path / "gemma", TINY_GEMMA3, smollm2_float)
    if tied:  # as Gemma checkpoints ship: mlx-lm's sanitize ties the head when lm_head.weight is absent
        weights = mx.load(str(source / "model.safetensors"))
        del weights["lm_head.weight"]
        mx.save_safetensors(str(source / "model.safetensors"), weights)
    staged = []
    real_stage = stream_gptq.gptq_stage
    monkeypatch.setattr(stream_gptq, "gptq_stage", lambda *a, **k: staged.append(1) or real_stage(*a, **k))
    out = tmp_path / "out"
    jang.convert(str(source), out, "JANG_4M", method="gptq", progress=False)
    assert staged, "gemma3_text should take the streaming GPTQ path"
    model, _ = mlx_utils.load_model(source, lazy=True)
    plan = jang.quantize(model, "JANG_4M", method="gptq", tokenizer=mlx_utils.load_tokenizer(source), progress=False)
    assert plan["model.layers.1.mlp.down_proj"].method == "gptq"
    streamed, _ = jang.load(str(out))
    a, b = dict(tree_flatten(streamed.parameters())), dict(tree_flatten(model.parameters()))
    assert a.keys() == b.keys() and ("lm_head.weight" in a) != tied
    assert all(mx.array_equal(a[k], b[k]) for k in a)
