"""``jang bench quality``: JANG against mlx-lm's options on one model and one held-out
text, in one run; a table and a KL-vs-bits plot written to docs/.

Every row states average bits counted the same way: bytes of packed weights +
scales + biases of the quantized tensors, x 8 / their parameter count.
"""

import json
import math
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm import utils as mlx_utils
from mlx_lm.convert import mixed_quant_predicate_builder

from .calibration import calibration_chunks, token_chunks
from .data import paragraphs
from .evaluate import for_evaluation, log_probs, next_token_stats
from .quantize import quantize

EVAL_BOOK = "prideprejudice"
BUDGETS = (2.5, 3.0, 3.5, 4.0, 4.5)


def measured_avg_bits(model) -> float:
    """Average bits of the quantized modules of an in-memory model, as they would be stored."""
    nbytes = params = 0
    for _, m in model.named_modules():
        if "scales" in m and hasattr(m, "bits"):
            nbytes += sum(m[k].nbytes for k in ("weight", "scales", "biases") if m.get(k) is not None)
            params += m.weight.size * 32 // m.bits
    return 8 * nbytes / params


# ---------------------------------------------------------------- mlx-lm's options

def mlx_uniform(bits):
    def run(model, config, chunks):
        mlx_utils.quantize_model(model, config, group_size=64, bits=bits)
    return run


def mlx_mixed(recipe):
    def run(model, config, chunks):
        predicate = mixed_quant_predicate_builder(recipe, model, 64)
        mlx_utils.quantize_model(model, config, group_size=64, bits=int(recipe.split("_")[1]),
                                 quant_predicate=predicate)
    return run


def mlx_dynamic(target):
    """mlx_lm.quant.dynamic_quant's sensitivity estimate and threshold search, on our
    calibration chunks, with low/high bits around the target."""
    def run(model, config, chunks):
        from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold

        low = max(2, min(int(target - 0.5), 6))
        high = low + 1 if low < 6 else 8
        model.set_dtype(mx.float32)
        data = mx.array(chunks)
        sens = dict(estimate_sensitivities(model, data, low, 64, high, 64, batch_size=4))
        threshold = estimate_threshold(model, sens, target, low, 64, high, 64)

        def predicate(p, m):
            if not hasattr(m, "to_quantized"):
                return False
            return {"bits": high, "group_size": 64} if sens.get(p, -math.inf) > threshold else True

        mlx_utils.quantize_model(model, config, group_size=64, bits=low, quant_predicate=predicate)
    return run


MLX_OPTIONS = {
    "mlx-lm uniform 2-bit": mlx_uniform(2),
    "mlx-lm uniform 3-bit": mlx_uniform(3),
    "mlx-lm uniform 4-bit": mlx_uniform(4),
    "mlx-lm mixed_2_6": mlx_mixed("mixed_2_6"),
    "mlx-lm mixed_3_6": mlx_mixed("mixed_3_6"),
    "mlx-lm mixed_4_6": mlx_mixed("mixed_4_6"),
}


# ---------------------------------------------------------------- the run

