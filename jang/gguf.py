"""GGUF import: a GGUF file -> a float Hugging Face-style folder mlx-lm can load.

Tensors are dequantized with the ``gguf`` package (numpy), renamed to the
Hugging Face names mlx-lm's model classes expect, and undone where llama.cpp
changed them on export (llama's q/k row permutation, Gemma's +1 on norms).
The tokenizer is rebuilt from the file's vocabulary with transformers' GGUF
tokenizer builders. Results are cached, so a second conversion is quick.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import JangError, ModelNotFoundError, UnsupportedArchitectureError
from .format import MAX_SHARD_BYTES
from .paths import atomic_folder, cache_dir

# GGUF block tensor -> Hugging Face module (inside model.layers.N.)
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GEMMA3_BLOCK_NAMES = {
    **BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# GGUF metadata key (after "<arch>.") -> config.json key
CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
    "rope.freq_base": "rope_theta",
}


@dataclass(frozen=True)
class GGUFArch:
    model_type: str
    hf_class: str
    dtype: str  # float dtype of the imported weights
    permute_qk: bool = False  # llama.cpp permutes llama's q/k rows for its RoPE layout
    norm_shift: float = 0.0  # llama.cpp stores Gemma norms as 1 + w
    block_names: dict = field(default_factory=lambda: BLOCK_NAMES)
    extra_config: dict = field(default_factory=dict)


ARCHITECTURES = {
    "llama": GGUFArch("llama", "LlamaForCausalLM", "float16", permute_qk=True),
    "qwen2": GGUFArch("qwen2", "Qwen2ForCausalLM", "bfloat16"),
    "qwen3": GGUFArch("qwen3", "Qwen3ForCausalLM", "bfloat16"),
    # Gemma activations overflow fp16; the model was trained in bf16.
    "gemma3": GGUFArch("gemma3_text", "Gemma3ForCausalLM", "bfloat16", norm_shift=1.0,
                       block_names=GEMMA3_BLOCK_NAMES,
                       extra_config={"hidden_activation": "gelu_pytorch_tanh", "sliding_window_pattern": 6}),
}


def _field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _hf_name(gguf_name: str, arch: GGUFArch) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in arch.block_names:
        return f"model.layers.{parts[1]}.{arch.block_names[parts[2]]}.{suffix}"
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{suffix}"
    raise UnsupportedArchitectureError(f"GGUF tensor {gguf_name!r} has no known Hugging Face name for {arch.model_type}.")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> half-split RoPE)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(reader, path) -> tuple:
    arch_name = _field(reader, "general.architecture")
    if arch_name not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path}: GGUF architecture {arch_name!r} is not supported; supported: {', '.join(ARCHITECTURES)}."
        )
    arch = ARCHITECTURES[arch_name]
    config = {"model_type": arch.model_type, "architectures": [arch.hf_class], "torch_dtype": arch.dtype}
    for key, hf_key in CONFIG_KEYS.items():
        value = _field(reader, f"{arch_name}.{key}")
        if value is not None:
            config[hf_key] = value
    scaling = _field(reader, f"{arch_name}.rope.scaling.type")
    if scaling and scaling != "none":
        config["rope_scaling"] = {"type": scaling, "rope_type": scaling,
                                  "factor": _field(reader, f"{arch_name}.rope.scaling.factor")}
    if arch.model_type == "gemma3_text":
        config["query_pre_attn_scalar"] = config.get("head_dim", 256)
    config.update(arch.extra_config)
    names = {t.name for t in reader.tensors}
    config["tie_word_embeddings"] = "output.weight" not in names
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    config["vocab_size"] = int(embed.shape[-1])
    for key in ("bos_token_id", "eos_token_id"):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            config[key] = int(value)
    return arch, config


def read_weights(reader, arch: GGUFArch, config: dict):
    """Yield (hf_name, float32 numpy array) one tensor at a time."""
    for t in reader.tensors:
        yield _hf_name(t.name, arch), read_tensor(t, arch, config)


def tensor_shape(t) -> tuple:
    """A GGUF tensor's numpy shape (GGUF lists dimensions innermost first)."""
    return tuple(int(d) for d in reversed(t.shape))


