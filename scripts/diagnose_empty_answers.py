"""Diagnosis: why does a low-bit JANG model answer chat prompts with nothing at all?

SmolLM2-135M-Instruct at 3.0 bits (gptq, default novel-text calibration) answers 6 of
the 12 degeneration prompts with an empty string: it ends its turn at once. This script
measures, at the first answer position of each prompt (after the chat template's
generation prompt), the probability of the end-of-turn token (<|im_end|>; and eos when
it differs) and the top 5, for the float model and the quantized one; then it puts back
the float weights of one group of tensors at a time (the tied embedding / output head,
each layer's attention, each layer's MLP) in the quantized model and measures again:
the groups whose restoration removes the end-of-turn mass are the cause. The reverse
(only that group quantized, the rest float) is measured too.

Everything runs on dequantized fp32 weights (jang.evaluate.for_evaluation: the same
numbers). The quantized model is converted once with jang.quantize, as `jang bench
quality` does (32 calibration chunks of 128 tokens of the calibration novels), and its
dequantized weights are cached under ~/.cache/jang/diagnose (not the repository).

--compare then tries one fix at the same budget: the sensitivity table that allocates
the bits measured half on the calibration novels and half on framed positions (each of
tune_chat_mix.CALIBRATION_PROMPTS, none a degeneration prompt, in the frame the check
uses -- the chat template, or "Question: ... Answer:" for a base model -- answered by a
paragraph of *Emma*, so no generation is needed); GPTQ's Hessians stay on the novels.
Both plans are converted with gptq and scored as `jang bench quality` scores a row
(held-out KL / top-1 on 1024 tokens of Pride and Prejudice, the 12 greedy generations
with the float model's word-salad check), plus the first-token end-of-answer numbers.

    python scripts/diagnose_empty_answers.py --model smollm2-135m --bits 3.0 --compare \
        --out docs/diagnose-empty-smollm2-135m.json
    python scripts/diagnose_empty_answers.py --model gemma-3-270m --bits 3.0 --chunks 8 \
        --no-diagnosis --compare --out docs/diagnose-empty-gemma-3-270m.json
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm import utils as mlx_utils

from jang import coherence
from jang.calibration import calibration_chunks
from jang.convert import resolve_source
from jang.data import paragraphs
from jang.evaluate import BASE_FRAME, DEGENERATION_PROMPTS, beyond_reference, chat_prompt, for_evaluation
from jang.paths import cache_dir
from jang.quantize import quantize


END_NAMES = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<eos>")


def end_tokens(tokenizer) -> dict:
    """name -> id of the tokens that end an answer: the chat template's end of turn, eos,
    and end of text where the vocabulary has them."""
    vocab = tokenizer.get_vocab()
    out = {name: vocab[name] for name in END_NAMES if name in vocab}
    for i in sorted(getattr(tokenizer, "eos_token_ids", None) or {tokenizer.eos_token_id}):
        out.setdefault(tokenizer.convert_ids_to_tokens(i), i)
    return out


def prompt_ids(tokenizer, prompts=DEGENERATION_PROMPTS) -> list:
    """Each prompt's ids in the degeneration check's frame, as its generation sees them."""
    return [coherence.prompt_ids(tokenizer, chat_prompt(tokenizer, p)[0]) for p in prompts]


def first_token_probs(model, prompts) -> mx.array:
    """(n_prompts, vocab) probabilities of the first answer token."""
    rows = []
    for ids in prompts:
        logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
        rows.append(mx.softmax(logits))
    probs = mx.stack(rows)
    mx.eval(probs)
    return probs


def summary(probs, ends: dict) -> dict:
    """Mean end-of-answer probability and how many prompts have an end token as argmax."""
    end_ids = mx.array(list(ends.values()))
    p_end = probs[:, end_ids].sum(-1)
    top = mx.argmax(probs, -1)
    return {"p_end_mean": p_end.mean().item(), "p_end": [round(x, 4) for x in p_end.tolist()],
            "end_is_top1": sum(int(t) in set(ends.values()) for t in top.tolist())}


def top5(probs, tokenizer) -> list:
    out = []
    for row in probs:
        idx = mx.argsort(-row)[:5].tolist()
        out.append([(tokenizer.decode([i]) if i not in tokenizer.all_special_ids else
                     tokenizer.convert_ids_to_tokens(i), round(row[i].item(), 4)) for i in idx])
    return out


def groups_of(model) -> dict:
    """group name -> parameter names: the vocabulary tensors, and each layer's attention and MLP."""
    names = [n for n, _ in tree_flatten(model.parameters()) if n.endswith(".weight") and "norm" not in n]
    groups = {}
    for n in names:
        parts = n.split(".")
        if "layers" in parts:
            i = parts[parts.index("layers") + 1]
            kind = "attn" if any(k in n for k in ("self_attn", "attention")) else "mlp"
            groups.setdefault(f"L{int(i):02d}.{kind}", []).append(n)
        else:
            groups.setdefault("vocab (" + ", ".join(parts[-2:-1]) + ")", []).append(n)
    merged = {}
    for g, ns in groups.items():  # one vocabulary group: embedding and lm_head together
        key = "vocab" if g.startswith("vocab") else g
        merged.setdefault(key, []).extend(ns)
    return dict(sorted(merged.items(), key=lambda kv: (kv[0] != "vocab", kv[0])))


