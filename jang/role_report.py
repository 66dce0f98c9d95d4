"""``jang inspect --roles``: the role of every tensor of a model folder and the bits a
profile would give it, before converting.

A float Hugging Face folder is opened the way ``jang convert`` opens it: mlx-lm's
own model class, weights mapped lazily (nothing is read, nothing is quantized),
so the paths are the module paths the plan uses. A JANG folder answers from its
shard headers: the roles and bits it was written with.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mlx.utils import tree_flatten
from mlx_lm import utils as mlx_utils

from .allocate import plan_from_profile
from .errors import JangError
from .format import read_folder, require_model_folder
from .loader import check_architecture
from .profiles import BUDGETS, get_profile
from .roles import float_parameters


@dataclass
class RoleRow:
    path: str
    role: str
    bits: Optional[int]  # None: stays float
    group_size: Optional[int]
    shape: tuple
    note: str = ""


def float_folder_rows(folder: Path, profile) -> list:
    """Rows for a float folder: every quantizable module with its planned bits, then
    every parameter outside those modules (norms, SSM state, convs), float."""
    model, _ = mlx_utils.load_model(folder, lazy=True)
    rows = [RoleRow(t.path, t.role, t.bits, t.group_size, t.shape, t.note) for t in plan_from_profile(model, profile)]
    shapes = {name: tuple(a.shape) for name, a in tree_flatten(model.parameters())}
    rows += [RoleRow(name, role, None, None, shapes[name], f"{role} stays float")
             for name, role in float_parameters(model).items()]
    return rows


def jang_folder_rows(records: dict) -> list:
    return [RoleRow(p, r["role"], r["bits"], r["group_size"], tuple(r["shape"]), r.get("note", ""))
            for p, r in records.items()]


def role_rows(model_folder, profile: str = "JANG_4M"):
    """(rows, source) for any model folder; source says where the bits come from."""
    folder = require_model_folder(model_folder)
    config = json.loads((folder / "config.json").read_text())
    check_architecture(config, folder)
    records, _ = read_folder(folder)
    if records:
        return jang_folder_rows(records), "as stored"
    if "quantization" in config or "quantization_config" in config:
        raise JangError(f"{folder}: quantized without JANG records; --roles reads a float folder or a JANG folder.")
    if str(profile).upper() in BUDGETS:
        raise JangError(f"{profile}: a budget profile picks bits from sensitivities measured at conversion; "
                        f"--roles shows named profiles only.")
    profile = get_profile(profile)
    return float_folder_rows(folder, profile), profile.name


def _natural(path: str):
    """Sort key that puts layer 2 before layer 10."""
    return [int(part) if part.isdigit() else part for part in path.split(".")]


def format_rows(rows: list, source: str) -> str:
    rows = sorted(rows, key=lambda r: _natural(r.path))
    width = max([len(r.path) for r in rows] + [24]) + 2
    out = [f"{'tensor':<{width}}{'role':<18}{'bits (' + source + ')':<20}shape"]
    for r in rows:
        bits = "float" if r.bits is None else f"{r.bits}-bit g{r.group_size}"
        why = f"  ({r.note})" if r.bits is None and r.note and "stays float" not in r.note else ""
        out.append(f"{r.path:<{width}}{r.role:<18}{bits:<20}{'x'.join(map(str, r.shape))}{why}")
    quantized = sum(r.bits is not None for r in rows)
    out.append(f"{len(rows)} tensors: {quantized} quantized, {len(rows) - quantized} float; "
               f"{len({r.role for r in rows})} roles")
    unknown = [r.path for r in rows if r.role == "other"]
    if unknown:
        out.append(f"warning: {len(unknown)} tensors match no role pattern (given the MLP bits): {', '.join(unknown[:5])}")
    return "\n".join(out)
