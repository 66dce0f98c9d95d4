"""jang.evaluate: the degeneration detector on hand-written texts, held-out chunks,
MMLU data, and (on SmolLM2) quality, MMLU, generation and the ``jang eval`` command."""

import argparse
import json
from pathlib import Path

import pytest
from mlx_lm import utils as mlx_utils

import jang
from jang.calibration import CALIBRATION_BOOKS
from jang import evaluate as ev
from jang.eval_cli import add_eval_parser

SKY = "Explain why the sky is blue in two sentences."

# (output, prompt, the flag it must raise)
DEGENERATE = [
    pytest.param("The sky is blue in two sentences.\n\nThis is a simple explanation of the explanation.\n\n"
                 "The explanation is explained in two sentences.\n\nThe explanation is explained in two "
                 "sentences.\n\nThe explanation is explained in two sentences", SKY, "loop",
                 id="loop (SmolLM2 JANG_4M, measured)"),
    pytest.param("Once upon a time, in a small village by the mountains, there lived a woman named Elara who was a "
                 "skilled healer. She was a fierce warrior, a fierce warrior, a fierce warrior. She was a fierce "
                 "warrior, a", "Continue this story: Once upon a time", "loop", id="tail loop (JANG_4M, measured)"),
    pytest.param("The story of Romeo and Juliet by William Shakespeare is widely regarded as one of the most iconic "
                 "and enduring works of literature. It's a classic Romeo and Juliet, a Romeo and Juliet, a Romeo and "
                 "Juliet, a Romeo and Juliet, a", "Who wrote Romeo and Juliet?", "loop",
                 id="tail loop 2 (JANG_4M, measured)"),
    pytest.param("Paris" + "!" * 30, "What is the capital of France?", "loop", id="character run"),
    pytest.param("H2D file, You D D L L R E D, F G R L M E D L L L L L L L L L L", "How do I boil an egg?", "loop",
                 id="one-letter cycle (SmolLM2 JANG_2M, measured)"),
    pytest.param("\nL. B. numerableun\n\n\n\n61\n\n(e.at)" + "\n" * 30, "List five fruits that are red.", "loop",
                 id="newline run (SmolLM2 JANG_2M, measured)"),
    pytest.param("tensipsipsoftipsoftipsoftipsipsipsipsipsipsipsipsipsipsipsipsipsips", "How do I boil an egg?",
                 "loop", id="piece run inside a word (SmolLM2 JANG mse 2.5 bits, measured)"),
    pytest.param(" has seen them." + "\n  " * 20, "Describe a cat to someone who has never seen one.", "loop",
                 id="blank run (Gemma-3-270m JANG mse 2.5 bits, measured)"),
    pytest.param("for postdocs fingertmlmlmlmlmlmlmlmlmlmlmlmlml", "Give me three tips for staying focused "
                 "while studying.", "loop", id="two-letter piece run (SmolLM2 JANG mse 2.5 bits, measured)"),
    pytest.param('\n "FG, G L.EW:2LBR:363: Ei.GL. G.EW.G L.E.G.E. G.E. G.L.E', "What is the capital of France?",
                 "fragments", id="letter salad (SmolLM2 JANG_2M, measured)"),
    pytest.param("\n\n1. Read the book.\n2. Read the book.\n3. Read the book.\n4. Read the book.\n5. Read the",
                 "Give me three tips for staying focused while studying.", "loop",
                 id="numbered loop (Gemma-3-270m base, measured)"),
    pytest.param("Explain why the sky is blue in two sentences", SKY, "echo", id="echo"),
    pytest.param("The answer is 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20", "What is 12 plus 7?",
                 "numbers", id="counting"),
    pytest.param("19000000000000000000000000000000", "What is 12 plus 7?", "numbers", id="digit run"),
    pytest.param("", "Who wrote Romeo and Juliet?", "empty", id="empty"),
    pytest.param(" \n\n ...", "Who wrote Romeo and Juliet?", "empty", id="whitespace"),
]

