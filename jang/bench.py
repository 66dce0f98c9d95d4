"""``jang bench quality``: JANG against mlx-lm's options on one model and one held-out
text, in one run; a table and a KL-vs-bits plot written to docs/.

Every row states average bits counted the same way: bytes of packed weights +
scales + biases of the quantized tensors, x 8 / their parameter count; and what
quantizing cost: wall time, MLX's peak memory and the process's peak RSS above
where it started (see Meter).
"""

import json
import math
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm import utils as mlx_utils
from mlx_lm.convert import mixed_quant_predicate_builder

from .calibration import calibration_chunks, token_chunks
from .capture import running_in_float32
from .data import paragraphs
from .errors import JangError
from .coherence import SaladCheck
from .evaluate import beyond_reference, degeneration_report, for_evaluation, log_probs, next_token_stats
from .quantize import quantize

EVAL_BOOK = "prideprejudice"
BUDGETS = (2.5, 3.0, 3.5, 4.0, 4.5)
DEGENERATION_OPTIONS = ("uniform2", "mixed_2_6", "uniform3")  # mlx-lm options paired with JANG in generation
GB = 1e9


class Unsupported(Exception):
    """An mlx-lm method that does not run for this model: recorded in the report, not a row."""


def measured_avg_bits(model) -> float:
    """Average bits of the quantized modules of an in-memory model, as they would be stored."""
    nbytes = params = 0
    for _, m in model.named_modules():
        if "scales" in m and hasattr(m, "bits"):
            nbytes += sum(m[k].nbytes for k in ("weight", "scales", "biases") if m.get(k) is not None)
            params += m.weight.size * 32 // m.bits
    return 8 * nbytes / params


# ---------------------------------------------------------------- cost of one step