class Bench:
    def __init__(self, source: Path, eval_tokens: int = 2048, chunk: int = 256, progress=False):
        self.source = Path(source)
        self.tokenizer = mlx_utils.load_tokenizer(self.source)
        text = "\n\n".join(paragraphs(EVAL_BOOK))
        self.eval_chunks = token_chunks(self.tokenizer, [text], eval_tokens // chunk, chunk)
        self.calibration = calibration_chunks(self.tokenizer)
        ref = for_evaluation(self.fresh()[0])
        self.ref_logp = [log_probs(ref, c) for c in self.eval_chunks]
        self.progress = progress
        self.rows = []

    def fresh(self):
        return mlx_utils.load_model(self.source)

    def score(self, model) -> dict:
        for_evaluation(model)
        stats = [next_token_stats(log_probs(model, c), r, c) for c, r in zip(self.eval_chunks, self.ref_logp)]
        n = len(stats)
        return {"ppl": math.exp(sum(math.log(s[0]) for s in stats) / n),
                "kl": sum(s[1] for s in stats) / n, "top1": sum(s[2] for s in stats) / n}

    def run(self, name, family, method, quantize_fn) -> dict:
        model, config = self.fresh()
        t0 = time.time()
        quantize_fn(model, config)
        seconds = time.time() - t0
        row = {"name": name, "family": family, "method": method,
               "avg_bits": measured_avg_bits(model), "seconds": seconds, **self.score(model)}
        print(f"{name:<34}{row['avg_bits']:>7.3f} bits  KL {row['kl']:.4f}  ppl {row['ppl']:.2f}  "
              f"top1 {row['top1']:.3f}  ({seconds:.0f}s)", flush=True)
        self.rows.append(row)
        return row

    def jang(self, name, **kw):
        def fn(model, config):
            quantize(model, tokenizer=self.tokenizer, calibration=self.calibration, source=self.source,
                     progress=self.progress, **kw)
        return self.run(name, "jang", kw.get("method", "rtn"), fn)

    def mlx(self, name, fn):
        return self.run(name, "mlx-lm", "rtn", lambda m, c: fn(m, c, self.calibration))


def run_quality(source, methods=("rtn", "mse"), budgets=BUDGETS, profiles=(), dynamic=(3.0,),
                matched_method="mse", eval_tokens=2048):
    bench = Bench(source, eval_tokens)
    for name, fn in MLX_OPTIONS.items():
        bench.mlx(name, fn)
    for target in dynamic:
        bench.mlx(f"mlx-lm dynamic_quant {target:g}", mlx_dynamic(target))
    matched = []
    for row in [r for r in bench.rows if r["family"] == "mlx-lm"]:
        jrow = bench.jang(f"JANG {matched_method} @ {row['name'][7:]}", bits=row["avg_bits"], method=matched_method)
        matched.append({"mlx": row["name"], "bits": row["avg_bits"], "jang_bits": jrow["avg_bits"],
                        "mlx_kl": row["kl"], "jang_kl": jrow["kl"], "ratio": jrow["kl"] / row["kl"]})
    for method in methods:
        for b in budgets:
            bench.jang(f"JANG {method} --bits {b}", bits=b, method=method)
    for profile in profiles:
        bench.jang(f"JANG {profile} (rtn)", profile=profile)
    return {"model": str(source), "eval_book": EVAL_BOOK, "eval_tokens": eval_tokens,
            "rows": bench.rows, "matched": matched}


# ---------------------------------------------------------------- report

def markdown(result: dict) -> str:
    lines = [f"Model `{Path(result['model']).name}`, held-out text: {result['eval_book']} "
             f"({result['eval_tokens']} tokens). Average bits count packed weights + scales + biases as stored.", "",
             "| option | avg bits | mean KL | perplexity | top-1 | quantize time |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(result["rows"], key=lambda r: (r["family"] != "mlx-lm", r["avg_bits"])):
        lines.append(f"| {r['name']} | {r['avg_bits']:.3f} | {r['kl']:.4f} | {r['ppl']:.2f} | {r['top1']:.3f} | {r['seconds']:.0f} s |")
    if result["matched"]:
        lines += ["", "Matched size: JANG converted with `--bits` = the mlx-lm option's measured average bits.", "",
                  "| mlx-lm option | bits | mlx-lm KL | JANG bits | JANG KL | JANG / mlx-lm |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for m in result["matched"]:
            lines.append(f"| {m['mlx']} | {m['bits']:.3f} | {m['mlx_kl']:.4f} | {m['jang_bits']:.3f} | "
                         f"{m['jang_kl']:.4f} | {m['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = {}
    for r in result["rows"]:
        key = "mlx-lm" if r["family"] == "mlx-lm" else f"JANG {r['method']}"
        if "@" in r["name"]:
            key += " (matched)"
        groups.setdefault(key, []).append(r)
    for key, rows in sorted(groups.items()):
        rows.sort(key=lambda r: r["avg_bits"])
        style = "o" if key == "mlx-lm" or "matched" in key or "JANG_" in rows[0]["name"] else "o-"
        ax.plot([r["avg_bits"] for r in rows], [r["kl"] for r in rows], style, label=key, alpha=0.8)
    for r in groups.get("mlx-lm", []):
        ax.annotate(r["name"].replace("mlx-lm ", ""), (r["avg_bits"], r["kl"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("average bits (weights + scales + biases, as stored)")
    ax.set_ylabel("mean KL to the float model (nats/token)")
    ax.set_title(f"{Path(result['model']).name}: quality per bit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict, docs: Path, name: str):
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"quality-{name}.json").write_text(json.dumps(result, indent=2))
    (docs / f"quality-{name}.md").write_text(markdown(result))
    plot(result, docs / f"quality-{name}.png")
