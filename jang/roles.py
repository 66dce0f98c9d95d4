"""Tensor roles: what a weight does in the model, from its module path.

Paths are mlx-lm module paths (``model.layers.3.self_attn.q_proj``), i.e. after
mlx-lm's ``sanitize`` has stacked experts and renamed checkpoint keys. The first
matching row of ``ROLE_PATTERNS`` wins; rows are ordered from specific to
general. Each role belongs to one *profile class* (which bits a profile gives
it) or to ``None``: stays float. Why each family's tensors get the role they
get: docs/architectures.md.

``FLOAT_ROLE_PATTERNS`` names the parameters that are not weights of a
quantizable module (norms, SSM state parameters, depthwise convolutions,
router parameters held outside a Linear), so every tensor of a model has a role.
"""

import re

import mlx.nn as nn
from mlx.utils import tree_flatten

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
    # Linear attention (gated delta-net: Qwen3-Next, Qwen3.5). It replaces full
    # attention in 3 of 4 layers and has its own MLP after it, so it is the
    # layer's token mixer: attention bits. Listed before full attention, whose
    # `attn.out_proj` row would otherwise match `linear_attn.out_proj`.
    (r"linear_attn\.(in_proj_qkvz|in_proj_qkv|in_proj_z)$", "linear_attn_in"),  # q, k, v and output gate z
    (r"linear_attn\.(in_proj_ba|in_proj_b|in_proj_a)$", "linear_attn_gate"),  # per-head write strength and decay
    (r"linear_attn\.out_proj$", "linear_attn_out"),
    # Full attention, including fused qkv (Phi-3) and MLA (DeepSeek) projections.
    (r"(^|\.)(self_attn|attention|attn)\.(q_proj|wq|q_a_proj|q_b_proj)$", "attn_q"),
    (r"(^|\.)(self_attn|attention|attn)\.(k_proj|wk)$", "attn_k"),
    (r"(^|\.)(self_attn|attention|attn)\.(v_proj|wv)$", "attn_v"),
    (r"(^|\.)(self_attn|attention|attn)\.(kv_a_proj_with_mqa|kv_b_proj|embed_q|unembed_out)$", "attn_kv_latent"),
    (r"(^|\.)(self_attn|attention|attn)\.(qkv_proj|query_key_value|Wqkv|c_attn)$", "attn_qkv"),
    (r"(^|\.)(self_attn|attention|attn)\.(o_proj|wo|out_proj|dense|c_proj)$", "attn_o"),
    # SSM mixers (Mamba, Mamba-2). A Mamba block is attention and gated MLP in one:
    # in_proj (x and its gate z) and out_proj are the block's bulk, like an MLP's
    # up/gate and down; x_proj and dt_proj compute the selection (B, C, step size)
    # that decides what the state keeps and forgets, small and sensitive like q/k.
    (r"mixer\.in_proj$", "ssm_in"),
    (r"mixer\.x_proj$", "ssm_x"),
    (r"mixer\.dt_proj$", "ssm_dt"),
    (r"mixer\.out_proj$", "ssm_out"),
    # Dense MLP.
    (r"(mlp|feed_forward)\.(gate_up_proj)$", "mlp_gate_up"),
    (r"(mlp|feed_forward)\.(gate_proj|w1|fc1)$", "mlp_gate"),
    (r"(mlp|feed_forward)\.(up_proj|w3|c_fc|dense_h_to_4h)$", "mlp_up"),  # GPT-2 / NeoX: no gate
    (r"(mlp|feed_forward)\.(down_proj|w2|fc2|c_proj|dense_4h_to_h)$", "mlp_down"),
    # Vocabulary.
    (r"(embed_tokens|wte|tok_embeddings|embeddings|word_embeddings)$", "embed"),
    (r"(^|\.)(lm_head|output|embed_out)$", "lm_head"),
]
_COMPILED = [(re.compile(p), role) for p, role in ROLE_PATTERNS]

# Parameters outside quantizable modules: (regex searched in the parameter name, role).
# All stay float: MLX cannot quantize a Conv1d, and the rest are vectors or tiny.
FLOAT_ROLE_PATTERNS = [
    (r"conv1d\.(weight|bias)$", "ssm_conv"),  # depthwise causal conv: channels x kernel (4)
    (r"(^|\.)(A_log|D|dt_bias)$", "ssm_state"),  # decay, skip and step-size bias of the recurrence
    (r"\.gate\.(weight|e_score_correction_bias)$", "router"),  # DeepSeek's MoEGate holds a bare matrix
    (r"norm\w*\.(weight|bias)$", "norm"),
]
_FLOAT_COMPILED = [(re.compile(p), role) for p, role in FLOAT_ROLE_PATTERNS]

# role -> profile class (None: never quantized)
PROFILE_CLASS = {
    "attn_q": "attention",
    "attn_k": "attention",
    "attn_v": "attention",
    "attn_o": "attention",
    "attn_qkv": "attention",
    "attn_kv_latent": "attention",
    "linear_attn_in": "attention",
    "linear_attn_gate": "attention",
    "linear_attn_out": "attention",
    "ssm_x": "attention",
    "ssm_dt": "attention",
    "ssm_in": "mlp",
    "ssm_out": "mlp",
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
    "ssm_state": None,
    "norm": None,
    "other": "mlp",  # no row matched: the bulk default, and the plan notes it
}


def classify(path: str) -> str:
    """Role of the module at ``path``; ``other`` when no row matches."""
    for pattern, role in _COMPILED:
        if pattern.search(path):
            return role
    return "other"


def classify_float(name: str) -> str:
    """Role of a parameter outside any quantizable module; ``other`` when no row matches."""
    for pattern, role in _FLOAT_COMPILED:
        if pattern.search(name):
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


def float_parameters(model: nn.Module) -> dict:
    """name -> role for every parameter that no quantizable module holds (these stay float)."""
    owned = {path for path, _ in quantizable_modules(model)}
    return {
        name: classify_float(name)
        for name, _ in tree_flatten(model.parameters())
        if name.rpartition(".")[0] not in owned
    }


def unclassified(model: nn.Module) -> list:
    """Every tensor of model that no role row matches: quantizable module paths and
    float parameter names. Empty for every family JANG covers."""
    return ([p for p, r in model_roles(model).items() if r == "other"]
            + [n for n, r in float_parameters(model).items() if r == "other"])
