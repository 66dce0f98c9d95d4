"""MoE experts: switch layers quantized, routers float, both loaders agree."""

import mlx.core as mx
import mlx_lm
from mlx_lm import utils as mlx_utils

import jang
from jang.layers import QuantizedSwitchLinear

from conftest import make_tiny_model

TINY_QWEN3_MOE = {
    "model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
    "moe_intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "rms_norm_eps": 1e-6, "vocab_size": 49152, "num_experts": 4, "num_experts_per_tok": 2,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "max_position_embeddings": 512, "torch_dtype": "float16",
}


def test_qwen3_moe_experts_quantized_router_float(tmp_path, smollm2_float, reference_kernels):
    src = make_tiny_model(tmp_path / "moe", TINY_QWEN3_MOE, smollm2_float)
    model, config = mlx_utils.load_model(src, lazy=True)
    plan = jang.quantize(model, "JANG_3M", progress=False)
    roles = {t.role: t for t in plan}
    assert roles["router"].bits is None and "float" in roles["router"].note
    assert roles["expert_down"].bits == 3 and roles["attn_q"].bits == 6
    layer = model.model.layers[0].mlp.switch_mlp.down_proj
    assert isinstance(layer, QuantizedSwitchLinear) and layer.bits == 3
    assert type(model.model.layers[0].mlp.gate).__name__ == "Linear"
    x = mx.array([[5, 6, 7, 8, 9]])
    in_memory = model(x)
    out = tmp_path / "moe-q"
    jang.save(model, mlx_utils.load_tokenizer(src), out, config)
    m1, _ = jang.load(str(out))
    m2, _ = mlx_lm.load(str(out))
    assert isinstance(m1.model.layers[1].mlp.switch_mlp.up_proj, QuantizedSwitchLinear)
    assert mx.array_equal(m1(x), m2(x)) and mx.array_equal(m1(x), in_memory)
