"""JANG: mixed-precision quantization for MLX.

    import jang
    model, tokenizer = jang.load("out/")              # drop-in for mlx_lm.load
    plan = jang.quantize(model, "JANG_3M")            # in place, on a float model
    jang.save(model, tokenizer, "out2/")
"""

from .allocate import Plan, TensorPlan, plan_from_profile
from .convert import convert, save
from .errors import JangError
from .loader import load
from .profiles import PROFILES, get_profile
from .quantize import quantize

__version__ = "0.1.0"
__all__ = ["load", "quantize", "save", "convert", "Plan", "TensorPlan", "plan_from_profile",
           "PROFILES", "get_profile", "JangError"]