def _rss_kb(field: str):
    """VmRSS / VmHWM of this process in kB (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Meter:
    """Wall time and peak memory of one step. Two peaks, because they see different things:
    ``mlx_peak_gb`` is mx.get_peak_memory() after mx.reset_peak_memory(): every MLX array
    alive at the worst moment, the float model included, but not numpy (JANG's GPTQ does
    its column loop in numpy). ``rss_peak_gb`` is the process's peak resident memory
    during the step minus its RSS at the start: everything new, numpy included
    (None where /proc cannot be reset, i.e. not Linux)."""

    def __enter__(self):
        mx.eval(mx.array(0))
        mx.reset_peak_memory()
        self.rss0 = _rss_kb("VmRSS") if _reset_rss_peak() else None
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.mlx_peak_gb = mx.get_peak_memory() / GB
        hwm = _rss_kb("VmHWM") if self.rss0 is not None else None
        self.rss_peak_gb = None if hwm is None else (hwm - self.rss0) * 1e3 / GB
        return False

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "mlx_peak_gb": self.mlx_peak_gb, "rss_peak_gb": self.rss_peak_gb}


# ---------------------------------------------------------------- mlx-lm's options

# Calibration-driven mlx-lm methods run under capture.running_in_float32: on CPU fp16/bf16
# matmuls are ~50x slower than fp32 BLAS, and their statistics (Hessians, gradients) are
# only more exact in fp32; casting back afterwards stores scales and biases fp16/bf16, as
# mlx-lm's own scripts (which load the native dtype) do, so a row's size is what a user
# of that script gets.


def mlx_uniform(bits, group_size=64):
    def run(model, config, chunks):
        mlx_utils.quantize_model(model, config, group_size=group_size, bits=bits)
    return run


def mlx_mixed(recipe):
    def run(model, config, chunks):
        predicate = mixed_quant_predicate_builder(recipe, model, 64)
        mlx_utils.quantize_model(model, config, group_size=64, bits=int(recipe.split("_")[1]),
                                 quant_predicate=predicate)
    return run


def mlx_dynamic(target):
    """mlx_lm.quant.dynamic_quant's sensitivity estimate and threshold search, on our
    calibration chunks, with low/high bits around the target. Gradients in fp32; the
    threshold search and the quantization on the model's own dtype, so fp16 scales are
    what the target counts (fp32 scales would cost a whole extra bit at group 64)."""
    def run(model, config, chunks):
        from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold

        low = max(2, min(int(target - 0.5), 6))
        high = low + 1 if low < 6 else 8
        with running_in_float32(model):
            # One chunk per step: mlx-lm sums the per-batch gradients of the mean loss and divides
            # by the number of batches, so equal batches of 1 give the same sensitivities as its
            # default 4, in less memory (4 passed 8 GB RSS on Gemma-3-270m's 262k-token logits).
            sens = dict(estimate_sensitivities(model, mx.array(chunks), low, 64, high, 64, batch_size=1))
        threshold = estimate_threshold(model, sens, target, low, 64, high, 64)

        def predicate(p, m):
            if not hasattr(m, "to_quantized"):
                return False
            return {"bits": high, "group_size": 64} if sens.get(p, -math.inf) > threshold else True

        mlx_utils.quantize_model(model, config, group_size=64, bits=low, quant_predicate=predicate)
    return run


def mlx_gptq(bits, fallback_bits=6):
    """mlx_lm.quant.gptq.gptq_quantize as its script runs it: every nn.Linear by GPTQ at
    ``bits`` (it supports 2, 4 and 8), everything else quantizable (the embedding) RTN at
    6 bits; Hessians from one pass of the float model over our calibration chunks."""
    def run(model, config, chunks):
        from mlx_lm.quant.gptq import gptq_quantize

        if bits not in (2, 4, 8):
            raise Unsupported(f"mlx-lm's gptq packs only 2, 4 or 8 bits (asked {bits})")
        with running_in_float32(model):
            gptq_quantize(model, mx.array(chunks), bits, 64, fallback_bits, 64, batch_size=8)
    return run


def mlx_awq(bits):
    """mlx_lm.quant.awq.awq_quantize with its script's defaults (embedding 4-bit g32,
    grid of 20), on our calibration chunks; only for model types it has a config for."""
    def run(model, config, chunks):
        from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize

        awq_config = AWQ_MODEL_CONFIGS.get(config["model_type"])
        if awq_config is None:
            raise Unsupported(f"mlx-lm's awq has no config for model_type {config['model_type']!r}")
        with running_in_float32(model):
            awq_quantize(model, mx.array(chunks), awq_config, group_size=64, bits=bits)
    return run


# id -> (row name, quantize function); ids are what --mlx-options and --degeneration name.
MLX_OPTIONS = {
    "uniform2": ("mlx-lm uniform 2-bit", mlx_uniform(2)),
    # 2-bit codes with a scale and bias per 32 weights: 3.0 bits as stored, the size of
    # a 3-bit budget made of 2-bit weights (run only when asked: not one of mlx-lm's defaults)
    "uniform2_g32": ("mlx-lm uniform 2-bit g32", mlx_uniform(2, 32)),
    "uniform3": ("mlx-lm uniform 3-bit", mlx_uniform(3)),
    "uniform4": ("mlx-lm uniform 4-bit", mlx_uniform(4)),
    "mixed_2_6": ("mlx-lm mixed_2_6", mlx_mixed("mixed_2_6")),
    "mixed_3_6": ("mlx-lm mixed_3_6", mlx_mixed("mixed_3_6")),
    "mixed_4_6": ("mlx-lm mixed_4_6", mlx_mixed("mixed_4_6")),
}
DEFAULT_MLX_OPTIONS = ("uniform2", "uniform3", "uniform4", "mixed_2_6", "mixed_3_6", "mixed_4_6")
# Calibration-driven mlx-lm methods, one row per --dynamic target / --mlx-gptq / --mlx-awq bits.
MLX_CALIBRATED = {
    "dynamic": (lambda t: f"dynamic{t:g}", lambda t: f"mlx-lm dynamic_quant {t:g}", mlx_dynamic),
    "gptq": (lambda b: f"gptq{b}", lambda b: f"mlx-lm gptq {b}-bit (embed 6)", mlx_gptq),
    "awq": (lambda b: f"awq{b}", lambda b: f"mlx-lm awq {b}-bit (embed 4 g32)", mlx_awq),
}


# ---------------------------------------------------------------- the run

class Bench:
    def __init__(self, source: Path, eval_tokens: int = 2048, chunk: int = 256, progress=False,
                 max_tokens: int = 80, on_row=None, calibration_chunks_n: int = 32):
        self.source = Path(source)
        self.tokenizer = mlx_utils.load_tokenizer(self.source)
        text = "\n\n".join(paragraphs(EVAL_BOOK))
        self.eval_chunks = token_chunks(self.tokenizer, [text], eval_tokens // chunk, chunk)
        self.calibration = calibration_chunks(self.tokenizer, n_chunks=calibration_chunks_n)
        self.ref = for_evaluation(self.fresh()[0])  # kept: it also judges generations (SaladCheck)
        self.ref_logp = [log_probs(self.ref, c) for c in self.eval_chunks]
        self.progress, self.max_tokens, self.on_row = progress, max_tokens, on_row
        self.rows, self.skipped = [], []
        self._salad = None

    def fresh(self):
        return mlx_utils.load_model(self.source)

    def score(self, model) -> dict:
        for_evaluation(model)
        stats = [next_token_stats(log_probs(model, c), r, c) for c, r in zip(self.eval_chunks, self.ref_logp)]
        n = len(stats)
        return {"ppl": math.exp(sum(math.log(s[0]) for s in stats) / n),
                "kl": sum(s[1] for s in stats) / n, "top1": sum(s[2] for s in stats) / n}

    def salad(self) -> SaladCheck:
        """The float model as judge of word salad; its threshold is measured once, when first needed."""
        if self._salad is None:
            self._salad = SaladCheck(self.ref, self.tokenizer)
        return self._salad

    def generations(self, model) -> dict:
        """Greedy generations on evaluate.DEGENERATION_PROMPTS, scored (word salad by the
        float model); on the dequantized fp32 model (for_evaluation): the same weights, fast on CPU."""
        return degeneration_report(for_evaluation(model), self.tokenizer, self.max_tokens, salad=self.salad())

    def run(self, name, family, method, quantize_fn, generate=False, **extra) -> dict:
        model, config = self.fresh()
        with Meter() as meter:
            info = quantize_fn(model, config)  # a dict of fields for the row, or None
        row = {"name": name, "family": family, "method": method, **extra, **(info or {}),
               "avg_bits": measured_avg_bits(model), **meter.as_dict(), **self.score(model)}
        if generate:
            row["degeneration"] = self.generations(model)
        print(f"{name:<38}{row['avg_bits']:>7.3f} bits  KL {row['kl']:.4f}  ppl {row['ppl']:.2f}  "
              f"top1 {row['top1']:.3f}  ({meter.seconds:.0f}s, MLX peak {meter.mlx_peak_gb:.2f} GB)", flush=True)
        self.rows.append(row)
        if self.on_row:
            self.on_row()
        return row

    def jang(self, name, generate=False, matched_to=None, tuned_to=None, **kw):
        """One JANG row. matched_to: the mlx-lm option id whose size it was converted to;
        tuned_to: the same, for a row whose scales and biases were also tuned (tune=N)."""
        def fn(model, config):
            plan = quantize(model, tokenizer=self.tokenizer, calibration=self.calibration, source=self.source,
                            progress=self.progress, **kw)
            return {"tuning": plan.tuning} if plan.tuning else None
        extra = {k: v for k, v in (("matched_to", matched_to), ("tuned_to", tuned_to)) if v}
        return self.run(name, "jang", kw.get("method", "rtn"), fn, generate, **extra)

    def mlx(self, option_id, name, fn, generate=False):
        """One mlx-lm row; a method that cannot run here is recorded in ``skipped`` with why."""
        try:
            return self.run(name, "mlx-lm", option_id, lambda m, c: fn(m, c, self.calibration), generate,
                            id=option_id)
        except Exception as e:  # mlx-lm's method failing here is a finding for the report, not a crash of the run
            self.skipped.append({"id": option_id, "name": name, "reason": f"{type(e).__name__}: {e}"})
            print(f"{name:<38}skipped: {e}", flush=True)

    def reference_generations(self) -> dict:
        return self.generations(self.ref)

    def sensitivity_cost(self) -> dict:
        """Measure (or read from cache) the Fisher sensitivity table every JANG budget row
        uses, once, so the JANG rows' times are the quantizer's alone."""
        from .sensitivity import sensitivities

        model, _ = self.fresh()
        with Meter() as meter:
            sensitivities(model, self.calibration, source=self.source, progress=self.progress)
        return meter.as_dict()


def mlx_option_list(dynamic=(), gptq=(), awq=(), fixed=DEFAULT_MLX_OPTIONS):
    """(id, row name, quantize function) of every mlx-lm row asked for, fixed options first."""
    unknown = set(fixed) - set(MLX_OPTIONS)
    if unknown:
        raise JangError(f"unknown mlx-lm options {sorted(unknown)}; known: {', '.join(MLX_OPTIONS)}")
    options = [(i, name, fn) for i, (name, fn) in MLX_OPTIONS.items() if i in fixed]
    for kind, values in (("dynamic", dynamic), ("gptq", gptq), ("awq", awq)):
        make_id, make_name, factory = MLX_CALIBRATED[kind]
        options += [(make_id(v), make_name(v), factory(v)) for v in values]
    return options


def _beyond(report, reference):
    return beyond_reference(report, reference) if reference else None


FLAGS = ("loop", "echo", "numbers", "fragments", "salad", "empty")


def flags_of(output: dict) -> list:
    """The names of the checks that flagged one scored generation."""
    return [f for f in FLAGS if output.get(f)]


def degeneration_pairs(rows, examples: int = 4, reference=None) -> list:
    """mlx-lm rows that were generated with, each beside the JANG row matched to its size:
    the share of prompts flagged degenerate, of them word salad, flagged where the float
    ``reference`` report is not, the mean score (0 clean .. 1 flagged), and the first
    ``examples`` prompts' outputs side by side with the flags they raised (the first
    ones, not picked ones), the float model's answer beside them when ``reference`` is given."""
    ref_outputs = reference["outputs"] if reference else []
    generated = [r for r in rows if "degeneration" in r]
    pairs = []
    for m, j in ((m, j) for m in generated if m["family"] == "mlx-lm" for j in generated
                 if m.get("id") in (j.get("matched_to"), j.get("tuned_to"))):
        md, jd = m["degeneration"], j["degeneration"]
        pairs.append({
            "mlx": m["name"], "jang": j["name"], "bits": m["avg_bits"], "jang_bits": j["avg_bits"],
            "mlx_fraction": md["fraction"], "jang_fraction": jd["fraction"],
            "mlx_score": md["mean_score"], "jang_score": jd["mean_score"],
            "mlx_salad": md.get("salad_fraction"), "jang_salad": jd.get("salad_fraction"),
            "mlx_beyond": _beyond(md, reference), "jang_beyond": _beyond(jd, reference),
            "examples": [{"prompt": a["prompt"], "mlx": a["output"], "jang": b["output"],
                          "mlx_degenerate": a["degenerate"], "jang_degenerate": b["degenerate"],
                          "mlx_flags": flags_of(a), "jang_flags": flags_of(b),
                          **({"float": ref_outputs[i]["output"], "float_flags": flags_of(ref_outputs[i])}
                             if i < len(ref_outputs) else {})}
                         for i, (a, b) in enumerate(list(zip(md["outputs"], jd["outputs"]))[:examples])],
        })
    return pairs


