"""Architecture coverage: every family mlx-lm carries that JANG claims, as a tiny
random-weight model built from mlx-lm's own class and saved as a Hugging Face folder,
converted with a named profile and with a bit budget, loaded by jang.load and by
stock mlx_lm.load, compared and generated from. See docs/architectures.md."""

import json

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm import utils as mlx_utils
from mlx_lm.generate import stream_generate

import jang
from jang.allocate import bits_for_role
from jang.cli import main as cli
from jang.errors import UnsupportedArchitectureError
from jang.evaluate import for_evaluation
from jang.format import read_folder
from jang.loader import load_model
from jang.profiles import get_profile
from jang.roles import PROFILE_CLASS, float_parameters, unclassified

from conftest import make_tiny_model

# Shared by every family; a family's own keys override these: hidden 64, two layers,
# and the first 512 tokens of SmolLM2's vocabulary (every tiny model borrows its
# tokenizer). The small vocabulary keeps the budget's sensitivity pass and the
# output head cheap; prompts are token ids below 512.
VOCAB = 512
BASE = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 512, "rope_theta": 10000.0, "torch_dtype": "float16"}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "decoder_sparse_step": 1,
       "mlp_only_layers": [], "norm_topk_prob": True}
# Gated delta-net: layer 0 linear attention, layer 1 full attention.
GATED_DELTA = {"linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
               "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "full_attention_interval": 2,
               "partial_rotary_factor": 0.25}
# Multi-head latent attention; layer 0 dense MLP, layer 1 routed + shared experts.
MLA = {"num_key_value_heads": 4, "kv_lora_rank": 64, "q_lora_rank": 32, "qk_rope_head_dim": 16,
       "qk_nope_head_dim": 32, "v_head_dim": 32, "n_routed_experts": 4, "n_shared_experts": 1,
       "num_experts_per_tok": 2, "moe_intermediate_size": 32, "first_k_dense_replace": 1, "moe_layer_freq": 1}

