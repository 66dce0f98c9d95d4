"""jang.tune on SmolLM2-135M and real text: tuning the scales and biases toward the float
model lowers the KL on *held-out* text, keeps the codes and the stored layout, and the
tuned model saves and reloads unchanged."""

import copy
import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import utils as mlx_utils

import jang
from jang.calibration import calibration_chunks
from jang.evaluate import eval_tokens, for_evaluation, log_probs, next_token_stats
from jang.tune import tunable_layers, tune

pytestmark = pytest.mark.real

PROFILE = "JANG_2M"  # a named profile: rtn, no sensitivity pass, 2-bit MLPs (plenty to recover)
STEPS, LR = 8, 1e-4


def heldout_kl(model, ref, ids_list) -> float:
    """Mean KL(float || model) over held-out chunks (models prepared by for_evaluation)."""
    kls = [next_token_stats(log_probs(model, ids), log_probs(ref, ids), ids)[1] for ids in ids_list]
    return sum(kls) / len(kls)


@pytest.fixture(scope="module")
def tuned(smollm2_float):
    """(float model fp32, untuned, tuned, tune stats, tokenizer): SmolLM2 JANG_2M, tuned for
    a few steps on 8 calibration chunks."""
    source = Path(smollm2_float)
    tokenizer = mlx_utils.load_tokenizer(source)
    untuned, _ = mlx_utils.load_model(source)
    ref = for_evaluation(copy.deepcopy(untuned))
    jang.quantize(untuned, PROFILE, progress=False)
    model = copy.deepcopy(untuned)
    chunks = calibration_chunks(tokenizer, n_chunks=8, chunk=64)  # short chunks: a fast test
    stats = tune(model, ref, chunks, steps=STEPS, lr=LR, batch_size=2, progress=False)
    return ref, untuned, model, stats, tokenizer


def test_tuning_lowers_heldout_kl(tuned):
    ref, untuned, model, stats, tokenizer = tuned
    held_out = eval_tokens(tokenizer, 512, 256)  # Pride and Prejudice / Persuasion: never tuned on
    before = heldout_kl(for_evaluation(copy.deepcopy(untuned)), ref, held_out)
    after = heldout_kl(for_evaluation(copy.deepcopy(model)), ref, held_out)
    assert stats["steps"] == STEPS and stats["kl_last"] < stats["kl_first"]
    assert after < 0.9 * before, (before, after, stats)


def test_only_scales_and_biases_change(tuned):
    _, untuned, model, stats, _ = tuned
    before, after = dict(tree_flatten(untuned.parameters())), dict(tree_flatten(model.parameters()))
    assert before.keys() == after.keys()
    tuned_paths = {p for p, _ in tunable_layers(model)}
    assert stats["tensors"] == len(tuned_paths) > 0
    changed = set()
    for key, a in before.items():
        b = after[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key  # stored layout unchanged
        if not mx.array_equal(a, b):
            changed.add(key)
    path_of = lambda key: key.rsplit(".", 1)[0]
    assert all(key.rsplit(".", 1)[1] in ("scales", "biases") and path_of(key) in tuned_paths for key in changed)
    # every tuned tensor moved (codes: ".weight" of the same layers never did)
    assert {path_of(k) for k in changed} == tuned_paths


def test_tuned_model_saves_and_reloads(tuned, tmp_path, smollm2_float):
    _, _, model, stats, tokenizer = tuned
    plan = copy.deepcopy(model.jang_plan)
    plan.tuning = stats
    out = tmp_path / "tuned"
    jang.save(model, tokenizer, out, mlx_utils.load_config(Path(smollm2_float)), plan)
    assert json.loads((out / "jang_config.json").read_text())["tuning"]["steps"] == STEPS
    loaded, _ = jang.load(str(out))
    a, b = dict(tree_flatten(model.parameters())), dict(tree_flatten(loaded.parameters()))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]), k
    x = mx.array([tokenizer.encode("It is a truth universally acknowledged")])
    assert mx.array_equal(model(x), loaded(x))


def test_bench_tune_rows_pair_with_the_same_mlx_option(tiny_llama, tmp_path, monkeypatch):
    """jang bench quality --tune N: each matched JANG row again, tuned, beside the same mlx-lm row."""
    from jang import bench

    monkeypatch.setenv("JANG_CACHE", str(tmp_path / "cache"))  # a throwaway model's sensitivity table
    result = bench.run_quality(tiny_llama, methods=(), budgets=(), dynamic=(), mlx_gptq=(), mlx_awq=(),
                               mlx_options=("uniform2",), eval_tokens=256, degeneration=("uniform2",),
                               max_tokens=4, calibration=4, tune=(2,))
    names = [r["name"] for r in result["rows"]]
    assert names == ["mlx-lm uniform 2-bit", "JANG mse @ uniform 2-bit", "JANG mse @ uniform 2-bit + tune 2"]
    tuned_row = result["rows"][2]
    assert tuned_row["tuned_to"] == "uniform2" and tuned_row["tuning"]["steps"] == 2
    assert tuned_row["avg_bits"] == result["rows"][1]["avg_bits"]  # tuning never changes the size
    assert [p["jang"] for p in result["degeneration"]] == names[1:]
    assert [m["jang_bits"] for m in result["matched"]] == [result["rows"][1]["avg_bits"]]  # untuned row only
    assert "JANG mse @ uniform 2-bit + tune 2" in bench.markdown(result)
