"""Quantizers: float weight -> MLX-native affine (packed weight, scales, biases).

Each takes the float weight (last axis = input dim), bits and group size and
returns arrays ``mx.dequantize`` understands. Register new ones in QUANTIZERS.
"""

from . import gptq, mse, rtn

QUANTIZERS = {
    "rtn": rtn.quantize_weight,
    "mse": mse.quantize_weight,
    # needs each layer's input Hessian: jang.quantize runs it layer by layer (jang.sequential)
    "gptq": gptq.quantize_weight,
}