def quantized_weights(source, tokenizer, bits, method, chunks, tag=""):
    """Dequantized fp32 weights of the model quantized at ``bits`` with ``method``, cached."""
    key = f"{Path(source).name}-{method}-{bits:g}{tag}"
    path = cache_dir("diagnose") / f"{key}.safetensors"
    plan_path = path.with_suffix(".plan.json")
    if path.exists() and plan_path.exists():
        return mx.load(str(path)), json.loads(plan_path.read_text())
    model, _ = mlx_utils.load_model(Path(source))
    plan = quantize(model, bits=bits, method=method, tokenizer=tokenizer, calibration=chunks, source=source)
    for_evaluation(model)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path), weights)
    plan_path.write_text(json.dumps(plan.to_dict()))
    return weights, plan.to_dict()


def with_weights(model, weights: dict):
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())


def framed_chunks(tokenizer, answer_tokens: int = 96) -> list:
    """Each of tune_chat_mix.CALIBRATION_PROMPTS in the degeneration check's frame,
    answered by a paragraph of Emma cut to answer_tokens (the chat template closes the
    turn): the frame's positions, without generating anything."""
    from tune_chat_mix import CALIBRATION_PROMPTS  # scripts/

    paras = [p for p in paragraphs("emma") if len(p.split()) > 60]
    step = len(paras) // len(CALIBRATION_PROMPTS)
    chat = bool(getattr(tokenizer, "chat_template", None))
    out = []
    for i, prompt in enumerate(CALIBRATION_PROMPTS):
        answer = tokenizer.decode(tokenizer.encode(paras[i * step], add_special_tokens=False)[:answer_tokens])
        if chat:
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            out.append(list(tokenizer.apply_chat_template(msgs)))
        else:
            out.append(tokenizer.encode(BASE_FRAME.format(prompt) + " " + answer))
    return out


def mixed_table(a: dict, b: dict, weight: float) -> dict:
    """(1 - weight) * a + weight * b: the predicted KL per token of a mix of the two texts' positions."""
    return {p: {k: (1 - weight) * a[p][k] + weight * b[p][k] for k in a[p]} for p in a}


def compare(args, source, out, save):
    """Default allocation against the frame-weighted one, same budget, both gptq."""
    from jang.allocate import plan_from_budget
    from jang.bench import Bench, measured_avg_bits
    from jang.sensitivity import sensitivities

    bench = Bench(source, args.eval_tokens, max_tokens=args.max_tokens, calibration_chunks_n=args.chunks)
    tok = bench.tokenizer
    ends, prompts = end_tokens(tok), prompt_ids(tok)
    framed = framed_chunks(tok)[: args.framed_chunks]
    reference = bench.reference_generations()
    out["compare"] = {"framed_chunks": len(framed), "framed_tokens": sum(map(len, framed)),
                      "framed_sample": tok.decode(framed[0]), "weight": args.weight,
                      "float": {**summary(first_token_probs(bench.ref, prompts), ends),
                                "flagged": reference["fraction"],
                                "outputs": [o["output"] for o in reference["outputs"]]}, "rows": {}}
    model = bench.fresh()[0]
    novels = sensitivities(model, bench.calibration, source=source, progress=False)
    frame = sensitivities(model, framed, source=source, progress=False)
    for name, table in (("default", novels), (f"frame-weighted {args.weight:g}", mixed_table(novels, frame, args.weight))):
        model = bench.fresh()[0]
        plan = plan_from_budget(model, table, args.bits, "gptq")
        quantize(model, plan, tokenizer=tok, calibration=bench.calibration, progress=False)
        row = {"avg_bits": measured_avg_bits(model), **bench.score(model),
               **summary(first_token_probs(model, prompts), ends)}
        deg = bench.generations(model)
        row.update(flagged=deg["fraction"], beyond_float=beyond_reference(deg, reference),
                   salad=deg.get("salad_fraction"), score=deg["mean_score"],
                   flags={f: sum(bool(o[f]) for o in deg["outputs"]) for f in ("loop", "echo", "numbers", "fragments", "salad", "empty")},
                   outputs=[o["output"] for o in deg["outputs"]],
                   plan_bits={p: (t.bits, t.group_size) for p, t in plan.tensors.items()})
        out["compare"]["rows"][name] = row
        print(f"{name:<22} {row['avg_bits']:.3f} bits  KL {row['kl']:.4f}  top1 {row['top1']:.3f}  "
              f"p(end) {row['p_end_mean']:.3f}  end top-1 {row['end_is_top1']}/12  "
              f"flagged {round(row['flagged'] * 12)}/12 {row['flags']}", flush=True)
        save()


