"""Data for the question issue 3 leaves to its planners: is the degeneration bar ("JANG's
degeneration score clearly better than mlx-lm uniform at 2.5-3.0 bits") a question of
greedy decoding? Greedy decoding of a 135M/270M model loops once its distribution is
mildly off (the float SmolLM2 itself loops on 2 of the 12 prompts), so this scores the
same 12 prompts, in the same frame, also with sampling as mlx-lm's chat users run it
(temperature and top-p; several seeds per prompt).

For each of: the float model, mlx-lm uniform 2-bit at group 64 (2.5 bits) and group 32
(3.0 bits), and JANG converted to each of those measured sizes (as `jang bench quality`
converts its matched rows), it records held-out KL and the flagged share (loop / echo /
numbers / fragments / empty / word salad judged by the float model, exactly as the
greedy check) of the greedy generations and of the sampled ones (prompts x seeds).

    python scripts/degeneration_sampling.py --model smollm2-135m --method gptq \
        --out docs/degeneration-sampling-smollm2-135m.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

from mlx_lm.sample_utils import make_sampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jang.bench import Bench, measured_avg_bits, mlx_uniform  # noqa: E402
from jang.convert import resolve_source  # noqa: E402
from jang.evaluate import DEGENERATION_PROMPTS, degeneration_report, for_evaluation  # noqa: E402
from jang.quantize import quantize  # noqa: E402


def study(bench: Bench, name: str, model, args) -> dict:
    t0 = time.time()
    model = for_evaluation(model)
    greedy = bench.generations(model)
    sampled = degeneration_report(model, bench.tokenizer, args.max_tokens, salad=bench.salad(),
                                  sampler=make_sampler(temp=args.temp, top_p=args.top_p), seeds=range(args.seeds))
    print(f"{name:<36} greedy flagged {greedy['fraction']:.2f}  sampled flagged {sampled['fraction']:.2f} "
          f"(salad {sampled['salad_fraction']:.2f})  {time.time() - t0:.0f}s", flush=True)
    return {"name": name, "greedy": greedy, "sampled": sampled}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="gptq", help="JANG's quantizer for the matched rows")
    ap.add_argument("--temp", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--seeds", type=int, default=3, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=60)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    bench = Bench(resolve_source(args.model), eval_tokens=args.eval_tokens, max_tokens=args.max_tokens)
    result = {"model": args.model, "method": args.method, "temp": args.temp, "top_p": args.top_p,
              "seeds": args.seeds, "max_tokens": args.max_tokens, "prompts": len(DEGENERATION_PROMPTS), "rows": []}

    def row(name, model):
        stats = {"avg_bits": measured_avg_bits(model), **bench.score(model)}
        print(f"{name:<36} {stats['avg_bits']:.3f} bits  KL {stats['kl']:.3f}", flush=True)
        result["rows"].append({**stats, **study(bench, name, model, args)})
        Path(args.out).write_text(json.dumps(result, indent=1))
        return stats

    result["rows"].append({"avg_bits": 16.0, "kl": 0.0, **study(bench, "float", bench.ref, args)})
    for option, (bits, gs) in {"uniform 2-bit (g64)": (2, 64), "uniform 2-bit (g32)": (2, 32)}.items():
        model, config = bench.fresh()
        mlx_uniform(bits, gs)(model, config, None)
        size = row(f"mlx-lm {option}", model)["avg_bits"]
        model, _ = bench.fresh()
        quantize(model, tokenizer=bench.tokenizer, calibration=bench.calibration, source=bench.source,
                 bits=size, method=args.method)
        row(f"JANG {args.method} @ {option}", model)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
