"""The JANG folder: round trip through both loaders, headers, average bits, errors."""

import json
import struct
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm import utils as mlx_utils
from safetensors import safe_open

import jang
from jang.cli import main as cli
from jang.errors import (CorruptShardError, HeaderMismatchError, ModelNotFoundError, NonFiniteWeightError,
                         OutputExistsError, UnsupportedArchitectureError)
from jang.format import expected_quantization

PROMPT = [[1, 504, 3458, 314, 253, 2126, 28, 39546, 284, 1250]]


def quantize_and_save(src: Path, out: Path, profile="JANG_2M", **kw):
    model, config = mlx_utils.load_model(src, lazy=True)
    tok = mlx_utils.load_tokenizer(src)
    plan = jang.quantize(model, profile, progress=False)
    summary = jang.save(model, tok, out, config, **kw)
    return model, plan, summary


def test_roundtrip_logits_identical(tmp_path, tiny_llama, reference_kernels):
    out = tmp_path / "q"
    model, plan, _ = quantize_and_save(tiny_llama, out)
    x = mx.array(PROMPT)
    in_memory = model(x)
    m1, _ = jang.load(str(out))
    m2, _ = mlx_lm.load(str(out))
    assert type(m1.model.layers[0].self_attn.q_proj).__module__ == "jang.layers"
    assert mx.array_equal(m1(x), m2(x))
    assert mx.array_equal(m1(x), in_memory)
    for t in plan:  # stock mlx-lm built each layer with the recorded bits
        assert dict(m2.named_modules())[t.path].bits == t.bits


def test_scales_are_fp16_never_fp32(tmp_path, tiny_llama):
    out = tmp_path / "q"
    quantize_and_save(tiny_llama, out)
    with safe_open(str(out / "model.safetensors"), "numpy") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    scale_dtypes = {v for k, v in dtypes.items() if k.endswith((".scales", ".biases"))}
    assert scale_dtypes == {"F16"}


def test_bf16_model_keeps_bf16_scales(tmp_path, smollm2_float):
    from conftest import TINY_LLAMA, make_tiny_model

    src = make_tiny_model(tmp_path / "bf16", {**TINY_LLAMA, "torch_dtype": "bfloat16"}, smollm2_float, dtype=mx.bfloat16)
    model, _ = mlx_utils.load_model(src, lazy=True)
    jang.quantize(model, "JANG_3M", progress=False)
    assert model.model.layers[0].mlp.up_proj.scales.dtype == mx.bfloat16


def test_average_bits_match_an_independent_count(tmp_path, tiny_llama, capsys):
    out = tmp_path / "q"
    _, plan, summary = quantize_and_save(tiny_llama, out, profile="JANG_3S")
    float_model, _ = mlx_utils.load_model(tiny_llama, lazy=True)
    float_params = {p: m.weight.size for p, m in float_model.named_modules() if hasattr(m, "to_quantized")}
    nbytes = params = 0
    with safe_open(str(out / "model.safetensors"), "numpy") as f:
        for key in f.keys():
            if key.endswith(".scales"):
                module = key[: -len(".scales")]
                for part in ("weight", "scales", "biases"):
                    nbytes += f.get_tensor(f"{module}.{part}").nbytes
                params += float_params[module]
    independent = nbytes * 8 / params
    assert summary["avg_bits"] == pytest.approx(independent, rel=1e-12)
    assert json.loads((out / "jang_config.json").read_text())["avg_bits"] == pytest.approx(independent, rel=1e-12)
    assert cli(["inspect", str(out)]) == 0
    assert f"average bits of quantized tensors: {independent:.3f}" in capsys.readouterr().out


def test_inspect_reads_the_same_bits_as_config(tmp_path, tiny_llama, capsys):
    out = tmp_path / "q"
    _, plan, _ = quantize_and_save(tiny_llama, out, profile="JANG_4S")
    assert cli(["inspect", "--json", str(out)]) == 0
    records = json.loads(capsys.readouterr().out)["records"]
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert set(records) == {t.path for t in plan}
    for path, r in records.items():
        want = None if r["bits"] is None else (r["bits"], r["group_size"])
        assert expected_quantization(quant, path) == want


