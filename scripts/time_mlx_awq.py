"""How long mlx-lm's own AWQ takes per decoder layer here, without running it on the
whole model: the model is cut to its first --layers layers, and mlx_lm.quant.awq's
awq_quantize runs on them with the calibration chunks `jang bench quality` uses (fp32,
as the bench runs it). Prints seconds per layer and the estimate for all layers.

    python scripts/time_mlx_awq.py --model smollm2-135m --layers 1
"""

import argparse
import time

import mlx.core as mx
from mlx_lm import utils as mlx_utils
from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize

from jang.calibration import calibration_chunks
from jang.convert import resolve_source


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()
    source = resolve_source(args.model)
    model, config = mlx_utils.load_model(source)
    chunks = calibration_chunks(mlx_utils.load_tokenizer(source))
    total = len(model.layers)
    del model.layers[args.layers:]  # model.layers is the decoder's own list
    model.set_dtype(mx.float32)
    start = time.perf_counter()
    awq_quantize(model, mx.array(chunks), AWQ_MODEL_CONFIGS[config["model_type"]], group_size=64, bits=args.bits)
    per_layer = (time.perf_counter() - start) / args.layers
    print(f"{args.model}: mlx-lm awq {args.bits}-bit, {len(chunks)} chunks x {len(chunks[0])} tokens: "
          f"{per_layer:.0f} s per layer; all {total} layers ~{per_layer * total / 60:.0f} min")


if __name__ == "__main__":
    main()
