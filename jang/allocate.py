"""Plans: the bits and group size chosen for every quantizable tensor.

A plan is data. ``plan_from_profile`` turns a named profile into one; the
quantizers only follow it. Tensors a plan leaves float carry ``bits=None``
and a note that says why.
"""

from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple

import mlx.nn as nn

from .profiles import GROUP_SIZES, Profile, get_profile
from .roles import PROFILE_CLASS, model_roles, quantizable_modules


@dataclass
class TensorPlan:
    path: str
    role: str
    bits: Optional[int]  # None: stays float
    group_size: Optional[int]
    method: str
    shape: Tuple[int, ...]
    note: str = ""

    @property
    def quantized(self) -> bool:
        return self.bits is not None


@dataclass
class Plan:
    tensors: Dict[str, TensorPlan] = field(default_factory=dict)
    profile: Optional[str] = None
    method: str = "rtn"
    group_size: int = 64

    def __iter__(self):
        return iter(self.tensors.values())

    def __getitem__(self, path) -> TensorPlan:
        return self.tensors[path]

    def __len__(self):
        return len(self.tensors)

    def to_dict(self) -> dict:
        return {
            "profile": self.profile,
            "method": self.method,
            "group_size": self.group_size,
            "tensors": {p: asdict(t) for p, t in self.tensors.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        tensors = {
            p: TensorPlan(**{**t, "shape": tuple(t["shape"])})
            for p, t in d["tensors"].items()
        }
        return cls(tensors, d.get("profile"), d.get("method", "rtn"), d.get("group_size", 64))


def choose_group_size(in_dims: int, preferred: int) -> Optional[int]:
    """The preferred group size, else the largest smaller one dividing in_dims."""
    for g in (preferred,) + tuple(g for g in GROUP_SIZES if g < preferred):
        if in_dims % g == 0:
            return g
    return None


def bits_for_role(profile: Profile, role: str) -> Tuple[Optional[int], str]:
    """(bits, note) a profile gives a role; None bits means float."""
    profile_class = PROFILE_CLASS.get(role)
    if profile_class is None:
        return None, f"{role} stays float"
    if profile_class == "embed+lm_head":
        bits = max(profile.embed, profile.lm_head)
        return bits, f"tied embedding and output head: max(embed {profile.embed}, lm_head {profile.lm_head})"
    return profile.bits_for(profile_class), ""


def plan_from_profile(model: nn.Module, profile, method: str = "rtn", group_size: int = 64) -> Plan:
    profile = get_profile(profile)
    roles = model_roles(model)
    plan = Plan(profile=profile.name, method=method, group_size=group_size)
    for path, module in quantizable_modules(model):
        role = roles[path]
        shape = tuple(module.weight.shape)
        bits, note = bits_for_role(profile, role)
        group = None
        if bits is not None:
            group = choose_group_size(shape[-1], group_size)
            if group is None:
                note = f"no group size in {GROUP_SIZES} divides input dim {shape[-1]}; kept float"
                bits = None
            elif group != group_size:
                note = f"group {group_size} does not divide input dim {shape[-1]}; used {group}"
        plan.tensors[path] = TensorPlan(path, role, bits, group, method if bits else "float", shape, note)
    return plan
