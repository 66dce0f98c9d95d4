"""Plans: the bits and group size chosen for every quantizable tensor.

A plan is data. ``plan_from_profile`` turns a named profile into one; the
quantizers only follow it. Tensors a plan leaves float carry ``bits=None``
and a note that says why.
"""

import math
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
    tuning: Optional[dict] = None  # jang.tune's stats, when the scales and biases were tuned

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
            **({"tuning": self.tuning} if self.tuning else {}),
            "tensors": {p: asdict(t) for p, t in self.tensors.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        tensors = {
            p: TensorPlan(**{**t, "shape": tuple(t["shape"])})
            for p, t in d["tensors"].items()
        }
        return cls(tensors, d.get("profile"), d.get("method", "rtn"), d.get("group_size", 64), d.get("tuning"))


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
    if role == "other":
        return profile.bits_for(profile_class), "no role pattern matched this path; given the MLP bits"
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


# ---------------------------------------------------------------- bit budgets

def candidate_bytes(shape, bits: int, group: int, scale_bytes: int = 2) -> int:
    """Bytes as stored: packed codes plus one scale and one bias per group."""
    params = math.prod(shape)
    return params * bits // 8 + (params // group) * 2 * scale_bytes


# A tensor holding at least this share of the bytes is branched on (see solve_budget).
BRANCH_SHARE = 0.05


def solve_budget(options: dict, budget_bytes: float) -> dict:
    """Multiple-choice knapsack: pick one option per tensor minimising the summed
    score with total bytes <= budget_bytes.

    options: path -> list of (bytes, score, choice). Lagrangian relaxation finds the
    best point on the convex hull under the budget; a greedy pass then spends what
    is left on the upgrades with the best score drop per byte.

    That is near-optimal while every tensor is a small part of the whole. One large
    tensor breaks it: Gemma-3-270m's tied embedding is 63% of the weights, so one more
    bit for it costs 0.63 bits of the average. The relaxation leaves it at the option
    below the budget's price, and the greedy pass only ever upgrades, so it cannot
    trade the small tensors down to afford the big one (at 3.5 bits with group-64
    candidates: embedding 2-bit, predicted KL 1.60, held-out KL 2.48; with it 3-bit,
    predicted 0.36 and the rest at less, KL 1.2). So each tensor of at least
    BRANCH_SHARE of the bytes is tried at each of its options, the rest solved again
    for what remains; the lowest summed score wins.
    """
    best = _relaxed(options, budget_bytes)
    largest = {p: max(o[0] for o in opts) for p, opts in options.items()}
    total = sum(largest.values())
    for path in [p for p, size in largest.items() if size >= BRANCH_SHARE * total]:
        rest = {p: opts for p, opts in options.items() if p != path}
        for option in options[path]:
            try:
                selection = {**_relaxed(rest, budget_bytes - option[0]), path: option}
            except ValueError:  # this option leaves too little for the rest
                continue
            if _score(selection) < _score(best):
                best = selection
    return best


def _score(selection) -> float:
    return sum(o[1] for o in selection.values())


def _relaxed(options: dict, budget_bytes: float) -> dict:
    """The Lagrangian relaxation plus the greedy fill (see solve_budget)."""
    def pick(lam):
        return {p: min(opts, key=lambda o: (o[1] + lam * o[0], o[0])) for p, opts in options.items()}

    def size(sel):
        return sum(o[0] for o in sel.values())

    cheapest = {p: min(opts, key=lambda o: (o[0], o[1])) for p, opts in options.items()}
    if size(cheapest) > budget_bytes:
        raise ValueError(f"budget too small: the cheapest choice for every tensor needs {size(cheapest)} bytes")
    lo, hi = 0.0, 1.0
    while size(pick(hi)) > budget_bytes:
        hi *= 4
    best = pick(hi)
    if size(pick(lo)) <= budget_bytes:
        best = pick(lo)
    else:
        for _ in range(60):
            mid = (lo + hi) / 2
            sel = pick(mid)
            if size(sel) <= budget_bytes:
                best, hi = sel, mid
            else:
                lo = mid
    return _greedy_fill(options, best, budget_bytes - size(best))


def _greedy_fill(options, selection, slack):
    selection = dict(selection)
    while True:
        best_gain, best_move = 0.0, None
        for path, opts in options.items():
            cur = selection[path]
            for o in opts:
                extra = o[0] - cur[0]
                gain = cur[1] - o[1]
                if extra <= slack and gain > 0 and (extra <= 0 or gain / extra > best_gain):
                    if extra <= 0:  # strictly better for free
                        best_move, best_gain = (path, o), float("inf")
                        break
                    best_gain, best_move = gain / extra, (path, o)
            if best_gain == float("inf"):
                break
        if best_move is None:
            return selection
        path, o = best_move
        slack -= o[0] - selection[path][0]
        selection[path] = o


def plan_from_budget(model: nn.Module, table: dict, bits: float, method: str = "rtn",
                     scale_bytes: int = 2, name: str = None) -> Plan:
    """The plan with the least predicted KL whose average bits (as stored) is <= bits.

    table: path -> {"<bits>:<group>": predicted KL}, from jang.sensitivity. Roles
    that stay float (routers) are not part of the budget, as in the average.
    """
    roles = model_roles(model)
    shapes = {p: tuple(m.weight.shape) for p, m in quantizable_modules(model)}
    options = {
        path: [(candidate_bytes(shapes[path], b, g, scale_bytes), score, (b, g))
               for key, score in table[path].items() for b, g in [map(int, key.split(":"))]]
        for path in shapes
        if PROFILE_CLASS.get(roles[path]) is not None and table.get(path)
    }
    params = sum(math.prod(shapes[p]) for p in options)
    try:
        chosen = solve_budget(options, bits * params / 8)
    except ValueError as e:
        raise ValueError(f"bits={bits}: {e} ({params:,} parameters)") from None
    plan = Plan(profile=name or f"budget {bits:g}", method=method, group_size=0)
    for path, shape in shapes.items():
        if path in chosen:
            _, score, (b, g) = chosen[path]
            plan.tensors[path] = TensorPlan(path, roles[path], b, g, method, shape, f"predicted KL {score:.3g}")
        else:
            plan.tensors[path] = TensorPlan(path, roles[path], None, None, "float", shape, f"{roles[path]} stays float")
    return plan
