"""The two real models this project can reach, one per family, end to end at JANG_4M
and at a ~3-bit budget: converted, loaded, evaluated against the float model on
held-out Austen text, and asked a question. SmolLM2-135M-Instruct (llama) and
Gemma-3-270m (gemma3_text). Conversion details and bit-exact loader agreement are
in test_convert_real.py; this file checks what a user of each family gets."""

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import generate
from mlx_lm import utils as mlx_utils

import jang
from jang import evaluate as ev
from jang.allocate import plan_from_budget
from jang.calibration import calibration_chunks
from jang.profiles import MLX_BITS
from jang.sensitivity import fisher_diagonal, score_table

pytestmark = pytest.mark.real

QUESTION = "What is the capital of France?"


@dataclass
class Real:
    src: Path
    tokenizer: object
    ids: list
    ref_logp: mx.array

    def quality(self, model):
        """(KL to the float model, top-1 agreement) on the held-out ids."""
        _, kl, top1 = ev.next_token_stats(ev.log_probs(ev.for_evaluation(model), self.ids), self.ref_logp, self.ids)
        return kl, top1

    def answer(self, model) -> str:
        """A short greedy answer, through the chat template (instruct) or a question frame (base)."""
        framed, stops = ev.chat_prompt(self.tokenizer, QUESTION)
        return ev.cut(generate(ev.for_generation(model), self.tokenizer, framed, max_tokens=10), stops)


@pytest.fixture(scope="module", params=["smollm2_float", "gemma_float"])
def real(request, austen_text):
    src = Path(request.getfixturevalue(request.param))
    tok = mlx_utils.load_tokenizer(src)
    ids = tok.encode(austen_text)[:128]
    return Real(src, tok, ids, ev.log_probs(ev.for_evaluation(mlx_utils.load_model(src)[0]), ids))


def test_real_model_at_jang_4m(real, tmp_path):
    """Answers as the float model does, and stays close to it."""
    out, _ = jang.convert(str(real.src), tmp_path / "JANG_4M", "JANG_4M", progress=False)
    text = real.answer(jang.load(str(out))[0])
    assert "Paris" in text and not ev.degeneration_scores(text, QUESTION)["degenerate"], text
    kl, top1 = real.quality(jang.load(str(out))[0])
    assert kl < 0.3 and top1 > 0.6, (kl, top1)  # measured: SmolLM2 KL 0.21, top-1 0.69; Gemma 0.17, 0.69


@pytest.mark.slow  # the sensitivity pass: 2.5 min (SmolLM2), 5.3 min (Gemma) on 2 shared cores
def test_real_model_at_a_3_bit_budget(real, tmp_path):
    """A 3.5-bit budget (JANG_3K: the size of mlx-lm's uniform 3-bit, as stored). The
    sensitivity pass is the expensive part, so it runs on 256 calibration tokens and
    scores group-64 candidates only; the allocator is the one --bits uses."""
    model, config = mlx_utils.load_model(real.src, lazy=True)
    fisher = fisher_diagonal(model, calibration_chunks(real.tokenizer, n_chunks=4, chunk=64), progress=False)
    table = score_table(model, fisher, candidates=[(b, 64) for b in MLX_BITS], progress=False)
    jang.quantize(model, plan_from_budget(model, table, 3.5, name="JANG_3K"), progress=False)
    summary = jang.save(model, real.tokenizer, tmp_path / "JANG_3K", config)
    assert 3.4 <= summary["avg_bits"] <= 3.5, summary["avg_bits"]
    text = real.answer(jang.load(str(tmp_path / "JANG_3K"))[0])
    kl, top1 = real.quality(jang.load(str(tmp_path / "JANG_3K"))[0])
    # A model stored or loaded wrongly scores KL ~10 and top-1 ~0. Measured (docs/architectures.md):
    # SmolLM2 KL 1.47, top-1 0.35 (mlx-lm uniform 3-bit: 1.67, 0.24), its answer degenerate;
    # Gemma KL 1.66, top-1 0.26 (uniform 3-bit: 2.07, 0.26); before solve_budget branched on
    # the tied embedding (63% of the weights) it got 2 bits here and KL was 2.30.
    assert kl < 3.0 and top1 > 0.1, (kl, top1, text)
    assert not ev.degeneration_scores(text, QUESTION)["empty"], text
