"""jang.coherence: word salad judged by the float model (SmolLM2-135M) — real text is
not salad, shuffled words and random tokens are — and how the flag joins the others."""

import random
from pathlib import Path

import pytest
from mlx_lm import utils as mlx_utils

from jang import evaluate as ev
from jang.coherence import MIN_TOKENS, SaladCheck
from jang.data import paragraphs

# mlx-lm uniform 2-bit on SmolLM2-135M, "Explain why the sky is blue in two sentences." (measured):
# no repeated 4-gram, no letter fragments, so only the float model can tell it is not language.
MLX_2BIT_SALAD = ("scrut dissemin, dissemin philos Pharise harv cyl miscon super dissemin, enric cyl evid WWF evid a "
                  "disadvant Talm ndarray, defe from on not precedions to oracle dissemin defe harv. awa defe. "
                  "dissemin Pharise dissemin libr compan libr dissemin enshr; evid acknow dissemin miscon")


@pytest.fixture(scope="module")
def salad(smollm2_float):
    model, _ = mlx_utils.load_model(Path(smollm2_float))
    return SaladCheck(ev.for_evaluation(model), mlx_utils.load_tokenizer(Path(smollm2_float)))


def continuations(n=6, words=60):
    """(first half, second half) of held-out paragraphs (Pride and Prejudice: not the
    paragraphs the threshold was placed with)."""
    paras = [p.split() for p in paragraphs("prideprejudice")[40:40 + n]]
    return [(" ".join(p[: words // 2]), " " + " ".join(p[words // 2: words])) for p in paras]


@pytest.mark.real
def test_threshold_sits_between_prose_and_shuffled_prose(salad):
    cal = salad.calibration()
    # measured: prose 4.36, shuffled 7.19, threshold 5.77
    assert cal["prose_nll"] + 1.0 < cal["threshold"] < cal["shuffled_nll"] - 1.0, cal


@pytest.mark.real
def test_real_text_continuations_are_not_salad(salad):
    for context, rest in continuations():
        nll = salad.nll(context, rest)
        assert nll < salad.threshold, (nll, rest)


@pytest.mark.real
def test_shuffled_words_and_random_tokens_are_salad(salad):
    rng = random.Random(0)
    vocab = salad.tokenizer.vocab_size
    for i, (context, rest) in enumerate(continuations()):
        words = rest.split()
        rng.shuffle(words)
        assert salad.nll(context, " " + " ".join(words)) > salad.threshold, words
        noise = salad.tokenizer.decode([rng.randrange(vocab) for _ in range(30)])
        assert salad.nll(context, noise) > salad.threshold, noise


@pytest.mark.real
def test_measured_mlx_2bit_output_is_flagged_as_salad_only(salad):
    prompt = "Explain why the sky is blue in two sentences."
    framed, _ = ev.chat_prompt(salad.tokenizer, prompt)
    nll = salad.nll(framed, MLX_2BIT_SALAD)
    text_only = ev.degeneration_scores(MLX_2BIT_SALAD, prompt)
    judged = ev.degeneration_scores(MLX_2BIT_SALAD, prompt, nll / salad.threshold)
    assert not text_only["degenerate"]  # the string rules alone miss it
    assert judged["salad"] and judged["degenerate"] and judged["score"] == 1.0, (nll, judged)
    assert not any(judged[f] for f in ("loop", "echo", "numbers", "fragments", "empty"))
    answer = ("The sky looks blue because air molecules scatter short blue wavelengths of sunlight much more "
              "than red ones. That scattered blue light reaches our eyes from every direction of the sky.")
    assert salad.nll(framed, answer) < salad.threshold


@pytest.mark.real
def test_short_answers_are_not_judged(salad):
    assert salad.nll("What is the capital of France?", "Paris.") is None
    assert len(salad.tokenizer.encode("Paris.", add_special_tokens=False)) < MIN_TOKENS


def test_salad_flag_joins_the_others():
    fluent = "The capital of France is Paris, a city on the Seine."
    assert not ev.degeneration_scores(fluent, salad=0.2)["degenerate"]
    flagged = ev.degeneration_scores(fluent, salad=1.3)
    assert flagged["salad"] and flagged["degenerate"] and flagged["score"] == 1.0


def test_beyond_reference_counts_only_failures_the_float_model_did_not_have():
    def report(*flags):
        return {"outputs": [{"degenerate": f} for f in flags]}

    float_ = report(True, False, False, False)
    assert ev.beyond_reference(report(True, True, False, False), float_) == 0.25  # the shared loop is not counted
    assert ev.beyond_reference(float_, float_) == 0.0
