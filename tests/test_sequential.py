"""GPTQ layer by layer through jang.quantize: every linear gets GPTQ, the embedding
falls back to MSE (recorded), and the layer-by-layer Hessians beat RTN on real text."""

from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import utils as mlx_utils

import jang
from jang.calibration import calibration_chunks, token_chunks
from jang.data import paragraphs
from jang.evaluate import for_evaluation, log_probs, next_token_stats


def test_gptq_driver_on_a_tiny_model(tiny_llama, tmp_path, reference_kernels):
    model, config = mlx_utils.load_model(tiny_llama, lazy=True)
    tok = mlx_utils.load_tokenizer(tiny_llama)
    chunks = calibration_chunks(tok, n_chunks=4, chunk=32)
    plan = jang.quantize(model, "JANG_3M", method="gptq", calibration=chunks, progress=False)
    methods = {t.path: t.method for t in plan if t.quantized}
    assert methods.pop("model.embed_tokens") == "mse"
    assert "gptq not applied" in plan["model.embed_tokens"].note
    assert set(methods.values()) == {"gptq"}
    x = mx.array([[1, 2, 3, 4]])
    jang.save(model, tok, tmp_path / "q", config)
    assert mx.array_equal(jang.load(str(tmp_path / "q"))[0](x), model(x))


@pytest.mark.real
@pytest.mark.slow
def test_gptq_beats_rtn_on_smollm2_at_the_same_plan(smollm2_float):
    tok = mlx_utils.load_tokenizer(Path(smollm2_float))
    chunks = calibration_chunks(tok, n_chunks=8, chunk=128)
    held_out = token_chunks(tok, ["\n\n".join(paragraphs("persuasion"))], 2, 256)
    ref = for_evaluation(mlx_utils.load_model(Path(smollm2_float))[0])
    ref_logp = [log_probs(ref, c) for c in held_out]
    kl = {}
    for method in ("rtn", "gptq"):
        model, _ = mlx_utils.load_model(Path(smollm2_float))
        jang.quantize(model, "JANG_4M", method=method, calibration=chunks, progress=False)
        for_evaluation(model)
        kl[method] = sum(next_token_stats(log_probs(model, c), r, c)[1] for c, r in zip(held_out, ref_logp)) / 2
    assert kl["gptq"] < kl["rtn"], kl