def test_sharding_writes_an_index_and_records_per_shard(tmp_path, tiny_llama, reference_kernels):
    from jang import format as fmt

    model, config = mlx_utils.load_model(tiny_llama, lazy=True)
    tok = mlx_utils.load_tokenizer(tiny_llama)
    plan = jang.quantize(model, "JANG_4M", progress=False)
    out = tmp_path / "sharded"
    out.mkdir()
    fmt.write_model_weights(out, model, fmt.plan_records(plan), max_shard_bytes=200_000)
    tok.save_pretrained(str(out))
    fmt.write_config(out, config, fmt.plan_records(plan))
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    records, _ = fmt.read_folder(out)
    assert set(records) == {t.path for t in plan}
    x = mx.array(PROMPT)
    assert mx.array_equal(jang.load(str(out))[0](x), model(x))


def test_truncated_shard_is_a_clear_error(tmp_path, tiny_llama):
    out = tmp_path / "q"
    quantize_and_save(tiny_llama, out)
    shard = out / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptShardError, match="model.safetensors.*truncated"):
        jang.load(str(out))
    assert cli(["inspect", str(out)]) == 2


def test_garbage_header_is_a_clear_error(tmp_path, tiny_llama):
    out = tmp_path / "q"
    quantize_and_save(tiny_llama, out)
    shard = out / "model.safetensors"
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:16] = b"\xff" * 8
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="model.safetensors"):
        jang.load(str(out))


def test_config_disagreeing_with_headers_is_a_clear_error(tmp_path, tiny_llama):
    out = tmp_path / "q"
    quantize_and_save(tiny_llama, out, profile="JANG_2M")
    cfg = json.loads((out / "config.json").read_text())
    path = "model.layers.1.self_attn.q_proj"
    cfg["quantization"][path] = {"group_size": 64, "bits": 4}  # headers say 8
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HeaderMismatchError, match=f"{path}.*8-bit.*config.json says 4-bit"):
        jang.load(str(out))


def test_header_record_disagreeing_with_config_is_a_clear_error(tmp_path, tiny_llama):
    out = tmp_path / "q"
    quantize_and_save(tiny_llama, out, profile="JANG_2M")
    shard = out / "model.safetensors"
    arrays, meta = mx.load(str(shard), return_metadata=True)
    records = json.loads(meta["jang_tensors"])
    records["model.layers.0.mlp.up_proj"]["bits"] = 3
    meta["jang_tensors"] = json.dumps(records)
    mx.save_safetensors(str(shard), arrays, metadata=meta)
    with pytest.raises(HeaderMismatchError, match="model.safetensors.*mlp.up_proj.*3-bit"):
        jang.load(str(out))


def test_missing_path_and_non_model_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        jang.load(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a model folder"):
        jang.load(str(tmp_path / "empty"))


def test_unknown_architecture_names_the_model_type(tmp_path, tiny_llama):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["model_type"] = "llamazilla"
    (tiny_llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="llamazilla"):
        jang.load(str(tiny_llama))
    with pytest.raises(UnsupportedArchitectureError, match="llamazilla"):
        jang.convert(str(tiny_llama), tmp_path / "out")


def test_non_finite_weights_are_refused_and_nothing_is_written(tmp_path, tiny_llama):
    weights = mx.load(str(tiny_llama / "model.safetensors"))
    w = weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.1.mlp.up_proj.weight"] = mx.where(mx.arange(w.size).reshape(w.shape) == 7, mx.nan, w)
    mx.save_safetensors(str(tiny_llama / "model.safetensors"), weights)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteWeightError, match="model.layers.1.mlp.up_proj"):
        jang.convert(str(tiny_llama), out, "JANG_4M", progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "jang-partial" in p.name]


def test_existing_output_needs_force(tmp_path, tiny_llama, reference_kernels):
    out = tmp_path / "out"
    jang.convert(str(tiny_llama), out, "JANG_2M", progress=False)
    before = json.loads((out / "jang_config.json").read_text())["profile"]
    with pytest.raises(OutputExistsError, match="--force"):
        jang.convert(str(tiny_llama), out, "JANG_4M", progress=False)
    assert before == "JANG_2M"
    jang.convert(str(tiny_llama), out, "JANG_4M", force=True, progress=False)
    assert json.loads((out / "jang_config.json").read_text())["profile"] == "JANG_4M"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny-llama"]


def test_converting_a_quantized_model_is_refused(tmp_path, tiny_llama):
    out = tmp_path / "out"
    jang.convert(str(tiny_llama), out, "JANG_2M", progress=False)
    with pytest.raises(jang.JangError, match="already quantized"):
        jang.convert(str(out), tmp_path / "again")