def matched_table(rows) -> list:
    """Each mlx-lm row beside the JANG row converted to its measured bits."""
    jang = {r["matched_to"]: r for r in rows if r.get("matched_to")}
    return [{"mlx": m["name"], "bits": m["avg_bits"], "jang_bits": j["avg_bits"], "mlx_kl": m["kl"],
             "jang_kl": j["kl"], "ratio": j["kl"] / m["kl"]}
            for m in rows if m["family"] == "mlx-lm" and (j := jang.get(m["id"])) is not None]


def run_quality(source, methods=("rtn", "mse", "gptq"), budgets=BUDGETS, profiles=(), dynamic=(3.0,),
                matched_method="mse", eval_tokens=2048, mlx_gptq=(4,), mlx_awq=(),
                degeneration=DEGENERATION_OPTIONS, max_tokens=80, mlx_options=DEFAULT_MLX_OPTIONS, command=None,
                on_result=None, calibration=32, tune=(), tune_lr=None):
    """The whole comparison; ``on_result(result)`` is called after every row with the
    result so far, so a run stopped early still leaves a report. ``tune``: for each N,
    every matched JANG row again with its scales and biases tuned for N steps (jang.tune)."""
    result = {"model": str(source), "eval_book": EVAL_BOOK, "eval_tokens": eval_tokens, "command": command,
              "calibration": f"{calibration} chunks x 128 tokens of four Austen novels", "max_tokens": max_tokens}

    def publish():
        result.update(rows=bench.rows, skipped=bench.skipped, matched=matched_table(bench.rows),
                      degeneration=degeneration_pairs(bench.rows, reference=result.get("reference_degeneration")))
        if on_result:
            on_result(result)

    options = mlx_option_list(dynamic, mlx_gptq, mlx_awq, mlx_options)
    unknown = set(degeneration) - {i for i, _, _ in options}
    if unknown:
        raise JangError(f"--degeneration names unknown mlx-lm options {sorted(unknown)}; "
                        f"known: {', '.join(i for i, _, _ in options)}")
    bench = Bench(source, eval_tokens, max_tokens=max_tokens, on_row=publish, calibration_chunks_n=calibration)
    if degeneration:
        result["reference_degeneration"] = bench.reference_generations()
    result["sensitivity"] = bench.sensitivity_cost()
    # The method sweep first (its rows are the quantizers' time and memory side by side), then
    # each mlx-lm option followed by JANG at its measured size: a run stopped early keeps whole pairs.
    for method in methods:
        for b in budgets:
            bench.jang(f"JANG {method} --bits {b}", bits=b, method=method)
    for option_id, name, fn in options:
        row = bench.mlx(option_id, name, fn, generate=option_id in degeneration)
        if row is not None:
            bench.jang(f"JANG {matched_method} @ {name[7:]}", generate=option_id in degeneration,
                       matched_to=option_id, bits=row["avg_bits"], method=matched_method)
            for steps in tune:
                bench.jang(f"JANG {matched_method} @ {name[7:]} + tune {steps}", generate=option_id in degeneration,
                           tuned_to=option_id, bits=row["avg_bits"], method=matched_method, tune=steps,
                           tune_lr=tune_lr)
    for profile in profiles:
        bench.jang(f"JANG {profile} (rtn)", profile=profile)
    publish()
    return result