NORMAL = [
    ("The capital of France is Paris.", "What is the capital of France?"),
    ("The sky is blue because of a process called Rayleigh scattering, where light encounters tiny molecules "
     "of air and is deflected by them. Blue light is scattered more than red light, so the sky looks blue.", SKY),
    ("Here are five red fruits:\n\n1. Strawberries\n2. Raspberries\n3. Cherries\n4. Red apples\n5. Pomegranates",
     "List five fruits that are red."),
    ("1. **Strawberries**: A sweet red fruit.\n2. **Cherries**: A small red fruit.\n3. **Raspberries**: "
     "A soft red fruit.", "List five fruits that are red."),
    ("12 plus 7 equals 19. To check: 19 - 7 = 12.", "What is 12 plus 7?"),
    ("Romeo and Juliet was written by William Shakespeare around 1594-1596, early in his career.",
     "Who wrote Romeo and Juliet?"),
    ("The waves roll in with silver light,\nThey whisper secrets to the night,\nThe gulls cry out above the foam,\n"
     "The sea will always be my home.", "Write a short poem about the sea."),
    ("Bonjour (French) and Buenos días (Spanish).", "Translate 'good morning' into French and Spanish."),
    ("No, no, no! That is not how you boil an egg: very, very gently, please.", "How do I boil an egg?"),
    ("J. K. Rowling wrote the Harry Potter books; Tolkien wrote The Hobbit.", "Name two fantasy authors."),
    ("The waves of the ocean, a tapestry woven with life,\nA canvas of endless blue, a canvas of endless blue,\n"
     "A realm where the unknown lies, a realm where the unknown lies,\nA world where the sea is a",
     "Write a short poem about the sea."),  # SmolLM2 float, measured: repetitive, but a poem
]


@pytest.mark.parametrize("text, prompt, flag", DEGENERATE)
def test_degenerate_outputs_are_flagged(text, prompt, flag):
    s = ev.degeneration_scores(text, prompt)
    assert s[flag] and s["degenerate"] and s["score"] == 1.0, s


@pytest.mark.parametrize("text, prompt", NORMAL)
def test_normal_outputs_are_not_flagged(text, prompt):
    s = ev.degeneration_scores(text, prompt)
    assert not s["degenerate"] and 0.0 <= s["score"] < 1.0, s
    assert not any(s[f] for f in ("loop", "echo", "numbers", "fragments", "empty")), s


def test_base_models_answer_in_a_question_frame():
    class Base:
        chat_template = None

    framed, stops = ev.chat_prompt(Base(), "Who wrote Romeo and Juliet?")
    assert framed == "Question: Who wrote Romeo and Juliet?\nAnswer:"
    assert ev.cut(" Shakespeare.\nQuestion: Who wrote Hamlet?\nAnswer: Shakespeare", stops) == " Shakespeare."


def test_degeneration_prompts_are_varied():
    assert 10 <= len(ev.DEGENERATION_PROMPTS) <= 14
    assert len(set(ev.DEGENERATION_PROMPTS)) == len(ev.DEGENERATION_PROMPTS)


class CharTokenizer:
    """One token per character, except the strings in ``words``; optionally adds BOS
    (id 1) like Gemma's tokenizer."""

    def __init__(self, bos=True, words=None):
        self.bos_token_id = 1 if bos else None
        self.words = words or {}

    def encode(self, text, add_special_tokens=True):
        ids = [self.words[text]] if text in self.words else [ord(c) + 2 for c in text]
        return ([1] if self.bos_token_id and add_special_tokens else []) + ids


@pytest.mark.parametrize("bos", [True, False])
def test_eval_tokens_are_deterministic_held_out_chunks(bos):
    tok = CharTokenizer(bos)
    chunks = ev.eval_tokens(tok, 1024, 256)
    assert chunks == ev.eval_tokens(tok, 1024, 256)
    assert len(chunks) == 4 and all(len(c) == 256 for c in chunks)
    assert all((c[0] == 1) == bos for c in chunks)  # BOS starts every chunk, or none
    assert len({tuple(c) for c in chunks}) == 4
    assert set(ev.EVAL_BOOKS).isdisjoint(CALIBRATION_BOOKS)


def test_letter_tokens_with_and_without_leading_space():
    spaced = CharTokenizer(words={f" {c}": 100 + i for i, c in enumerate("ABCD")})  # BPE: " A" is one token
    assert ev.letter_token_ids(spaced) == [100, 101, 102, 103]
    assert ev.letter_token_ids(CharTokenizer()) == [ord(c) + 2 for c in "ABCD"]  # " A" splits: use "A"


def test_mmlu_questions_and_sample():
    questions = ev.mmlu_questions()
    assert len(questions) == 14042
    assert all(q["correct_answer"] in "ABCD" and q["answer_d"] is not None for q in questions)
    sample = ev.mmlu_sample(20, seed=0)
    assert sample == ev.mmlu_sample(20, seed=0) and sample != ev.mmlu_sample(20, seed=1)
    prompt = ev.mmlu_prompt(sample[0])
    assert prompt.endswith("Answer:") and "\nD. " in prompt and sample[0]["question"] in prompt


# ---------------------------------------------------------------- SmolLM2
# Sizes are small to keep this file near two minutes on 2 CPU cores; `jang eval`
# at its defaults gives the numbers worth reading (see the report in evaluate.py).


