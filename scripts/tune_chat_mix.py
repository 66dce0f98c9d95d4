"""Experiment: does tuning on chat-formatted text (not only Austen prose) help the
degeneration check of an instruct model?

Tuning on the calibration novels alone taught SmolLM2-Instruct at 2.5 bits to answer
chat prompts with Austen-like prose (docs/quality.md, "Tuning scales and biases").
Here the tuning chunks are the calibration chunks plus the float model's own greedy
answers to CALIBRATION_PROMPTS (instructions written for this, none of them one of
jang.evaluate.DEGENERATION_PROMPTS), in the chat template, cut into chunks of the same
length. Scored as `jang bench quality` scores (held-out KL, top-1, degeneration with
the float model's word-salad check).

    python scripts/tune_chat_mix.py --folder /tmp/jang-tune-sweep/smollm2-135m-2.5-mse --steps 40
    (the folder: a JANG mse conversion at the bits wanted, e.g. from scripts/tune_sweep.py)
"""

import argparse
import json

from mlx_lm.generate import generate

from jang.bench import Bench
from jang.calibration import token_chunks
from jang.convert import resolve_source
from jang.evaluate import DEGENERATION_PROMPTS, beyond_reference, for_evaluation
from jang.loader import load
from jang.tune import tune

CALIBRATION_PROMPTS = (
    "What is the tallest mountain in the world?", "Explain how a rainbow forms.",
    "Write a haiku about autumn leaves.", "Give me a recipe for a simple salad.",
    "Name three planets in our solar system.", "What does a doctor do?",
    "How can I improve my handwriting?", "Who painted the Mona Lisa?",
    "Translate 'thank you' into German.", "What is 9 times 6?",
    "Describe a dog to a child.", "Summarize the story of Little Red Riding Hood.",
    "Why do leaves change colour in the fall?", "Write two sentences about the moon.",
    "List four animals that live in the ocean.", "How do I make a cup of tea?",
    "Give me two tips for sleeping better.", "Who was Albert Einstein?",
    "What is the capital of Japan?", "Explain what a computer does in simple words.",
    "Write a short story about a brave mouse.", "What are the colours of the rainbow?",
    "How many days are there in a leap year?", "Describe the smell of fresh bread.",
    "What should I pack for a trip to the beach?", "Why is exercise good for you?",
    "Tell me a fun fact about elephants.", "What is the difference between a lake and a sea?",
    "How do plants make their food?", "Suggest a name for a pet goldfish.",
    "What is the boiling point of water?", "Write a thank-you note to a teacher.",
)
assert not set(CALIBRATION_PROMPTS) & set(DEGENERATION_PROMPTS)


def chat_chunks(model, tokenizer, max_tokens: int, chunk: int):
    """The float model's answers to CALIBRATION_PROMPTS, in the chat template, as chunks."""
    texts = []
    for prompt in CALIBRATION_PROMPTS:
        framed = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=False)
        texts.append(framed + generate(model, tokenizer, framed, max_tokens=max_tokens))
    stream_tokens = sum(len(tokenizer.encode(t)) for t in texts)
    return token_chunks(tokenizer, ["".join(texts)], stream_tokens // chunk, chunk)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--folder", required=True, help="the JANG conversion to tune")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--answer-tokens", type=int, default=96)
    args = ap.parse_args()

    source = resolve_source(args.model)
    bench = Bench(source, 1024, max_tokens=60, calibration_chunks_n=32)
    chat = chat_chunks(bench.ref, bench.tokenizer, args.answer_tokens, 128)
    chunks = bench.calibration + chat
    model, _ = load(args.folder)
    stats = tune(model, bench.ref, chunks, steps=args.steps, lr=args.lr, progress=False, cache_bytes=0)
    reference = bench.reference_generations()
    report = bench.generations(model)  # for_evaluation: model is dequantized from here on
    score = bench.score(model)
    out = {"folder": args.folder, "chunks": {"austen": len(bench.calibration), "chat": len(chat)}, **score,
           "tuning": stats, "flagged": report["fraction"], "salad": report.get("salad_fraction"),
           "beyond_float": beyond_reference(report, reference), "score": report["mean_score"],
           "outputs": [o["output"] for o in report["outputs"]]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
