"""Word salad: generated text that the float reference model finds implausible.

The other degeneration checks (jang.evaluate) read the text alone. They catch loops,
echoes and runs, but a broken low-bit model can also emit repetition-free garbage
("evid evid compan in aro postdocs horizns cervor to X surrog ...") that no string
rule tells from language. The float model can: it is what the quantized model is
meant to imitate, and it is not the model being judged.

What is measured: the float model's mean negative log-likelihood (nats per token) of
the generated text, given the prompt the generation answered. Where the line sits is
calibrated per model, on held-out prose and never on generations: the float model
reads paragraphs of the evaluation novels, and the same paragraphs with their words
shuffled. Real prose and its shuffled copy have the same words; only the order,
which is what makes text language, differs. A generation is word salad when its NLL is
above the midpoint of the two: closer to shuffled words than to prose, in the float
model's own judgement.

SmolLM2-135M, measured: held-out paragraphs 4.36 nats/token, shuffled 7.19 (threshold
5.77); its own greedy answers 0.3-1.0; mlx-lm uniform 2-bit's salad 10.3-12.8; real
prose stuck after an unrelated question 3.8-5.6 (not salad). Gemma-3-270m: 4.16,
6.94, threshold 5.55. A loop scores low (once started, a repetition is predictable):
loops are the string rules' job (jang.evaluate), salad this one's.
"""

import random

import mlx.core as mx
import mlx.nn as nn

from .calibration import adds_bos
from .data import paragraphs

# Paragraphs of held-out prose that place the threshold, and how many words of each:
# about a generation's length (48-80 tokens).
PROSE_BOOK, PROSE_PARAGRAPHS, PROSE_WORDS = "persuasion", 24, 48
# Fewer tokens than this say too little: the mean of two surprisals is not a verdict
# ("Je ne sarace pas la bonne mère." is 11 tokens at 3.5 nats from SmolLM2 float).
MIN_TOKENS = 8


def prompt_ids(tokenizer, prompt) -> list:
    """Token ids a generation was conditioned on: chat templates give ids already; a
    string is encoded as mlx-lm's generate encodes it (BOS included where the tokenizer adds it)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt) if prompt else ([tokenizer.bos_token_id] if adds_bos(tokenizer) else [])
    return list(prompt)


def text_nll(model, context: list, ids: list) -> float:
    """Mean NLL (nats/token) of ``ids`` following ``context`` under ``model``. With no
    context the first token is given, not scored."""
    full = list(context) + list(ids)
    first = max(len(context), 1)
    logp = nn.log_softmax(model(mx.array([full[:-1]]))[0].astype(mx.float32), axis=-1)[first - 1:]
    targets = mx.array(full[first:])
    return -mx.take_along_axis(logp, targets[:, None], axis=-1).mean().item()


def shuffled(text: str, seed: int) -> str:
    words = text.split()
    random.Random(seed).shuffle(words)
    return " ".join(words)


class SaladCheck:
    """Scores generations with the float model ``ref_model`` (prepared by
    evaluate.for_evaluation). ``prose_nll`` / ``shuffled_nll``: its mean NLL on held-out
    paragraphs as written and with their words shuffled; ``threshold``: their midpoint."""

    def __init__(self, ref_model, tokenizer):
        self.model, self.tokenizer = ref_model, tokenizer
        start = prompt_ids(tokenizer, "")
        texts = [" ".join(p.split()[:PROSE_WORDS]) for p in paragraphs(PROSE_BOOK)[:PROSE_PARAGRAPHS]]
        self.prose_nll = self._mean(start, texts)
        self.shuffled_nll = self._mean(start, [shuffled(t, i) for i, t in enumerate(texts)])
        self.threshold = (self.prose_nll + self.shuffled_nll) / 2

    def _mean(self, start, texts) -> float:
        return sum(text_nll(self.model, start, self._encode(t)) for t in texts) / len(texts)

    def _encode(self, text: str) -> list:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def nll(self, prompt, text: str):
        """The float model's mean NLL of ``text`` as the answer to ``prompt`` (a string or
        the ids generation started from); None below MIN_TOKENS tokens."""
        ids = self._encode(text)
        return text_nll(self.model, prompt_ids(self.tokenizer, prompt), ids) if len(ids) >= MIN_TOKENS else None

    def calibration(self) -> dict:
        return {"prose_nll": self.prose_nll, "shuffled_nll": self.shuffled_nll, "threshold": self.threshold,
                "min_tokens": MIN_TOKENS, "book": PROSE_BOOK, "paragraphs": PROSE_PARAGRAPHS, "words": PROSE_WORDS}
