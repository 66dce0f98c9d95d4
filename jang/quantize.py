"""``jang.quantize``: quantize a loaded float model in place, following a plan."""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from tqdm.auto import tqdm

from .allocate import Plan, plan_from_profile
from .errors import JangError, NonFiniteWeightError
from .layers import quantized_layer
from .quantizers import QUANTIZERS
from .roles import quantizable_modules


def storage_dtype(weight_dtype):
    """Scales and biases are stored fp16, or bf16 for a bf16 model; never fp32."""
    return mx.bfloat16 if weight_dtype == mx.bfloat16 else mx.float16


def check_finite(path: str, weight: mx.array):
    if not mx.all(mx.isfinite(weight)).item():
        bad = (~mx.isfinite(weight)).sum().item()
        raise NonFiniteWeightError(f"Tensor {path}.weight holds {bad} NaN/inf values; refusing to quantize it.")


def quantize(model: nn.Module, profile="JANG_4M", *, method: str = "rtn", group_size: int = 64,
             progress: bool = True) -> Plan:
    """Quantize ``model`` in place with a named profile (e.g. "JANG_3M") or a Plan.

    Returns the per-tensor plan it followed (also kept as ``model.jang_plan``).
    Tensors the plan leaves float (routers, norms, tensors no group size fits)
    are left untouched.
    """
    plan = profile if isinstance(profile, Plan) else plan_from_profile(model, profile, method, group_size)
    todo = [t for t in plan if t.quantized]
    unknown = sorted({t.method for t in todo} - set(QUANTIZERS))
    if unknown:
        raise JangError(f"Unknown method {unknown[0]!r}. Valid methods: {', '.join(QUANTIZERS)}.")
    modules = dict(quantizable_modules(model))
    missing = [p for p in plan.tensors if p not in modules]
    if missing:
        raise JangError(f"The plan names tensors this model does not have (or has already quantized): {missing[:5]}")
    for entry in tqdm(todo, desc=f"quantizing ({plan.profile or 'plan'}, {plan.method})", unit="tensor",
                      disable=not progress):
        module = modules[entry.path]
        weight = module.weight
        check_finite(entry.path, weight)
        weight = weight.astype(storage_dtype(weight.dtype))
        wq, scales, biases = QUANTIZERS[entry.method](weight, entry.bits, entry.group_size)
        layer = quantized_layer(module, wq, scales, biases, entry.group_size, entry.bits)
        mx.eval(layer.parameters())  # drop the float graph now: bounded memory
        model.update_modules(tree_unflatten([(entry.path, layer)]))
    model.jang_plan = plan
    return plan
