"""Reading and writing a JANG folder.

A JANG folder is an mlx-lm folder first (see docs/format.md):
  config.json                 mlx-lm config; ``quantization`` = default + per-module overrides
  model[-0000i-of-0000n].safetensors   MLX-native tensors; each header's ``__metadata__``
                              holds ``jang_format_version`` and ``jang_tensors`` (JSON:
                              module path -> {bits, group_size, method, role, note})
  model.safetensors.index.json
  jang_config.json            summary: profile, method, source, true average bits, per-role totals
  tokenizer files
"""

import json
import math
import struct
from collections import Counter, defaultdict
from pathlib import Path

from mlx.utils import tree_flatten

from .errors import CorruptShardError, HeaderMismatchError, ModelNotFoundError

FORMAT_VERSION = "1"
MAX_SHARD_BYTES = 5 * 1024**3
SHARD_RECORDS_KEY = "jang_tensors"
SHARD_VERSION_KEY = "jang_format_version"
JANG_CONFIG = "jang_config.json"


# ---------------------------------------------------------------- headers

def read_safetensors_header(path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CorruptShardError(f"{path}: not a safetensors file (only {size} bytes).")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8 or header_len > 100 * 1024**2:
            raise CorruptShardError(f"{path}: header length {header_len} exceeds the file ({size} bytes); truncated or corrupt.")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptShardError(f"{path}: unreadable safetensors header ({e}).") from None
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end != size:
        raise CorruptShardError(
            f"{path}: header says {8 + header_len + data_end} bytes but the file has {size}; truncated or corrupt."
        )
    return header


def shard_files(folder) -> list:
    folder = Path(folder)
    files = sorted(folder.glob("model*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        named = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        missing = [f.name for f in named if not f.exists()]
        if missing:
            raise CorruptShardError(f"{index}: names shards that are missing: {', '.join(missing)}")
    return files


def read_folder(folder):
    """Headers only: (records, tensors) for a folder.

    records: module path -> record from the shard headers (empty for non-JANG folders)
    tensors: tensor name -> {"dtype", "shape", "nbytes", "shard"}
    """
    records, tensors = {}, {}
    for shard in shard_files(folder):
        header = read_safetensors_header(shard)
        meta = header.pop("__metadata__", None) or {}
        if SHARD_RECORDS_KEY in meta:
            try:
                records.update(json.loads(meta[SHARD_RECORDS_KEY]))
            except json.JSONDecodeError as e:
                raise CorruptShardError(f"{shard}: unreadable {SHARD_RECORDS_KEY} metadata ({e}).") from None
        for name, info in header.items():
            start, end = info["data_offsets"]
            tensors[name] = {"dtype": info["dtype"], "shape": info["shape"], "nbytes": end - start, "shard": shard.name}
    return records, tensors


# ---------------------------------------------------------------- config <-> records

def quantization_config(records: dict) -> dict:
    """mlx-lm's ``quantization`` block: the commonest (bits, group) by parameters as
    default, one override per module that differs, False for modules kept float."""
    weight = Counter()
    for r in records.values():
        if r["bits"] is not None:
            weight[(r["bits"], r["group_size"])] += math.prod(r["shape"])
    bits, group = weight.most_common(1)[0][0] if weight else (4, 64)
    quant = {"group_size": group, "bits": bits, "mode": "affine"}
    for path, r in records.items():
        if r["bits"] is None:
            quant[path] = False
        elif (r["bits"], r["group_size"]) != (bits, group):
            quant[path] = {"group_size": r["group_size"], "bits": r["bits"]}
    return quant


def expected_quantization(quant: dict, path: str):
    """(bits, group) the config gives a module, None if float, '?' if the config is silent."""
    if path in quant:
        v = quant[path]
        return None if v is False else (v.get("bits", quant["bits"]), v.get("group_size", quant["group_size"]))
    return (quant["bits"], quant["group_size"])


def validate_folder(folder, config: dict):
    """Raise HeaderMismatchError when shard records disagree with config.json or with
    the stored tensor shapes. Returns (records, tensors)."""
    records, tensors = read_folder(folder)
    if not records:
        return records, tensors
    quant = config.get("quantization")
    if quant is None:
        raise HeaderMismatchError(f"{folder}/config.json has no 'quantization' block but the shard headers record quantized tensors.")
    for path, r in records.items():
        want = None if r["bits"] is None else (r["bits"], r["group_size"])
        got = expected_quantization(quant, path)
        if path not in quant and r["bits"] is None:
            got = None if f"{path}.scales" not in tensors else got
        if want != got:
            raise HeaderMismatchError(
                f"{folder}/{tensors.get(path + '.weight', {}).get('shard', '?')}: header records {path} as "
                f"{_fmt(want)} but config.json says {_fmt(got)}."
            )
        if want is not None:
            _check_packed_shape(folder, path, r, tensors)
    for path, v in quant.items():
        if isinstance(v, dict) and path not in records:
            raise HeaderMismatchError(f"{folder}/config.json overrides {path} but no shard header records it.")
    return records, tensors


def _fmt(bg):
    return "float" if bg is None else f"{bg[0]}-bit group {bg[1]}"


def _check_packed_shape(folder, path, r, tensors):
    w, s = tensors.get(f"{path}.weight"), tensors.get(f"{path}.scales")
    if w is None or s is None:
        raise HeaderMismatchError(f"{folder}: header records {path} as quantized but its weight or scales are missing.")
    in_from_weight = w["shape"][-1] * 32 // r["bits"]
    in_from_scales = s["shape"][-1] * r["group_size"]
    if in_from_weight != in_from_scales or w["dtype"] != "U32":
        raise HeaderMismatchError(
            f"{folder}/{w['shard']}: {path} is recorded as {r['bits']}-bit group {r['group_size']}, "
            f"but its stored shapes (weight {w['shape']}, scales {s['shape']}) do not fit that."
        )


# ---------------------------------------------------------------- statistics

def bit_stats(records: dict, tensors: dict) -> dict:
    """True average bits of the quantized tensors as stored (packed weight + scales +
    biases), per role and overall, from shard headers alone."""
    per_role = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0, "bits": Counter()})
    q_params = q_bytes = 0
    for path, r in records.items():
        role = per_role[r["role"]]
        role["tensors"] += 1
        names = [f"{path}.{k}" for k in ("weight", "scales", "biases")]
        nbytes = sum(tensors[n]["nbytes"] for n in names if n in tensors)
        params = math.prod(r["shape"])
        role["params"] += params
        role["bytes"] += nbytes
        role["bits"][str(r["bits"] or "float")] += 1
        if r["bits"] is not None:
            q_params += params
            q_bytes += nbytes
    total_bytes = sum(t["nbytes"] for t in tensors.values())
    total_params = sum(_params_of(name, t, records) for name, t in tensors.items())
    roles = {
        k: {**v, "bits": dict(v["bits"]), "avg_bits": 8 * v["bytes"] / v["params"]}
        for k, v in sorted(per_role.items())
    }
    return {
        "avg_bits": 8 * q_bytes / q_params if q_params else None,
        "quantized_params": q_params,
        "quantized_bytes": q_bytes,
        "model_bits_per_weight": 8 * total_bytes / total_params if total_params else None,
        "total_params": total_params,
        "total_bytes": total_bytes,
        "roles": roles,
    }


def _params_of(name, t, records):
    module, _, kind = name.rpartition(".")
    r = records.get(module)
    if r is not None and r["bits"] is not None:
        return math.prod(r["shape"]) if kind == "weight" else 0
    return math.prod(t["shape"])


# ---------------------------------------------------------------- writing

def plan_records(plan) -> dict:
    return {
        t.path: {"bits": t.bits, "group_size": t.group_size, "method": t.method,
                 "role": t.role, "shape": list(t.shape), "note": t.note}
        for t in plan
    }


def shard_metadata(records: dict, names) -> dict:
    """A shard's ``__metadata__``: the JANG records of the modules whose weight it holds."""
    meta = {"format": "mlx"}
    if records is not None:
        names = set(names)
        shard_records = {p: r for p, r in records.items() if f"{p}.weight" in names}
        meta.update({SHARD_VERSION_KEY: FORMAT_VERSION, SHARD_RECORDS_KEY: json.dumps(shard_records)})
    return meta


def write_weights(folder, weights: dict, records: dict = None, max_shard_bytes: int = MAX_SHARD_BYTES):
    """Write tensors as ~5 GB shards plus an index; each shard's header carries the
    JANG records of the modules whose weight it holds. Same bytes as the streaming
    converter writes (jang.shards)."""
    from .shards import TensorSpec, layout, write_index, write_shard

    folder = Path(folder)
    shards = layout([TensorSpec(k, a.dtype, tuple(a.shape)) for k, a in weights.items()], max_shard_bytes)
    for name, specs in shards:
        write_shard(folder / name, specs, shard_metadata(records, (s.name for s in specs)), weights.__getitem__)
    write_index(folder, shards)


def write_model_weights(folder, model, records: dict, max_shard_bytes: int = MAX_SHARD_BYTES):
    write_weights(folder, dict(tree_flatten(model.parameters())), records, max_shard_bytes)


write_float_weights = write_weights


def write_config(folder, config: dict, records: dict):
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config", "_name_or_path")}
    if records:
        quant = quantization_config(records)
        config["quantization"] = quant
        config["quantization_config"] = quant
    (Path(folder) / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))


def write_jang_config(folder, plan, source=None, extra=None) -> dict:
    records, tensors = read_folder(folder)
    stats = bit_stats(records, tensors)
    summary = {
        "format": "jang",
        "format_version": FORMAT_VERSION,
        "profile": plan.profile,
        "method": plan.method,
        "group_size": plan.group_size,
        **({"tuning": plan.tuning} if plan.tuning else {}),
        "source": str(source) if source else None,
        "avg_bits_note": "bytes of packed weights + scales + biases as stored x 8 / parameters of the quantized tensors",
        **stats,
        **(extra or {}),
    }
    (Path(folder) / JANG_CONFIG).write_text(json.dumps(summary, indent=2))
    return summary


def is_model_folder(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").exists() and any(path.glob("model*.safetensors"))


def require_model_folder(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file or folder.")
    if not is_model_folder(path):
        raise ModelNotFoundError(f"{path}: not a model folder (needs config.json and model*.safetensors).")
    return path

