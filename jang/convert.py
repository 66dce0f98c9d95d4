"""``jang.save`` and ``jang.convert``: write a quantized model as a JANG folder.

Everything is written into a hidden temporary folder beside the target and
renamed into place only when complete; ``config.json`` is written last, so a
killed run never leaves anything that loads as a model.
"""

import dataclasses
import json
import shutil
from pathlib import Path

from mlx_lm import utils as mlx_utils

from .assets import ASSETS, DEFAULT_MODEL, fetch_gguf
from .errors import JangError, OutputExistsError
from .format import MAX_SHARD_BYTES, plan_records, write_config, write_jang_config, write_model_weights
from .loader import check_architecture, resolve
from .paths import atomic_folder
from .quantize import quantize

COPIED_FILES = ("generation_config.json",)


def model_config(model) -> dict:
    """config.json content for a model loaded without its config (from ModelArgs)."""
    args = getattr(model, "args", None)
    if args is None or not dataclasses.is_dataclass(args):
        raise JangError("pass config=...: this model carries no ModelArgs to rebuild config.json from.")
    return {k: v for k, v in dataclasses.asdict(args).items() if v is not None}


def check_output(output, force: bool) -> Path:
    output = Path(output)
    if output.exists() and not force:
        raise OutputExistsError(f"{output}: already exists; pass --force (force=True) to replace it.")
    return output


def save(model, tokenizer, path, config: dict = None, plan=None, *, force: bool = False,
         source=None, copy_from=None) -> dict:
    """Write a model quantized by ``jang.quantize`` as a JANG folder; returns jang_config."""
    plan = plan or getattr(model, "jang_plan", None)
    if plan is None:
        raise JangError("this model was not quantized by jang.quantize (no plan); quantize it first.")
    output = check_output(path, force)
    config = dict(config) if config is not None else model_config(model)
    records = plan_records(plan)
    with atomic_folder(output, force=force) as tmp:
        write_model_weights(tmp, model, records)
        tokenizer.save_pretrained(str(tmp))
        for name in COPIED_FILES:
            if copy_from and (Path(copy_from) / name).exists():
                shutil.copy(Path(copy_from) / name, tmp / name)
        summary = write_jang_config(tmp, plan, source)
        write_config(tmp, config, records)  # last: a folder without it is not a model
    return summary


def resolve_source(model) -> Path:
    """A float Hugging Face folder for a folder, a GGUF file, an asset name or a hub id."""
    from .gguf import import_gguf

    if model is None or model in ASSETS:
        return import_gguf(fetch_gguf(model or DEFAULT_MODEL))
    path = Path(model)
    if path.suffix.lower() == ".gguf":
        return import_gguf(path)
    folder = resolve(str(model))
    config = json.loads((folder / "config.json").read_text())
    if "quantization" in config or "quantization_config" in config:
        raise JangError(f"{folder}: this model is already quantized; convert from the float model.")
    check_architecture(config, folder)
    return folder


# Methods that quantize each tensor on its own, so conversion can stream tensor by
# tensor (jang.stream); gptq streams layer by layer where jang.stream_gptq knows the
# model's layer calls; mse and budgets need passes over the whole model.
STREAMING_METHODS = ("rtn",)


def streams(method: str, source: Path) -> bool:
    from .stream_gptq import GPTQ_STREAM_TYPES

    if method in STREAMING_METHODS:
        return True
    model_type = json.loads((Path(source) / "config.json").read_text()).get("model_type")
    return method == "gptq" and model_type in GPTQ_STREAM_TYPES


def convert(model=None, output=None, profile: str = None, *, bits: float = None, method: str = "rtn",
            group_size: int = 64, force: bool = False, progress=True, calibration_files=None,
            resume: bool = False, max_shard_bytes: int = None, tune: int = 0, tune_lr: float = None):
    """Convert a Hugging Face folder / hub id / GGUF file (default: SmolLM2-135M) to a
    JANG folder, with a named profile, a budget profile (JANG_3K) or ``bits``.

    A named profile with rtn streams (jang.stream): memory stays at about one tensor
    whatever the model's size, and ``resume=True`` continues a killed run from its last
    completed shard. progress: True (bar), False, or "json" (JSON lines on stderr).
    tune: steps of tuning the scales and biases toward the float model (jang.tune; 0:
    off); it needs the whole model in memory, so it never streams.
    Returns (output path, jang_config summary)."""
    from .calibration import calibration_chunks
    from .profiles import BUDGETS, get_profile

    if bits is None:
        profile = (profile or "JANG_2M").upper()
        profile = profile if profile in BUDGETS else get_profile(profile).name  # fail fast on a bad name
    label = (profile if bits is None else f"{bits:g}bit") + (f"-tune{tune}" if tune else "")
    output = check_output(output or f"{Path(str(model or DEFAULT_MODEL)).stem}-{label}-{method}", force)
    source = resolve_source(model)
    if bits is None and profile not in BUDGETS and streams(method, source) and not tune:
        from .stream import stream_convert

        summary = stream_convert(source, output, profile, method=method, group_size=group_size, force=force,
                                 resume=resume, progress=progress, source_label=model or DEFAULT_MODEL,
                                 max_shard_bytes=max_shard_bytes or MAX_SHARD_BYTES,
                                 calibration_files=calibration_files)
        return output, summary
    if resume:
        raise JangError(f"--resume needs a streaming conversion (a named profile with rtn, or gptq on a "
                        f"model type of jang.stream_gptq.GPTQ_STREAM_TYPES); {method} with {label} runs in memory.")
    progress = progress is True
    float_model, config = mlx_utils.load_model(source, lazy=True)
    tokenizer = mlx_utils.load_tokenizer(source)
    calibration = calibration_chunks(tokenizer, text_files=calibration_files) if calibration_files else None
    plan = quantize(float_model, profile, bits=bits, method=method, group_size=group_size, tokenizer=tokenizer,
                    calibration=calibration, source=source, progress=progress, tune=tune, tune_lr=tune_lr)
    summary = save(float_model, tokenizer, output, config, plan, force=force,
                   source=model or DEFAULT_MODEL, copy_from=source)
    return output, summary