# family -> (config keys, roles its plan must contain)
FAMILIES = {
    "llama": ({"model_type": "llama", "tie_word_embeddings": True},
              {"attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "embed_tied"}),
    "mistral": ({"model_type": "mistral", "tie_word_embeddings": False, "sliding_window": 4,
                 "layer_types": ["sliding_attention", "full_attention"]},
                {"attn_q", "attn_o", "mlp_down", "embed", "lm_head"}),
    "qwen2": ({"model_type": "qwen2", "tie_word_embeddings": True}, {"attn_q", "attn_v", "mlp_up", "embed_tied"}),
    "qwen3": ({"model_type": "qwen3", "tie_word_embeddings": False}, {"attn_k", "mlp_gate", "embed", "lm_head"}),
    "qwen3_moe": ({"model_type": "qwen3_moe", **MOE, "tie_word_embeddings": False},
                  {"attn_q", "expert_gate", "expert_up", "expert_down", "router"}),
    "mixtral": ({"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2,
                 "tie_word_embeddings": False},
                {"attn_q", "expert_gate", "expert_up", "expert_down", "router"}),
    "gemma2": ({"model_type": "gemma2", "query_pre_attn_scalar": 16}, {"attn_q", "mlp_down", "embed_tied"}),
    "gemma3_text": ({"model_type": "gemma3_text", "num_key_value_heads": 1, "query_pre_attn_scalar": 16,
                     "sliding_window": 4, "sliding_window_pattern": 2},
                    {"attn_q", "mlp_down", "embed", "lm_head"}),
    "phi3": ({"model_type": "phi3", "tie_word_embeddings": False}, {"attn_qkv", "attn_o", "mlp_gate_up", "mlp_down"}),
    # time_step_rank 32 (real Mamba uses hidden/16) so that dt_proj has a group size and is quantized
    "mamba": ({"model_type": "mamba", "state_size": 16, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True,
               "time_step_rank": 32, "tie_word_embeddings": True},
              {"ssm_in", "ssm_x", "ssm_dt", "ssm_out", "embed_tied"}),
    "mamba2": ({"model_type": "mamba2", "num_heads": 8, "head_dim": 16, "state_size": 16, "conv_kernel": 4,
                "n_groups": 1, "use_bias": False, "use_conv_bias": True, "layer_norm_epsilon": 1e-5,
                "time_step_limit": [0.001, 100.0], "time_step_rank": "auto", "tie_word_embeddings": True},
               {"ssm_in", "ssm_out", "embed_tied"}),
    "qwen3_next": ({"model_type": "qwen3_next", **MOE, **GATED_DELTA, "shared_expert_intermediate_size": 64,
                    "tie_word_embeddings": False},
                   {"linear_attn_in", "linear_attn_gate", "linear_attn_out", "attn_q", "attn_o",
                    "expert_down", "shared_expert", "router"}),
    "qwen3_5": ({"model_type": "qwen3_5", "text_config": {**BASE, "model_type": "qwen3_5_text", **GATED_DELTA,
                                                         "tie_word_embeddings": True}},
                {"linear_attn_in", "linear_attn_gate", "linear_attn_out", "attn_q", "mlp_down", "embed_tied"}),
    "deepseek_v2": ({"model_type": "deepseek_v2", **MLA, "q_lora_rank": None, "topk_method": "greedy",
                     "rope_scaling": {"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 512}},
                    {"attn_q", "attn_kv_latent", "attn_o", "mlp_down", "expert_down", "shared_expert"}),
    "deepseek_v3": ({"model_type": "deepseek_v3", **MLA, "n_group": 1, "topk_group": 1},
                    {"attn_q", "attn_kv_latent", "attn_o", "expert_up", "shared_expert"}),
}

# Relative error of dequantized weights: bounds any b-bit RTN of a random (uniform)
# matrix with room to spare, and is far below what a tensor stored in the wrong
# place would give (~1.4).
MAX_REL_ERROR = {2: 0.6, 3: 0.3, 4: 0.15, 5: 0.08, 6: 0.04, 8: 0.01}


def family_config(family: str) -> dict:
    return {**BASE, **FAMILIES[family][0]}


PROMPT = [1, 57, 200, 311, 42, 499]


def calibration_chunks(n=4, length=32):
    """Token chunks for the budget's sensitivity pass (ids inside the tiny vocabulary)."""
    mx.random.seed(1)
    return mx.random.randint(0, VOCAB, (n, length)).tolist()


def float_weights(folder) -> dict:
    """module path -> float weight of the tiny source model (as mlx-lm holds it)."""
    model, _ = mlx_utils.load_model(folder, lazy=True)
    return {k[: -len(".weight")]: v for k, v in tree_flatten(model.parameters()) if k.endswith(".weight")}


def stored_dequantized(out) -> dict:
    """module path -> (bits, weight dequantized from the stored packed tensors)."""
    tensors = {}
    for shard in out.glob("model*.safetensors"):
        tensors.update(mx.load(str(shard)))
    return {
        path: (r["bits"], mx.dequantize(tensors[f"{path}.weight"], tensors[f"{path}.scales"], tensors[f"{path}.biases"],
                                        group_size=r["group_size"], bits=r["bits"]).astype(mx.float32))
        for path, r in read_folder(out)[0].items() if r["bits"] is not None
    }


def check_folder(out, ours, stock, source_weights):
    """Both loaders give identical logits, equal to the float model holding the
    dequantized weights; every stored tensor dequantizes to its source tensor."""
    x = mx.array([PROMPT])
    logits = ours(x)
    assert mx.array_equal(logits, stock(x))
    reference = for_evaluation(load_model(out)[0])(x)
    err = mx.abs(logits.astype(mx.float32) - reference).max().item()
    assert err <= 2e-2 * mx.abs(reference).max().item() + 1e-3, err
    for path, (bits, w) in stored_dequantized(out).items():
        ref = source_weights[path].astype(mx.float32)
        rel = (mx.linalg.norm((w - ref).flatten()) / mx.linalg.norm(ref.flatten())).item()
        assert rel < MAX_REL_ERROR[bits], (path, bits, rel)


def generate_both(ours, stock, tok, n=3):
    """A few greedy tokens from each loader; with MLX's own kernels they agree."""
    a = [r.token for r in stream_generate(ours, tok, PROMPT, max_tokens=n)]
    b = [r.token for r in stream_generate(stock, tok, PROMPT, max_tokens=n)]
    assert len(a) == n and all(0 <= t < VOCAB for t in a)
    assert a == b


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_roles_convert_load_generate(family, tmp_path, smollm2_float, reference_kernels):
    src = make_tiny_model(tmp_path / family, family_config(family), smollm2_float)
    model, _ = mlx_utils.load_model(src, lazy=True)
    assert unclassified(model) == []  # every quantizable module and float parameter has a role
    source_weights = float_weights(src)

    # A named profile: every tensor gets its role's bits, experts and SSM bulk the MLP's.
    profile = get_profile("JANG_3M")
    out, _ = jang.convert(str(src), tmp_path / "JANG_3M", "JANG_3M", progress=False)
    records = read_folder(out)[0]
    assert FAMILIES[family][1] <= {r["role"] for r in records.values()}
    for path, r in records.items():
        want, _ = bits_for_role(profile, r["role"])
        assert r["bits"] == want or (r["bits"] is None and "kept float" in r["note"]), (path, r)
    ours, tok = jang.load(str(out))
    stock, _ = mlx_lm.load(str(out))
    check_folder(out, ours, stock, source_weights)
    generate_both(ours, stock, tok)

    # A bit budget: sensitivities measured on calibration tokens pick each tensor's bits
    # (jang.quantize + jang.save: what convert --bits runs, with in-vocabulary chunks).
    model, config = mlx_utils.load_model(src, lazy=True)
    jang.quantize(model, bits=3.0, calibration=calibration_chunks(), progress=False)
    out = tmp_path / "3bit"
    summary = jang.save(model, tok, out, config)
    assert summary["avg_bits"] <= 3.0 + 1e-9, summary["avg_bits"]
    assert len({r["bits"] for r in read_folder(out)[0].values() if r["bits"]}) >= 2  # mixed, not uniform
    check_folder(out, load_model(out)[0], mlx_utils.load_model(out)[0], source_weights)


def test_float_parameters_stay_float_with_a_role(tmp_path, smollm2_float):
    """SSM state (A_log, D, dt_bias), depthwise convs and norms are named, and never quantized."""
    src = make_tiny_model(tmp_path / "mamba2", family_config("mamba2"), smollm2_float)
    model, _ = mlx_utils.load_model(src, lazy=True)
    roles = float_parameters(model)
    assert roles["backbone.layers.0.mixer.A_log"] == "ssm_state"
    assert roles["backbone.layers.0.mixer.dt_bias"] == "ssm_state"
    assert roles["backbone.layers.0.mixer.conv1d.weight"] == "ssm_conv"
    assert roles["backbone.layers.0.mixer.norm.weight"] == "norm"
    assert all(PROFILE_CLASS[r] is None for r in roles.values())


def test_inspect_roles_on_a_float_folder(tmp_path, smollm2_float, capsys):
    """jang inspect --roles on a float Hugging Face folder: each tensor's role and the bits
    the profile would give it, with nothing quantized or written."""
    src = make_tiny_model(tmp_path / "qwen3_next", family_config("qwen3_next"), smollm2_float)
    before = sorted(p.name for p in src.iterdir())
    assert cli(["inspect", str(src), "--roles"]) == 0  # default JANG_4M: MLP 4, attention 6
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1:3] for line in out.splitlines()[1:-1]}
    assert lines["model.layers.0.linear_attn.in_proj_qkvz"] == ["linear_attn_in", "6-bit"]
    assert lines["model.layers.0.linear_attn.in_proj_ba"] == ["linear_attn_gate", "6-bit"]
    assert lines["model.layers.1.self_attn.q_proj"] == ["attn_q", "6-bit"]
    assert lines["model.layers.1.mlp.switch_mlp.down_proj"] == ["expert_down", "4-bit"]
    assert lines["model.layers.1.mlp.gate"] == ["router", "float"]
    assert lines["model.layers.0.linear_attn.A_log"] == ["ssm_state", "float"]
    assert "other" not in out
    assert sorted(p.name for p in src.iterdir()) == before

    assert cli(["inspect", str(src), "--roles", "--profile", "JANG_2S", "--json"]) == 0
    rows = {r["path"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["model.layers.0.mlp.shared_expert.up_proj"]["bits"] == 2


def test_inspect_roles_on_a_jang_folder(tmp_path, smollm2_float, capsys):
    src = make_tiny_model(tmp_path / "mamba", family_config("mamba"), smollm2_float)
    out, _ = jang.convert(str(src), tmp_path / "q", "JANG_2M", progress=False)
    assert cli(["inspect", str(out), "--roles"]) == 0
    lines = {line.split()[0]: line.split()[1:3] for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert lines["backbone.layers.0.mixer.in_proj"] == ["ssm_in", "2-bit"]
    assert lines["backbone.layers.1.mixer.x_proj"] == ["ssm_x", "8-bit"]


def test_unknown_architecture_is_named_everywhere(tmp_path, smollm2_float, capsys):
    """A model_type mlx-lm lacks: convert, load and inspect --roles all say which."""
    src = make_tiny_model(tmp_path / "llama", family_config("llama"), smollm2_float)
    (src / "config.json").write_text(json.dumps({**family_config("llama"), "model_type": "not_a_real_arch"}))
    with pytest.raises(UnsupportedArchitectureError, match="not_a_real_arch"):
        jang.convert(str(src), tmp_path / "out", "JANG_4M", progress=False)
    with pytest.raises(UnsupportedArchitectureError, match="not_a_real_arch"):
        jang.load(str(src))
    assert cli(["inspect", str(src), "--roles"]) == 2
    err = capsys.readouterr().err
    assert "not_a_real_arch" in err and "config.json" in err


def test_config_missing_keys_for_a_known_architecture(tmp_path, smollm2_float):
    src = make_tiny_model(tmp_path / "mamba", family_config("mamba"), smollm2_float)
    config = family_config("mamba")
    del config["state_size"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="'mamba'.*state_size"):
        jang.convert(str(src), tmp_path / "out", "JANG_4M", progress=False)


@pytest.mark.parametrize("method", ["mse", "gptq"])
def test_mla_per_head_matrices_with_calibrated_methods(tmp_path, smollm2_float, method):
    """DeepSeek-V3 calls embed_q transposed in prefill, so its inputs run along the
    weight's output axis (kv_lora_rank 64, not qk_nope 32): mse and gptq still quantize it,
    without activation weights (they would not fit)."""
    from mlx_lm.models.mla import QuantizedMultiLinear

    src = make_tiny_model(tmp_path / "deepseek_v3", family_config("deepseek_v3"), smollm2_float)
    model, _ = mlx_utils.load_model(src, lazy=True)
    plan = jang.quantize(model, "JANG_4M", method=method, calibration=calibration_chunks(), progress=False)
    assert plan["model.layers.0.self_attn.embed_q"].method == "mse"
    assert isinstance(model.model.layers[0].self_attn.embed_q, QuantizedMultiLinear)
    logits = model(mx.array([PROMPT]))
    assert mx.all(mx.isfinite(logits)).item()
    # for_evaluation dequantizes them too (mlx-lm's dequantize_model does not), same numbers
    for_evaluation(model)
    assert not any("scales" in m for _, m in model.named_modules())
    assert mx.allclose(model(mx.array([PROMPT])), logits.astype(mx.float32), atol=5e-2, rtol=5e-2)