def merge_results(results: list) -> dict:
    """One report from runs of the same model and settings that split the options between
    them (e.g. two processes on a slow machine): rows concatenated (the first run's row
    wins where two ran the same option), tables recomputed, every run's command kept."""
    merged = {**results[0], "command": "\n".join(r["command"] for r in results if r.get("command"))}
    for key in ("model", "eval_tokens", "max_tokens", "calibration"):
        if len({r.get(key) for r in results}) > 1:
            raise JangError(f"cannot merge runs with different {key}")
    seen, rows = set(), []
    for row in (row for r in results for row in r["rows"]):
        if row["name"] not in seen:
            seen.add(row["name"])
            rows.append(row)
    merged["rows"] = rows
    merged["skipped"] = [s for r in results for s in r.get("skipped", [])]
    # the run that measured the sensitivity table, not one that read it from the cache
    measured = [r["sensitivity"] for r in results if r.get("sensitivity")]
    merged["sensitivity"] = max(measured, key=lambda m: m["seconds"]) if measured else None
    merged["reference_degeneration"] = next((r["reference_degeneration"] for r in results
                                             if r.get("reference_degeneration")), None)
    merged["matched"] = matched_table(rows)
    merged["degeneration"] = degeneration_pairs(rows, reference=merged["reference_degeneration"])
    return merged


