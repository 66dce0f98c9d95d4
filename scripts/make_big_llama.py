"""Write a Llama-shaped model with random bf16 weights, shard by shard, never holding
more than one tensor in memory -- the input for scripts/scale_bench.py.

    python scripts/make_big_llama.py /tmp/big-llama --layers 17   # ~30 GB

Weights are N(0, 0.02) values drawn once into a 64 Mi-value pool and laid down at a
different rotation per tensor: random enough for quantization to do real work, and
generation runs at disk speed. The tokenizer is SmolLM2's (vocab 49152).
"""

import argparse
import json
import shutil
import sys
import time
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jang.shards import TensorSpec, layout, write_index, write_shard  # noqa: E402

SHAPE_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8}


def llama_config(layers: int, vocab: int = 49152, **shape) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": layers,
            "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", **SHAPE_70B, **shape}


def llama_tensors(c: dict):
    """Hugging Face tensor names and shapes of a Llama checkpoint."""
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    yield "model.embed_tokens.weight", (v, h)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        yield from [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                    (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i))]


def write_model(folder: Path, config: dict, tokenizer_from: Path, shard_bytes: int = 5 * 10**9, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(1 << 26, dtype=np.float32) * 0.02).astype(np.float32)
    pool = (pool.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits (truncated fp32)
    shapes = dict(llama_tensors(config))

    def produce(name):
        n = int(np.prod(shapes[name]))
        if name.endswith("norm.weight"):
            return mx.ones(shapes[name], dtype=mx.bfloat16)
        start = zlib.crc32(name.encode()) % len(pool)
        data = np.resize(np.roll(pool, -start), n).reshape(shapes[name])
        return mx.array(data).view(mx.bfloat16)

    shards = layout([TensorSpec(k, mx.bfloat16, s) for k, s in shapes.items()], shard_bytes)
    for name, specs in shards:
        t = time.time()
        write_shard(folder / name, specs, {"format": "pt"}, produce)
        print(f"{name}: {sum(s.nbytes for s in specs) / 1e9:.2f} GB in {time.time() - t:.0f} s", flush=True)
    write_index(folder, shards)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / f).exists():
            shutil.copy(tokenizer_from / f, folder / f)
    return folder


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--layers", type=int, default=17)
    ap.add_argument("--hidden", type=int, default=SHAPE_70B["hidden_size"])
    ap.add_argument("--intermediate", type=int, default=SHAPE_70B["intermediate_size"])
    ap.add_argument("--heads", type=int, default=SHAPE_70B["num_attention_heads"])
    ap.add_argument("--kv-heads", type=int, default=SHAPE_70B["num_key_value_heads"])
    ap.add_argument("--tokenizer-from", type=Path, default=None, help="folder with tokenizer.json (default: SmolLM2's import)")
    args = ap.parse_args()
    tok = args.tokenizer_from
    if tok is None:
        from jang.assets import fetch_gguf
        from jang.gguf import import_gguf

        tok = import_gguf(fetch_gguf("smollm2-135m"), progress=False)
    config = llama_config(args.layers, hidden_size=args.hidden, intermediate_size=args.intermediate,
                          num_attention_heads=args.heads, num_key_value_heads=args.kv_heads)
    write_model(args.folder, config, Path(tok))


if __name__ == "__main__":
    main()