@pytest.fixture(scope="module")
def smollm2(smollm2_float):
    """The float model in fp32 (for_evaluation) and its tokenizer."""
    model, _ = mlx_utils.load_model(Path(smollm2_float))
    return ev.for_evaluation(model), mlx_utils.load_tokenizer(Path(smollm2_float))


@pytest.fixture(scope="module")
def smollm2_2m(smollm2_float, tmp_path_factory):
    """A JANG_2M folder converted from the float model."""
    out, _ = jang.convert(str(smollm2_float), tmp_path_factory.mktemp("eval") / "JANG_2M", "JANG_2M", progress=False)
    return out


@pytest.mark.real
def test_quality_float_vs_itself_and_profiles(smollm2, smollm2_float, smollm2_2m):
    ref, tok = smollm2
    again = ev.for_evaluation(mlx_utils.load_model(Path(smollm2_float))[0])  # a second copy, not the same object
    same = ev.quality(again, ref, tok, n_tokens=128)
    assert same["kl"] < 1e-6 and same["top1"] == 1.0 and same["tokens"] == 127, same
    assert same["ppl"] == pytest.approx(same["ref_ppl"], rel=1e-5) and same["ref_ppl"] < 60, same

    q4_model, _ = mlx_utils.load_model(Path(smollm2_float))
    jang.quantize(q4_model, "JANG_4M", progress=False)
    q4 = ev.quality(ev.for_evaluation(q4_model), ref, tok, n_tokens=128)
    q2 = ev.quality(ev.for_evaluation(jang.load(str(smollm2_2m))[0]), ref, tok, n_tokens=128)
    # measured at 2048 tokens: JANG_4M KL 0.22, top-1 0.69; JANG_2M KL 3.14, top-1 0.15
    assert q2["kl"] > q4["kl"] > 0, (q4, q2)
    assert q4["top1"] > q2["top1"] and q2["ppl"] > q4["ppl"], (q4, q2)


@pytest.mark.real
def test_mmlu_runs_on_smollm2(smollm2):
    model, tok = smollm2
    r = ev.mmlu_accuracy(model, tok, n=20)
    assert r["n"] == 20 and 0.0 <= r["accuracy"] <= 1.0 and len(r["answers"]) == 20, r
    assert set(r["answers"]) <= set("ABCD")


@pytest.mark.real
def test_degeneration_report_uses_the_chat_template(smollm2):
    model, tok = smollm2
    r = ev.degeneration_report(model, tok, max_tokens=12, prompts=ev.DEGENERATION_PROMPTS[:2])
    assert r["n"] == 2 and 0.0 <= r["fraction"] <= 1.0 and 0.0 <= r["mean_score"] <= 1.0
    assert "Paris" in r["outputs"][0]["output"]  # the instruct model answers, through its template


@pytest.mark.real
def test_degeneration_report_samples_one_generation_per_seed(smollm2):
    """With a sampler, each prompt is generated once per seed; a seed gives the same text again."""
    from mlx_lm.sample_utils import make_sampler

    model, tok = smollm2
    sampler = make_sampler(temp=1.0)
    r = ev.degeneration_report(model, tok, max_tokens=12, prompts=ev.DEGENERATION_PROMPTS[:1], sampler=sampler,
                               seeds=(0, 1, 0))
    assert r["n"] == 3 and [o["prompt"] for o in r["outputs"]] == [ev.DEGENERATION_PROMPTS[0]] * 3
    texts = [o["output"] for o in r["outputs"]]
    assert texts[0] == texts[2]


@pytest.mark.real
def test_eval_command(tmp_path, smollm2_float, smollm2_2m, capsys, monkeypatch):
    """jang eval on a JANG_2M folder: the reference defaults to the source in jang_config.json;
    generation runs through the quantized layers."""
    monkeypatch.setattr(ev, "DEGENERATION_PROMPTS", ("What is the capital of France?",))
    parser = argparse.ArgumentParser(prog="jang")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    report = tmp_path / "eval.json"
    args = parser.parse_args(["eval", "--model", str(smollm2_2m), "--tokens", "64", "--mmlu", "1",
                              "--max-tokens", "6", "--native-generation", "--json", str(report)])
    args.func(args)
    printed = capsys.readouterr().out
    result = json.loads(report.read_text())
    assert result["reference"] == str(smollm2_float)
    assert result["quality"]["tokens"] == 63 and result["quality"]["kl"] > 0
    assert result["avg_bits"] == json.loads((smollm2_2m / "jang_config.json").read_text())["avg_bits"]
    for checks in (result["model_checks"], result["reference_checks"]):
        assert checks["degeneration"]["n"] == 1 and checks["mmlu"]["n"] == 1
    for label in ("KL", "perplexity", "top-1", "degenerate", "MMLU", f"{result['quality']['kl']:.4f}"):
        assert label in printed
