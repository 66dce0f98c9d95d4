"""Experiment: does GPTQ (and the sensitivity measurement that allocates the bits)
calibrated on chat-formatted text help the degeneration check of a small model?

Two arms, the same number of calibration chunks of 128 tokens each:

- novels: the default calibration (jang.calibration.calibration_chunks: four Austen novels);
- chat:   half of them from the novels, half from the float model's own greedy answers to
          tune_chat_mix.CALIBRATION_PROMPTS (instructions written for it, none of them one of
          jang.evaluate.DEGENERATION_PROMPTS), in the frame the degeneration check uses
          (jang.evaluate.chat_prompt: the chat template, or "Question: ... Answer:" for a
          base model), one conversation after another, cut into chunks;
- chat-only (not a default arm): all of them from those answers.

Each arm's sensitivities are measured on its own chunks (cached under
~/.cache/jang/sensitivity), then each budget is converted with --method gptq and scored
exactly as `jang bench quality` scores a row: held-out KL / top-1 / perplexity on Pride
and Prejudice, greedy degeneration on the 12 prompts with the float model's word-salad
check, and "beyond float" against the float model's own generations.

    python scripts/gptq_chat_calibration.py --model smollm2-135m --bits 3.0 2.5 \
        --out docs/gptq-chat-calibration-smollm2-135m.json
    python scripts/gptq_chat_calibration.py --model gemma-3-270m --bits 3.0 --chunks 8 --answer-tokens 64 \
        --out docs/gptq-chat-calibration-gemma-3-270m.json

The JSON is rewritten after every row (a run can be stopped and its rows kept).
"""

import argparse
import json
import sys
import time
from pathlib import Path

from mlx_lm.generate import stream_generate
from tune_chat_mix import CALIBRATION_PROMPTS  # scripts/: the instructions, none a degeneration prompt

from jang.bench import Bench
from jang.calibration import calibration_chunks, token_chunks
from jang.convert import resolve_source
from jang.evaluate import BASE_FRAME, BASE_STOPS, beyond_reference, cut


def self_chat_texts(model, tokenizer, prompts=CALIBRATION_PROMPTS, max_tokens: int = 128) -> list:
    """The model's own greedy answers to ``prompts``, one text per conversation, framed as
    the degeneration check frames its prompts (jang.evaluate.chat_prompt): the whole
    exchange in the chat template when the tokenizer has one (closed with the template's
    end of turn only when the model ended its turn itself), else the base-model
    "Question: ... Answer: ..." frame, the answer cut where it starts a new question."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    texts = []
    for prompt in prompts:
        user = [{"role": "user", "content": prompt}]
        framed = (tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False) if chat
                  else BASE_FRAME.format(prompt))
        steps = list(stream_generate(model, tokenizer, framed, max_tokens=max_tokens))
        answer = "".join(s.text for s in steps)
        if not chat:
            texts.append(framed + cut(answer, BASE_STOPS) + "\n\n")
        elif steps and steps[-1].finish_reason == "stop":
            texts.append(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}],
                                                       tokenize=False))
        else:  # cut off at max_tokens: no end of turn the model did not write
            texts.append(framed + answer)
    return texts


def self_chat_chunks(model, tokenizer, n_chunks: int, chunk: int = 128, max_tokens: int = 128) -> list:
    """n_chunks chunks of chunk tokens of self_chat_texts, spread over its token stream as
    jang.calibration.token_chunks spreads the novels."""
    return token_chunks(tokenizer, self_chat_texts(model, tokenizer, max_tokens=max_tokens), n_chunks, chunk)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=float, nargs="+", default=[3.0, 2.5])
    ap.add_argument("--arms", nargs="+", default=["novels", "chat"], choices=["novels", "chat", "chat-only"])
    ap.add_argument("--chunks", type=int, default=32, help="calibration chunks of 128 tokens, per arm")
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=60, help="tokens per degeneration generation")
    ap.add_argument("--answer-tokens", type=int, default=128, help="tokens per self-generated calibration answer")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    source = resolve_source(args.model)
    bench = Bench(source, args.eval_tokens, max_tokens=args.max_tokens, calibration_chunks_n=args.chunks)
    out = {"model": args.model, "chunks": args.chunks, "eval_tokens": args.eval_tokens,
           "max_tokens": args.max_tokens, "answer_tokens": args.answer_tokens,
           "command": " ".join(["python"] + sys.argv), "rows": []}

    def save():
        Path(args.out).write_text(json.dumps(out, indent=1))

    reference = bench.reference_generations()
    out["float"] = {"flagged": reference["fraction"], "salad": reference.get("salad_fraction"),
                    "outputs": [o["output"] for o in reference["outputs"]]}
    save()
    for arm in args.arms:
        t0 = time.perf_counter()
        if arm == "novels":
            chunks = calibration_chunks(bench.tokenizer, n_chunks=args.chunks)
            chat_seconds = 0.0
        else:
            n_chat = args.chunks // 2 if arm == "chat" else args.chunks
            chat = self_chat_chunks(bench.ref, bench.tokenizer, n_chat, max_tokens=args.answer_tokens)
            chat_seconds = time.perf_counter() - t0
            novels = calibration_chunks(bench.tokenizer, n_chunks=args.chunks - n_chat) if n_chat < args.chunks else []
            chunks = novels + chat
            out.setdefault("chat_sample", bench.tokenizer.decode(chat[0]))
        bench.calibration = chunks
        sens = bench.sensitivity_cost()
        for bits in args.bits:
            row = bench.jang(f"JANG gptq {bits} ({arm})", generate=True, bits=bits, method="gptq")
            deg = row.pop("degeneration")
            row.update(arm=arm, bits=bits, chat_generation_seconds=chat_seconds,
                       sensitivity_seconds=sens["seconds"], flagged=deg["fraction"],
                       salad=deg.get("salad_fraction"), beyond_float=beyond_reference(deg, reference),
                       score=deg["mean_score"], outputs=[o["output"] for o in deg["outputs"]])
            print(f"  {arm} {bits}: flagged {deg['fraction']:.0%} salad {deg.get('salad_fraction'):.0%} "
                  f"beyond float {row['beyond_float']:.0%}", flush=True)
            out["rows"].append(row)
            save()


if __name__ == "__main__":
    main()
