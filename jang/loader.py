"""``jang.load``: a drop-in for ``mlx_lm.load`` that checks JANG headers and runs
JANG's layers."""

from pathlib import Path
from typing import Any, Dict, Optional

import mlx.core as mx
from mlx_lm import utils as mlx_utils

from .errors import CorruptShardError, JangError, ModelNotFoundError, UnsupportedArchitectureError
from .format import require_model_folder, validate_folder
from .layers import adopt_all


def resolve(path_or_hf_repo: str, revision: Optional[str] = None) -> Path:
    """A local model folder, fetched from the Hugging Face hub when not local."""
    path = Path(path_or_hf_repo)
    if path.exists():
        return require_model_folder(path)
    if path.is_absolute() or str(path_or_hf_repo).startswith((".", "~")) or str(path_or_hf_repo).count("/") != 1:
        raise ModelNotFoundError(f"{path_or_hf_repo}: no such file or folder.")
    try:
        return require_model_folder(mlx_utils._download(str(path_or_hf_repo), revision=revision))
    except JangError:
        raise
    except Exception as e:  # network, auth, missing repo
        raise ModelNotFoundError(
            f"{path_or_hf_repo}: not a local folder, and fetching it from the Hugging Face hub failed ({type(e).__name__}: {e})."
        ) from None


def check_architecture(config: dict, where) -> None:
    """Raise UnsupportedArchitectureError unless mlx-lm has a model class for config's
    model_type and config holds the keys that class's ModelArgs needs."""
    model_type = config.get("model_type")
    try:
        _, args_cls = mlx_utils._get_classes(config)
    except (ValueError, KeyError) as e:
        raise UnsupportedArchitectureError(
            f"{where}/config.json: model_type {model_type!r} is not an architecture mlx-lm knows ({e})."
        ) from None
    try:
        args_cls.from_dict(config)
    except TypeError as e:  # a required ModelArgs field missing from config.json
        raise UnsupportedArchitectureError(
            f"{where}/config.json: mlx-lm's {model_type!r} model cannot be built from this config ({e})."
        ) from None


def load_model(model_path: Path, lazy: bool = True, model_config: Optional[dict] = None):
    """(model, config) built by mlx-lm's own classes, with JANG's layers swapped in."""
    config = mlx_utils.load_config(model_path)
    if model_config:
        config.update(model_config)
    check_architecture(config, model_path)
    validate_folder(model_path, config)
    try:
        model, config = mlx_utils.load_model(model_path, lazy=True, model_config=model_config)
    except (ValueError, RuntimeError, OSError) as e:
        raise CorruptShardError(f"{model_path}: mlx-lm could not load the weights ({e}).") from None
    adopt_all(model)
    if not lazy:
        mx.eval(model.parameters())
    return model, config


def load(
    path_or_hf_repo: str,
    tokenizer_config: Optional[Dict[str, Any]] = None,
    model_config: Optional[Dict[str, Any]] = None,
    adapter_path: Optional[str] = None,
    lazy: bool = False,
    return_config: bool = False,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
):
    """Load a JANG (or any mlx-lm) model and its tokenizer.

    Same signature and return as ``mlx_lm.load``: ``(model, tokenizer)``, or
    ``(model, tokenizer, config)`` with ``return_config=True``. Weights are
    memory-mapped and stay quantized; with ``lazy=True`` nothing is read until
    first use.
    """
    if trust_remote_code:
        raise JangError("trust_remote_code is not supported by jang.load; use mlx_lm.load for custom model files.")
    model_path = resolve(path_or_hf_repo, revision)
    model, config = load_model(model_path, lazy=True, model_config=model_config)
    if adapter_path is not None:
        model = mlx_utils.load_adapters(model, adapter_path)
        model.eval()
    if not lazy:
        mx.eval(model.parameters())
    tokenizer = mlx_utils.load_tokenizer(
        model_path, tokenizer_config, eos_token_ids=config.get("eos_token_id", None)
    )
    return (model, tokenizer, config) if return_config else (model, tokenizer)