def read_tensor(t, arch: GGUFArch, config: dict) -> np.ndarray:
    """One GGUF tensor, dequantized to float32 and undone where llama.cpp changed it."""
    import gguf

    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    name = _hf_name(t.name, arch)
    if arch.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
        w = _unpermute(w, config["num_attention_heads"])
    elif arch.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
        w = _unpermute(w, config["num_key_value_heads"])
    if arch.norm_shift and name.endswith("norm.weight"):
        w = w - arch.norm_shift
    if not np.isfinite(w).all():
        raise JangError(f"GGUF tensor {t.name} dequantizes to NaN/inf values.")
    return w


def build_tokenizer(reader):
    """A transformers tokenizer from the GGUF vocabulary (transformers' own builders)."""
    from transformers.integrations.gguf import gguf_tokenizer_mapping as M

    arch = _field(reader, "general.architecture")
    spec = {name: v for key, name in M.GGUF_TOKENIZER_MAPPING["tokenizer"].items()
            if (v := _field(reader, f"tokenizer.{key}")) is not None}
    extra = {name: v for key, name in M.GGUF_TOKENIZER_MAPPING["tokenizer_config"].items()
             if (v := _field(reader, f"tokenizer.{key}")) is not None}
    tok = M.select_tokenizer_builder(arch, spec.get("tokenizer_type"))(spec)
    tok = M.add_gguf_special_tokens(tok, spec)
    tok = M.set_split_regex(tok, spec)
    for attr, key in M._SPECIAL_TOKENS.items():
        index = _field(reader, f"tokenizer.ggml.{key}")
        if index is not None:
            setattr(tok, attr, spec["tokens"][int(index)])
    if extra.get("chat_template"):
        tok.chat_template = extra["chat_template"]
    # llama.cpp adds BOS/EOS by these flags; the saved tokenizer must do the same
    # (Gemma is badly off without its BOS).
    for flag in ("add_bos_token", "add_eos_token"):
        if extra.get(flag) is not None:
            setattr(tok, flag, bool(extra[flag]))
    return tok


def _cache_key(path: Path) -> str:
    st = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{path.stem}-{digest}"


def import_gguf(path, out_dir=None, progress: bool = True) -> Path:
    """Import a GGUF file as a float Hugging Face folder (cached); returns the folder."""
    import gguf
    import mlx.core as mx
    from tqdm.auto import tqdm

    from .shards import TensorSpec, layout, write_index, write_shard

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: no such GGUF file.")
    out_dir = Path(out_dir) if out_dir else cache_dir("gguf") / _cache_key(path)
    if (out_dir / "config.json").exists():
        return out_dir
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise JangError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}).") from None
    arch, config = read_config(reader, path)
    dtype = getattr(mx, arch.dtype)
    # One tensor at a time: the GGUF is memory-mapped, each tensor is dequantized just
    # before its bytes are written (jang.shards), so a model larger than memory imports.
    tensors = {_hf_name(t.name, arch): t for t in reader.tensors}
    bar = tqdm(total=len(tensors), desc=f"importing {path.name}", unit="tensor", disable=not progress)

    def produce(name):
        bar.update()
        return mx.array(read_tensor(tensors[name], arch, config)).astype(dtype)

    shards = layout([TensorSpec(n, dtype, tensor_shape(t)) for n, t in tensors.items()], MAX_SHARD_BYTES)
    tok = build_tokenizer(reader)
    with atomic_folder(out_dir) as tmp:
        for name, specs in shards:
            write_shard(tmp / name, specs, {"format": "mlx"}, produce)
        write_index(tmp, shards)
        bar.close()
        tok.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir

