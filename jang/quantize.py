"""``jang.quantize``: quantize a loaded float model in place, following a plan."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from tqdm.auto import tqdm

from .allocate import Plan, plan_from_budget, plan_from_profile
from .capture import takes_gptq
from .errors import JangError, NonFiniteWeightError
from .profiles import BUDGETS
from .layers import quantized_layer
from .quantizers import QUANTIZERS
from .roles import quantizable_modules


# why a gptq entry ran as mse instead (an embedding: a lookup, no input Hessian)
GPTQ_FALLBACK_NOTE = "gptq not applied to this tensor (not a linear or expert stack); used mse"


def storage_dtype(weight_dtype):
    """Scales and biases are stored fp16, or bf16 for a bf16 model; never fp32."""
    return mx.bfloat16 if weight_dtype == mx.bfloat16 else mx.float16


# float dtype -> (same-size unsigned view, exponent mask): a value is NaN/inf exactly
# when all its exponent bits are set. Testing bits in numpy is ~8x faster than
# mx.isfinite on CPU, which matters when streaming hundreds of GB.
_EXPONENT = {
    mx.float16: (mx.uint16, 0x7C00),
    mx.bfloat16: (mx.uint16, 0x7F80),
    mx.float32: (mx.uint32, 0x7F800000),
}


_CHUNK = 1 << 22  # values per step: small temporaries, reused, no page faults


def count_non_finite(weight: mx.array) -> int:
    if weight.dtype not in _EXPONENT:
        return (~mx.isfinite(weight)).sum().item()
    view, mask = _EXPONENT[weight.dtype]
    bits = np.asarray(weight.view(view)).reshape(-1)
    scratch = np.empty(min(_CHUNK, bits.size), bits.dtype)
    bad = 0
    for i in range(0, bits.size, _CHUNK):
        part = scratch[: min(_CHUNK, bits.size - i)]
        np.bitwise_and(bits[i:i + _CHUNK], mask, out=part)
        bad += int(np.count_nonzero(part == mask))
    return bad


def check_finite(path: str, weight: mx.array):
    bad = count_non_finite(weight)
    if bad:
        raise NonFiniteWeightError(f"Tensor {path}.weight holds {bad} NaN/inf values; refusing to quantize it.")


def inputs_along_last_axis(module) -> bool:
    """Whether the inputs a module is called with run along its weight's last axis, so
    their energy can weight the quantization error. MLA's per-head MultiLinear is also
    called transposed (x @ W, DeepSeek's prefill), so its inputs do not: plain MSE."""
    from mlx_lm.models.mla import MultiLinear

    return not isinstance(module, MultiLinear)


def budget_plan(model, bits, tokenizer, method, calibration=None, source=None, progress=True, name=None):
    """A plan for a bit budget from measured sensitivities (see jang.sensitivity)."""
    from .calibration import calibration_chunks
    from .sensitivity import sensitivities

    if tokenizer is None and calibration is None:
        raise JangError("a bit budget needs calibration text: pass tokenizer= (or calibration= token chunks).")
    chunks = calibration if calibration is not None else calibration_chunks(tokenizer)
    table = sensitivities(model, chunks, source=source, progress=progress)
    try:
        return plan_from_budget(model, table, bits, method, name=name)
    except ValueError as e:
        raise JangError(str(e)) from None


def quantize(model: nn.Module, profile=None, *, bits: float = None, method: str = "rtn",
             group_size: int = 64, tokenizer=None, calibration=None, source=None,
             progress: bool = True, tune: int = 0, tune_lr: float = None) -> Plan:
    """Quantize ``model`` in place and return the per-tensor plan it followed.

    profile: a named profile ("JANG_3M"), a budget profile ("JANG_3K" = the size of
    uniform 3-bit g64, i.e. 3.5 bits), or a Plan. bits: an average-bits budget as
    stored (packed weights + scales + biases), e.g. 3.0; needs ``tokenizer`` (or
    ``calibration`` token chunks) to measure sensitivities. method: "rtn", "mse"
    (uses activation statistics when a tokenizer is given) or "gptq" (needs one).
    Tensors a plan leaves float (routers, norms, tensors no group size fits) are
    left untouched. The plan is also kept as ``model.jang_plan``.

    tune: after quantizing, this many steps of tuning the scales and biases (codes
    fixed) toward the float model's outputs on the calibration text (jang.tune; 0:
    off); tune_lr its learning rate. What was done is recorded as ``plan.tuning``.
    """
    if method not in QUANTIZERS:
        raise JangError(f"Unknown method {method!r}. Valid methods: {', '.join(QUANTIZERS)}.")
    if bits is None and isinstance(profile, str) and profile.upper() in BUDGETS:
        bits, profile = BUDGETS[profile.upper()], profile.upper()
    if bits is not None:
        plan = budget_plan(model, bits, tokenizer, method, calibration, source, progress,
                           name=profile if isinstance(profile, str) else None)
    elif isinstance(profile, Plan):
        plan = profile
    else:
        plan = plan_from_profile(model, profile or "JANG_4M", method, group_size)
    if not tune:
        return apply_plan(model, plan, tokenizer=tokenizer, calibration=calibration, progress=progress)
    if tokenizer is None and calibration is None:
        raise JangError("tuning needs calibration text: pass tokenizer= (or calibration= token chunks).")
    import copy

    from .calibration import calibration_chunks
    from .evaluate import for_evaluation
    from .tune import DEFAULT_LR, tune as tune_model

    chunks = calibration if calibration is not None else calibration_chunks(tokenizer)
    teacher = for_evaluation(copy.deepcopy(model))  # the float model, fp32, before it is quantized
    apply_plan(model, plan, tokenizer=tokenizer, calibration=chunks, progress=progress)
    plan.tuning = tune_model(model, teacher, chunks, steps=tune, lr=tune_lr or DEFAULT_LR, progress=progress)
    del teacher
    for t in plan:
        if t.quantized:
            t.note = (t.note + "; " if t.note else "") + f"scales/biases tuned ({tune} steps)"
    return plan


def apply_plan(model, plan: Plan, tokenizer=None, calibration=None, progress=True) -> Plan:
    todo = [t for t in plan if t.quantized]
    unknown = sorted({t.method for t in todo} - set(QUANTIZERS))
    if unknown:
        raise JangError(f"Unknown method {unknown[0]!r}. Valid methods: {', '.join(QUANTIZERS)}.")
    modules = dict(quantizable_modules(model))
    missing = [p for p in plan.tensors if p not in modules]
    if missing:
        raise JangError(f"The plan names tensors this model does not have (or has already quantized): {missing[:5]}")
    chunks = calibration
    if chunks is None and tokenizer is not None and any(t.method != "rtn" for t in todo):
        from .calibration import calibration_chunks

        chunks = calibration_chunks(tokenizer)

    def quantize_entry(entry, quantize_fn):
        """The quantized layer for entry (not yet swapped into the model)."""
        module = modules[entry.path]
        check_finite(entry.path, module.weight)
        weight = module.weight.astype(storage_dtype(module.weight.dtype))
        wq, scales, biases = quantize_fn(weight, entry.bits, entry.group_size)
        layer = quantized_layer(module, wq, scales, biases, entry.group_size, entry.bits)
        mx.eval(layer.parameters())  # drop the float graph now: bounded memory
        return layer

    for t in todo:  # GPTQ works on a linear layer's (or each expert's) input Hessian
        if t.method == "gptq" and not takes_gptq(modules[t.path]):
            t.method = "mse"
            t.note = (t.note + "; " if t.note else "") + GPTQ_FALLBACK_NOTE
    energy = {}
    weighted = [t.path for t in todo if t.method == "mse" and inputs_along_last_axis(modules[t.path])]
    if chunks is not None and weighted:
        from .capture import input_statistics

        # measured on the float model, before anything is swapped for a quantized layer
        energy = input_statistics(model, chunks, weighted)

    gptq_entries = [t for t in todo if t.method == "gptq"]
    if gptq_entries:
        if chunks is None:
            raise JangError("gptq needs calibration text: pass tokenizer= (or calibration= token chunks).")
        from .sequential import run_gptq

        done = run_gptq(model, gptq_entries, chunks, quantize_entry, progress=progress)
        model.update_modules(tree_unflatten(list(done.items())))
        todo = [t for t in todo if t.path not in done]
    for entry in tqdm(todo, desc=f"quantizing ({plan.profile or 'plan'}, {plan.method})", unit="tensor",
                      disable=not progress or not todo):
        layer = quantize_entry(entry, lambda w, b, g, e=energy.get(entry.path): QUANTIZERS[entry.method](w, b, g, act_energy=e))
        model.update_modules(tree_unflatten([(entry.path, layer)]))
    model.jang_plan = plan
    return plan
