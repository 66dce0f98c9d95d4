"""Experiment: does the bit allocation get better when its predicted KL uses the error of
the quantizer that will run (mse's searched ranges) instead of RTN's?

jang.sensitivity predicts a tensor's KL cost as 1/2 sum(F * dW^2) with dW the RTN error
of each candidate (bits, group). mse lowers dW by different amounts at different bit
widths (most at 2 bits), so an allocation made for RTN errors may be off for mse. Both
tables use the same Fisher diagonal (the calibration chunks jang bench quality uses);
each budget is allocated from each table, converted with mse, and scored on the same
held-out text as jang bench quality (held-out KL, top-1, perplexity).

    python scripts/allocation_error_model.py --model smollm2-135m --bits 3.0 2.5 [--out FILE]
"""

import argparse
import json

import mlx.core as mx

from jang.allocate import plan_from_budget
from jang.bench import Bench
from jang.convert import resolve_source
from jang.quantize import apply_plan
from jang.quantizers import mse
from jang.sensitivity import fisher_diagonal, score_table, sensitivities


def mse_error(weight, bits: int, group: int):
    """mse's reconstruction error without activation statistics (the Fisher weighs it)."""
    wq, s, b = mse.quantize_weight(weight, bits, group)
    return mx.dequantize(wq, s, b, group_size=group, bits=bits).astype(mx.float32) - weight.astype(mx.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", nargs="+", type=float, default=[3.0, 2.5])
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    source = resolve_source(args.model)
    bench = Bench(source, eval_tokens=args.eval_tokens, progress=True)
    model, _ = bench.fresh()
    tables = {"rtn": sensitivities(model, bench.calibration, source=source, progress=True)}
    fisher = fisher_diagonal(model, bench.calibration)
    tables["mse"] = score_table(model, fisher, error=mse_error)
    del model
    for bits in args.bits:
        for error_model, table in tables.items():
            def convert(m, config, table=table, bits=bits):
                plan = plan_from_budget(m, table, bits, "mse")
                apply_plan(m, plan, tokenizer=bench.tokenizer, calibration=bench.calibration, progress=False)
                return {"plan_bits": {p: t.bits for p, t in plan.tensors.items() if t.quantized}}
            bench.run(f"mse {bits} (table: {error_model} error)", "jang", "mse", convert, error_model=error_model,
                      budget=bits)
    rows = [{k: v for k, v in r.items() if k != "plan_bits"} | {"bits_used": sorted(set(r["plan_bits"].values()))}
            for r in bench.rows]
    for r in rows:
        print(json.dumps(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "eval_tokens": args.eval_tokens, "rows": rows,
                       "plans": [r["plan_bits"] for r in bench.rows]}, f, indent=1)


if __name__ == "__main__":
    main()
