"""Profiles and plans: the published per-role bits, tied embeddings, group fallback."""

from pathlib import Path

import mlx.nn as nn
import pytest
from mlx_lm import utils as mlx_utils

import jang
from jang.allocate import choose_group_size, plan_from_profile
from jang.errors import UnknownProfileError
from jang.roles import classify

from conftest import TINY_LLAMA, make_tiny_model

PUBLISHED = {  # MLP / attention / embed / lm_head, as published
    "JANG_1L": (2, 8, 8, 8), "JANG_2S": (2, 6, 4, 6), "JANG_2M": (2, 8, 4, 8), "JANG_2L": (2, 8, 6, 8),
    "JANG_3S": (3, 4, 4, 6), "JANG_3M": (3, 6, 4, 6), "JANG_3L": (3, 8, 4, 8), "JANG_4S": (4, 5, 4, 6),
    "JANG_4M": (4, 6, 4, 6), "JANG_4L": (4, 8, 4, 8), "JANG_6M": (6, 8, 6, 8),
}


def test_profile_table_is_the_published_one():
    assert set(jang.PROFILES) == set(PUBLISHED)
    for name, bits in PUBLISHED.items():
        p = jang.get_profile(name)
        assert (p.mlp, p.attention, p.embed, p.lm_head) == bits


def test_unknown_profile_lists_valid_ones():
    with pytest.raises(UnknownProfileError) as e:
        jang.get_profile("JANG_7Q")
    assert "JANG_7Q" in str(e.value) and "JANG_2M" in str(e.value) and "JANG_6M" in str(e.value)


@pytest.mark.real
def test_every_profile_gives_published_bits_on_smollm2(smollm2_float):
    """Quantize the real SmolLM2 with each profile and read the bits off the layers."""
    for name, (mlp, attn, embed, head) in PUBLISHED.items():
        model, _ = mlx_utils.load_model(Path(smollm2_float), lazy=True)
        plan = jang.quantize(model, name, progress=False)
        layers = dict(model.named_modules())
        seen = {}
        for t in plan:
            layer = layers[t.path]
            assert isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)), t.path
            assert layer.bits == t.bits
            seen.setdefault(t.role, set()).add(layer.bits)
        # SmolLM2 ties its embedding and head: one tensor, the higher of the two.
        assert seen == {
            "attn_q": {attn}, "attn_k": {attn}, "attn_v": {attn}, "attn_o": {attn},
            "mlp_gate": {mlp}, "mlp_up": {mlp}, "mlp_down": {mlp}, "embed_tied": {max(embed, head)},
        }, name
        tied = plan["model.embed_tokens"]
        assert "tied" in tied.note and str(embed) in tied.note and str(head) in tied.note


def test_untied_model_gives_embed_and_head_their_own_bits(tmp_path, smollm2_float):
    folder = make_tiny_model(tmp_path / "untied", {**TINY_LLAMA, "tie_word_embeddings": False}, smollm2_float)
    model, _ = mlx_utils.load_model(folder, lazy=True)
    plan = plan_from_profile(model, "JANG_2S")
    assert plan["model.embed_tokens"].role == "embed" and plan["model.embed_tokens"].bits == 4
    assert plan["lm_head"].role == "lm_head" and plan["lm_head"].bits == 6


def test_group_size_falls_back_or_stays_float(tmp_path, smollm2_float):
    # down_proj input 96: 64 does not divide it, 32 does. 80: nothing divides -> float.
    for inter, expect_bits, expect_group in ((96, 2, 32), (80, None, None)):
        folder = make_tiny_model(tmp_path / f"i{inter}", {**TINY_LLAMA, "intermediate_size": inter}, smollm2_float)
        model, _ = mlx_utils.load_model(folder, lazy=True)
        plan = jang.quantize(model, "JANG_2M", progress=False)
        down = plan["model.layers.0.mlp.down_proj"]
        assert (down.bits, down.group_size) == (expect_bits, expect_group)
        assert str(inter) in down.note  # recorded, with the reason
        layer = dict(model.named_modules())["model.layers.0.mlp.down_proj"]
        assert isinstance(layer, nn.QuantizedLinear) == (expect_bits is not None)
        out = model(__import__("mlx.core").core.array([[1, 2, 3]]))
        assert out.shape == (1, 3, TINY_LLAMA["vocab_size"])


def test_choose_group_size():
    assert choose_group_size(576, 64) == 64
    assert choose_group_size(576, 128) == 64
    assert choose_group_size(96, 64) == 32
    assert choose_group_size(100, 64) is None


@pytest.mark.parametrize("path,role", [
    ("model.layers.0.self_attn.q_proj", "attn_q"),
    ("model.layers.0.self_attn.o_proj", "attn_o"),
    ("model.layers.0.self_attn.qkv_proj", "attn_qkv"),
    ("model.layers.0.mlp.gate_proj", "mlp_gate"),
    ("model.layers.0.mlp.gate_up_proj", "mlp_gate_up"),
    ("model.layers.0.mlp.gate", "router"),
    ("model.layers.0.mlp.switch_mlp.down_proj", "expert_down"),
    ("model.layers.0.mlp.shared_expert.up_proj", "shared_expert"),
    ("model.layers.0.mlp.shared_expert_gate", "router"),
    ("model.layers.0.block_sparse_moe.gate", "router"),
    ("model.layers.0.linear_attn.in_proj_qkvz", "linear_attn_in"),
    ("model.layers.0.linear_attn.in_proj_ba", "linear_attn_gate"),
    ("model.layers.0.linear_attn.out_proj", "linear_attn_out"),
    ("backbone.layers.0.mixer.in_proj", "ssm_in"),
    ("backbone.layers.0.mixer.x_proj", "ssm_x"),
    ("backbone.layers.0.mixer.dt_proj", "ssm_dt"),
    ("backbone.layers.0.mixer.out_proj", "ssm_out"),
    ("model.layers.0.self_attn.embed_q", "attn_kv_latent"),
    ("model.embed_tokens", "embed"),
    ("lm_head", "lm_head"),
    ("model.h.0.mlp.c_fc", "mlp_up"),
    ("gpt_neox.layers.0.mlp.dense_4h_to_h", "mlp_down"),
    ("embed_out", "lm_head"),
])
def test_roles(path, role):
    assert classify(path) == role
