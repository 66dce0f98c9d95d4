"""Tensor roles: what a weight does in the model, from its module path.

Paths are mlx-lm module paths (``model.layers.3.self_attn.q_proj``). The first
matching row of ``ROLE_PATTERNS`` wins; rows are ordered from specific to
general. Each role belongs to one *profile class* (which bits a profile gives
it) or to ``None``: stays float.
"""

import re

import mlx.nn as nn

# (regex searched in the module path, role)
ROLE_PATTERNS = [
    # MoE routers: tiny, and a wrong expert choice costs far more than their bytes.
    (r"(mlp|block_sparse_moe|moe|feed_forward)\.(gate|router)$", "router"),
    (r"shared_expert_gate$", "router"),
    # MoE experts (mlx-lm stacks them into switch layers) and shared experts.
    (r"switch_mlp\.(gate_proj|w1)$", "expert_gate"),
    (r"switch_mlp\.(up_proj|w3)$", "expert_up"),
    (r"switch_mlp\.(down_proj|w2)$", "expert_down"),
    (r"shared_experts?\.(gate_proj|up_proj|down_proj)$", "shared_expert"),
    # Full attention, including fused qkv (Phi-3) and MLA (DeepSeek) projections.
    (r"(self_attn|attention|attn)\.(q_proj|wq|q_a_proj|q_b_proj)$", "attn_q"),
    (r"(self_attn|attention|attn)\.(k_proj|wk)$", "attn_k"),
    (r"(self_attn|attention|attn)\.(v_proj|wv)$", "attn_v"),
    (r"(self_attn|attention|attn)\.(kv_a_proj_with_mqa|kv_b_proj|embed_q|unembed_out)$", "attn_kv_latent"),
    (r"(self_attn|attention|attn)\.(qkv_proj|query_key_value|Wqkv|c_attn)$", "attn_qkv"),
    (r"(self_attn|attention|attn)\.(o_proj|wo|out_proj|dense|c_proj)$", "attn_o"),
    # Linear-attention (gated delta-net) and SSM mixers: the token mixers of
    # hybrid and Mamba models, as sensitive as attention.
    (r"linear_attn\.(in_proj\w*)$", "linear_attn_in"),
    (r"linear_attn\.out_proj$", "linear_attn_out"),
    (r"mixer\.(in_proj|x_proj|dt_proj)$", "ssm_in"),
    (r"mixer\.out_proj$", "ssm_out"),
    (r"conv1d$", "ssm_conv"),
    # Dense MLP.
    (r"(mlp|feed_forward)\.(gate_up_proj)$", "mlp_gate_up"),
    (r"(mlp|feed_forward)\.(gate_proj|w1|fc1)$", "mlp_gate"),
    (r"(mlp|feed_forward)\.(up_proj|w3)$", "mlp_up"),
    (r"(mlp|feed_forward)\.(down_proj|w2|fc2|c_proj)$", "mlp_down"),
    # Vocabulary.
    (r"(embed_tokens|wte|tok_embeddings|embeddings|word_embeddings)$", "embed"),
    (r"(^|\.)(lm_head|output)$", "lm_head"),
]
_COMPILED = [(re.compile(p), role) for p, role in ROLE_PATTERNS]

# role -> profile class (None: never quantized)
PROFILE_CLASS = {
    "attn_q": "attention",
    "attn_k": "attention",
    "attn_v": "attention",
    "attn_o": "attention",
    "attn_qkv": "attention",
    "attn_kv_latent": "attention",
    "linear_attn_in": "attention",
    "linear_attn_out": "attention",
    "ssm_in": "attention",
    "ssm_out": "attention",
    "mlp_gate": "mlp",
    "mlp_up": "mlp",
    "mlp_down": "mlp",
    "mlp_gate_up": "mlp",
    "expert_gate": "mlp",
    "expert_up": "mlp",
    "expert_down": "mlp",
    "shared_expert": "mlp",
    "embed": "embed",
    "lm_head": "lm_head",
    "embed_tied": "embed+lm_head",
    "router": None,
    "ssm_conv": None,
    "other": "mlp",
}


def classify(path: str) -> str:
    """Role of the module at ``path``; ``other`` when no row matches."""
    for pattern, role in _COMPILED:
        if pattern.search(path):
            return role
    return "other"


def quantizable_modules(model: nn.Module):
    """(path, module) for every leaf module MLX can quantize, in model order."""
    return [
        (path, module)
        for path, module in model.named_modules()
        if hasattr(module, "to_quantized") and "weight" in module
    ]


def has_tied_embeddings(model: nn.Module) -> bool:
    """True when one embedding matrix also serves as the output head."""
    # mlx-lm drops the lm_head module when the weights are tied (and Gemma
    # never has one), so a model with an embedding and no head is tied.
    roles = {classify(p) for p, _ in quantizable_modules(model)}
    return "embed" in roles and "lm_head" not in roles


def model_roles(model: nn.Module) -> dict:
    """path -> role for every quantizable module, resolving the tied embedding."""
    tied = has_tied_embeddings(model)
    roles = {}
    for path, _ in quantizable_modules(model):
        role = classify(path)
        if role == "embed" and tied:
            role = "embed_tied"
        roles[path] = role
    return roles
