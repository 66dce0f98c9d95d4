"""``jang eval``: a quantized model against its float reference, as a table (and JSON).

jang.cli wires it in with ``add_eval_parser(sub)``.
"""

import json
from pathlib import Path


def _num(value, fmt):
    return "-" if value is None else format(value, fmt)


def _degeneration(checks):
    d = checks.get("degeneration")
    return None if d is None else f"{sum(r['degenerate'] for r in d['outputs'])}/{d['n']}"


def _salad(checks):
    d = checks.get("degeneration")
    return None if d is None else f"{sum(r['salad'] for r in d['outputs'])}/{d['n']}"


def _mmlu(checks):
    m = checks.get("mmlu")
    return None if m is None else f"{m['accuracy']:.3f}"


def rows(result: dict) -> list:
    """(label, model column, reference column) for each line of the table."""
    q, mine, ref = result["quality"], result["model_checks"], result["reference_checks"]
    table = [
        ("KL(reference || model) /token", _num(q["kl"], ".4f"), "-"),
        ("perplexity", _num(q["ppl"], ".3f"), _num(q["ref_ppl"], ".3f")),
        ("top-1 agreement with reference", _num(q["top1"], ".3f"), "-"),
    ]
    if "degeneration" in mine:
        table.append(("degenerate generations", _degeneration(mine), _degeneration(ref)))
        table.append(("  of which word salad", _salad(mine), _salad(ref)))
        table.append(("  degenerate where reference is not", _num(mine["degeneration"].get("beyond_reference"), ".0%"),
                      "-"))
    if "mmlu" in mine:
        table.append((f"MMLU accuracy (n={mine['mmlu']['n']})", _mmlu(mine), _mmlu(ref)))
        table.append(("MMLU answers same as reference", _num(mine["mmlu"]["agreement"], ".3f"), "-"))
    table.append(("average bits", _num(result["avg_bits"], ".3f"), "-"))
    return table


def format_result(result: dict) -> str:
    lines = [f"model:     {result['model']}", f"reference: {result['reference']}",
             f"held-out text: {result['quality']['tokens']} tokens of Pride and Prejudice and Persuasion", ""]
    width = max(len(label) for label, _, _ in rows(result)) + 2
    lines.append(f"{'':<{width}}{'model':>12}{'reference':>12}")
    lines += [f"{label:<{width}}{a:>12}{b:>12}" for label, a, b in rows(result)]
    return "\n".join(lines)


def cmd_eval(args):
    from .evaluate import evaluate

    result = evaluate(args.model, args.reference, n_tokens=args.tokens, degeneration=not args.no_degeneration,
                      mmlu=args.mmlu, max_tokens=args.max_tokens, native_generation=args.native_generation)
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


def add_eval_parser(sub):
    """Add the ``eval`` subcommand to an argparse subparsers object."""
    p = sub.add_parser(
        "eval", help="compare a quantized model with its float reference",
        description="KL divergence, perplexity and top-1 agreement on held-out Jane Austen text; "
                    "a degeneration check on greedy generations; optional zero-shot MMLU.")
    p.add_argument("--model", required=True, help="the (JANG) model folder to evaluate")
    p.add_argument("--reference", help="float reference: folder, .gguf or bundled model name "
                                       "(default: the source recorded in the model's jang_config.json)")
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens for KL / perplexity (2048)")
    p.add_argument("--no-degeneration", action="store_true", help="skip the greedy-generation check")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens generated per degeneration prompt (48)")
    p.add_argument("--native-generation", action="store_true",
                   help="generate through the quantized layers (slower on CPU) instead of the dequantized fp32 copy")
    p.add_argument("--mmlu", type=int, default=0, metavar="N", help="also score N MMLU questions, zero-shot (0: skip)")
    p.add_argument("--json", metavar="FILE", help="also write every number (and the generations) as JSON")
    p.set_defaults(func=cmd_eval)
    return p