def diagnose(args, source, out):
    """First-token end-of-answer numbers, float and quantized, and which groups cause them."""
    tokenizer = mlx_utils.load_tokenizer(source)
    chunks = calibration_chunks(tokenizer, n_chunks=args.chunks)
    ends, prompts = end_tokens(tokenizer), prompt_ids(tokenizer)
    model = for_evaluation(mlx_utils.load_model(source)[0])
    float_w = dict(tree_flatten(model.parameters()))
    quant_w, plan = quantized_weights(source, tokenizer, args.bits, args.method, chunks)
    out["plan_bits"] = {p: (t["bits"], t["group_size"]) for p, t in plan["tensors"].items()}

    def measure(label, weights, key=None):
        """The quantities with the float weights overwritten by ``weights``."""
        with_weights(model, float_w)
        with_weights(model, weights)
        probs = first_token_probs(model, prompts)
        s = summary(probs, ends)
        if key:
            out[key] = {**s, "top5": top5(probs, tokenizer)}
        print(f"  {label:<46} p(end) {s['p_end_mean']:.3f}  end top-1 {s['end_is_top1']}/{len(prompts)}", flush=True)
        return s

    measure("float", {}, "float")
    measure("quantized", quant_w, "quant")
    groups = groups_of(model)
    classes = {"attention": [n for g, ns in groups.items() if g.endswith("attn") for n in ns],
               "mlp": [n for g, ns in groups.items() if g.endswith("mlp") for n in ns], "vocab": groups["vocab"]}
    n_layers = 1 + max(int(g[1:3]) for g in groups if g != "vocab")
    third = -(-n_layers // 3)
    for lo in range(0, n_layers, third):
        hi = min(lo + third, n_layers)
        classes[f"layers {lo}-{hi - 1}"] = [n for g, ns in groups.items()
                                             if g != "vocab" and lo <= int(g[1:3]) < hi for n in ns]
    out["only_quantized"], out["all_but"] = {}, {}
    for c, names in classes.items():
        out["only_quantized"][c] = measure(f"only {c} quantized", {n: quant_w[n] for n in names})
        out["all_but"][c] = measure(f"all quantized but {c}", {**quant_w, **{n: float_w[n] for n in names}})
    embed = next(n for n in groups["vocab"] if "embed" in n)
    out["float_rows"] = {}
    for label, rows in (("end-of-answer rows", sorted(set(ends.values()))),
                        ("special-token rows", sorted(tokenizer.all_special_ids))):
        e = mx.array(quant_w[embed])
        e[mx.array(rows)] = float_w[embed][mx.array(rows)]
        out["float_rows"][label] = measure(f"all quantized, embedding's {label} float", {**quant_w, embed: e})
    out["restore_one"] = {g: measure(f"all quantized but {g}", {**quant_w, **{n: float_w[n] for n in ns}})
                          for g, ns in groups.items()}
    # Cumulative: restore the groups in the order restoring each alone helped most.
    ranked = sorted(out["restore_one"], key=lambda g: out["restore_one"][g]["p_end_mean"])
    out["restore_cumulative"], restored = [], {}
    for g in ranked[:6]:
        restored.update({n: float_w[n] for n in groups[g]})
        out["restore_cumulative"].append({"restored": g, **measure(f"... and {g} float", {**quant_w, **restored})})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=float, default=3.0)
    ap.add_argument("--method", default="gptq", help="quantizer of the diagnosed model (--compare is gptq)")
    ap.add_argument("--chunks", type=int, default=32, help="calibration chunks of 128 tokens of the novels")
    ap.add_argument("--max-tokens", type=int, default=60, help="tokens per degeneration generation (--compare)")
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--no-diagnosis", action="store_true", help="skip the first-token diagnosis and restorations")
    ap.add_argument("--compare", action="store_true", help="then try the frame-weighted allocation (see above)")
    ap.add_argument("--weight", type=float, default=0.5, help="share of the framed positions in the mixed table")
    ap.add_argument("--framed-chunks", type=int, default=32, help="framed conversations measured (at most 32)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    source = resolve_source(args.model)
    out = {"model": args.model, "bits": args.bits, "method": args.method, "chunks": args.chunks,
           "command": " ".join(["python"] + sys.argv),
           "end_tokens": end_tokens(mlx_utils.load_tokenizer(source))}

    def save():
        Path(args.out).write_text(json.dumps(out, indent=1))

    if not args.no_diagnosis:
        diagnose(args, source, out)
        save()
    if args.compare:
        compare(args, source, out, save)


if __name__ == "__main__":
    main()