# ---------------------------------------------------------------- report

def _gb(x) -> str:
    return "n/a" if x is None else f"{x:.2f} GB"


def _quote(text: str, limit: int = 240) -> str:
    """One table cell: newlines shown as ⏎, pipes escaped, long outputs cut."""
    text = text.strip().replace("|", "\\|").replace("\n", " ⏎ ")
    return text if len(text) <= limit else text[:limit] + " …"


def markdown(result: dict) -> str:
    lines = [f"Model `{Path(result['model']).name}`, held-out text: {result['eval_book']} "
             f"({result['eval_tokens']} tokens); calibration: {result.get('calibration', '')}. "
             "Average bits count packed weights + scales + biases as stored.", ""]
    if result.get("command"):
        lines += ["Produced by (one command per process that contributed rows):" if "\n" in result["command"]
                  else "Produced by:", "", "```bash", result["command"], "```", ""]
    lines += ["Quantize time and memory cover quantizing only (not loading, not scoring). *MLX peak*: "
              "`mx.get_peak_memory()` after `mx.reset_peak_memory()` (all MLX arrays, the loaded float "
              "model included; numpy not seen). *RSS peak Δ*: the process's peak resident memory during the "
              "step minus its resident memory at the start (numpy included).", "",
              "| option | avg bits | mean KL | perplexity | top-1 | quantize time | MLX peak | RSS peak Δ |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(result["rows"], key=lambda r: (r["family"] != "mlx-lm", r["avg_bits"])):
        lines.append(f"| {r['name']} | {r['avg_bits']:.3f} | {r['kl']:.4f} | {r['ppl']:.2f} | {r['top1']:.3f} | "
                     f"{r['seconds']:.0f} s | {_gb(r.get('mlx_peak_gb'))} | {_gb(r.get('rss_peak_gb'))} |")
    if result.get("sensitivity"):
        s = result["sensitivity"]
        lines += ["", f"Fisher sensitivity table (once per model, shared by every JANG budget row; ~0 s when read "
                      f"from cache): {s['seconds']:.0f} s, MLX peak {_gb(s['mlx_peak_gb'])}, "
                      f"RSS peak Δ {_gb(s['rss_peak_gb'])}."]
    for s in result.get("skipped", []):
        lines += ["", f"Not run: **{s['name']}** — {s['reason']}"]
    if result.get("matched"):
        lines += ["", "Matched size: JANG converted with `--bits` = the mlx-lm option's measured average bits.", "",
                  "| mlx-lm option | bits | mlx-lm KL | JANG bits | JANG KL | JANG / mlx-lm |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for m in result["matched"]:
            lines.append(f"| {m['mlx']} | {m['bits']:.3f} | {m['mlx_kl']:.4f} | {m['jang_bits']:.3f} | "
                         f"{m['jang_kl']:.4f} | {m['ratio']:.2f}x |")
    lines += degeneration_markdown(result)
    return "\n".join(lines) + "\n"


def degeneration_markdown(result: dict) -> list:
    pairs = result.get("degeneration") or []
    if not pairs:
        return []
    ref = result.get("reference_degeneration")
    lines = ["", f"Degeneration: greedy generations (up to {result.get('max_tokens')} tokens) on the "
                 f"{len(ref['outputs']) if ref else ''} prompts of `jang.evaluate.DEGENERATION_PROMPTS`, each "
                 "flagged by `degeneration_scores` (loops, prompt echo, number runs, letter fragments, empty, and "
                 "word salad: the float model's NLL of the text above `jang.coherence.SaladCheck`'s threshold). "
                 "*flagged*: share of prompts flagged; *salad*: share flagged as word salad; *beyond float*: "
                 "share flagged where the float model's own answer to that prompt is not; *score*: mean of the "
                 "per-prompt score (0 clean … 1 flagged). Lower is better."]
    if ref:
        cal = ref.get("salad_calibration")
        lines += ["", f"Float reference: {ref['fraction']:.0%} flagged, score {ref['mean_score']:.2f}."]
        if cal:
            lines[-1] += (f" Word-salad threshold {cal['threshold']:.2f} nats/token: the float model's NLL of "
                          f"{cal['paragraphs']} held-out paragraphs is {cal['prose_nll']:.2f} as written, "
                          f"{cal['shuffled_nll']:.2f} with their words shuffled; the threshold is the midpoint.")
    pct = lambda x: "-" if x is None else f"{x:.0%}"
    lines += ["", "| mlx-lm option | bits | mlx-lm flagged | salad | beyond float | score | "
                  "JANG row | JANG bits | JANG flagged | salad | beyond float | score |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for p in pairs:
        lines.append(f"| {p['mlx']} | {p['bits']:.3f} | {p['mlx_fraction']:.0%} | {pct(p.get('mlx_salad'))} | "
                     f"{pct(p.get('mlx_beyond'))} | {p['mlx_score']:.2f} | {p['jang']} | {p['jang_bits']:.3f} | "
                     f"{p['jang_fraction']:.0%} | {pct(p.get('jang_salad'))} | {pct(p.get('jang_beyond'))} | "
                     f"{p['jang_score']:.2f} |")
    for p in pairs:
        with_float = all("float" in e for e in p["examples"])
        lines += ["", f"**{p['mlx']}** vs **{p['jang']}** (first {len(p['examples'])} prompts; "
                      "⚑ = flagged, with the checks that flagged it):", "",
                  "| prompt | mlx-lm | JANG |" + (" float |" if with_float else ""),
                  "| --- | --- | --- |" + (" --- |" if with_float else "")]
        for e in p["examples"]:
            cells = [(e["mlx"], e.get("mlx_flags", ["flagged"] if e["mlx_degenerate"] else [])),
                     (e["jang"], e.get("jang_flags", ["flagged"] if e["jang_degenerate"] else []))]
            if with_float:
                cells.append((e["float"], e["float_flags"]))
            lines.append(f"| {_quote(e['prompt'], 80)} | " + " | ".join(_flagged(t, f) for t, f in cells) + " |")
    return lines


def _flagged(text: str, flags) -> str:
    return (f"⚑ {'+'.join(flags)}: " if flags else "") + _quote(text)


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = {}
    for r in result["rows"]:
        key = "mlx-lm" if r["family"] == "mlx-lm" else f"JANG {r['method']}"
        if r.get("matched_to"):
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
    if result.get("rows"):
        plot(result, docs / f"quality-{name}.png")
