"""The compiled one-token decode path (layers.compile_decode) gives the logits of
mlx-lm's own blocks, on the CPU (its GPU twin with the fused kernels is in
test_kernels_gpu.py)."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import llama, qwen2, qwen3
from mlx_lm.models.cache import make_prompt_cache

from jang import kernels
from jang.layers import adopt_all, compile_decode

@pytest.fixture(autouse=True)
def on_the_cpu():
    """These are the CPU's tests: on a machine with a GPU, adopt_all would already give the
    blocks the compiled path (and its fused kernels: their twins are test_kernels_gpu.py's),
    so they run on its CPU."""
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


FAMILIES = {
    "llama": (llama, {}),
    "qwen2": (qwen2, {"tie_word_embeddings": True}),
    "qwen3": (qwen3, {"head_dim": 16, "tie_word_embeddings": True, "max_position_embeddings": 512}),
}


def decode(model, steps=6, kv_step=None):
    cache = make_prompt_cache(model)
    for c in cache:  # a small growth step: the buffers grow mid-decode (the whole step then runs the chain once)
        c.step = kv_step or c.step
    logits = [model(mx.array([[1, 2, 3, 4]]), cache=cache)[:, -1]]
    tok = mx.argmax(logits[-1], -1)
    for _ in range(steps):
        logits.append(model(tok[:, None], cache=cache)[:, -1])
        tok = mx.argmax(logits[-1], -1)
    return mx.concatenate(logits)


# the compiled path that ran: the per-block calls (model.model.layers[i]) or the chained
# step (model.model), which the blocks' own path serves when the chain is off
PATHS = {"step": ("", lambda m: "_jang_step_call" in m.model.__dict__),
         "chain": ("decode_step=off", lambda m: m.model.__dict__.get("_jang_chain_calls")
                   and "_jang_step_call" not in m.model.__dict__),
         "blocks": ("decode_chain=off", lambda m: "_jang_decode" in m.model.layers[0].__dict__
                    and "_jang_chain_calls" not in m.model.__dict__)}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_decode_matches(family, path):
    module, extra = FAMILIES[family]
    args = module.ModelArgs(model_type=family, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=100, rms_norm_eps=1e-5,
                            rope_theta=10000.0, **extra)
    mx.random.seed(0)
    model = module.Model(args)
    nn.quantize(model, group_size=32, bits=4)
    adopt_all(model)
    ref = decode(model)
    assert compile_decode(model) == 2
    route, ran = PATHS[path]
    with kernels.enabled({"compiled_decode", route} - {""}):  # no CPU route turns it on by itself
        out = decode(model)
        grown = decode(model, steps=9, kv_step=8)  # buffers of 8: they grow at the 5th decoded token
    assert ran(model)
    assert mx.allclose(out, ref, atol=1e-4).item()
    assert mx.allclose(grown[:7], ref, atol=1e-4).item()
    assert mx.allclose(grown, decode(model, steps=9), atol=1e-4).item()


def tiny_llama(seed):
    """A two-block llama with 4-bit JANG layers (random weights)."""
    args = llama.ModelArgs(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=100, rms_norm_eps=1e-5)
    mx.random.seed(seed)
    model = llama.Model(args)
    nn.quantize(model, group_size=32, bits=4)
    adopt_all(model)
    return model


def test_whole_step_writes_the_cache_like_mlx_lm():
    """The compiled whole step leaves each KVCache as mlx-lm's update would: offset one
    further, this token's keys and values at that position, buffers of the same size,
    for a batch of two (the step's KV buffer holds both rows' keys, then their values)."""
    model = tiny_llama(seed=1)
    ref_cache, cache = make_prompt_cache(model), make_prompt_cache(model)
    prompt, tok = mx.array([[3, 1, 4, 1, 5], [2, 7, 1, 8, 2]]), mx.array([[9], [6]])
    model(prompt, cache=ref_cache)
    ref = model(tok, cache=ref_cache)  # eager: mlx-lm's update_and_fetch
    compile_decode(model)
    with kernels.enabled({"compiled_decode"}):
        model(prompt, cache=cache)
        out = model(tok, cache=cache)
    assert "_jang_step_call" in model.model.__dict__
    assert mx.allclose(out, ref, atol=1e-4).item()
    for c, r in zip(cache, ref_cache):
        assert c.offset == r.offset == 6 and c.keys.shape == r.keys.shape
        assert mx.allclose(c.keys[..., :6, :], r.keys[..., :6, :], atol=1e-4).item()
        assert mx.allclose(c.values[..., :6, :], r.values[..., :6, :], atol=1e-4).item()


def test_whole_step_grows_the_buffers_itself():
    """A token past the KV buffers' size grows them by the caches' step inside the whole
    step (the chain never runs, so none of its kernels or traces stall the decode), to
    the size mlx-lm's own growth gives, with the same logits."""
    model = tiny_llama(seed=3)
    ref = decode(model, steps=9, kv_step=8)
    compile_decode(model)
    chain_calls = []
    with kernels.enabled({"compiled_decode"}):
        model(mx.array([[1]]), cache=make_prompt_cache(model))  # builds the chain's calls
        first, links, last = model.model.__dict__["_jang_chain_calls"]
        model.model.__dict__["_jang_chain_calls"] = (lambda *a: chain_calls.append(1) or first(*a), links, last)
        out = decode(model, steps=9, kv_step=8)  # 4 prompt tokens in buffers of 8: grows at the 5th decoded token
    assert not chain_calls
    assert mx.allclose(out, ref, atol=1e-4).item()


def test_whole_step_leaves_arrays_held_elsewhere_unchanged():
    """The step writes the KV buffer in place only where MLX may (nothing else holds
    it): keys someone kept from before a trim keep their values when the step writes
    the trimmed position again (mlx-lm's prompt caches share buffers this way)."""
    model = tiny_llama(seed=2)
    compile_decode(model)
    cache = make_prompt_cache(model)
    with kernels.enabled({"compiled_decode"}):
        model(mx.array([[3, 1, 4, 1, 5]]), cache=cache)
        model(mx.array([[9]]), cache=cache)
        model(mx.array([[2]]), cache=cache)  # the step's own buffer from here on
        assert "_jang_kv" in cache[0].__dict__
        kept = [(c.keys, c.values) for c in cache]
        expected = [(mx.array(k[..., 6, :]), mx.array(v[..., 6, :])) for k, v in kept]
        mx.eval(expected)
        for c in cache:
            c.trim(1)
        model(mx.array([[7]]), cache=cache)  # another token at position 6
        mx.eval([c.keys for c in cache])
    assert "_jang_step_call" in model.model.__dict__
    for (k, v), (ek, ev), c in zip(kept, expected, cache):
        assert mx.array_equal(k[..., 6, :], ek).item() and mx.array_equal(v[..., 6, :], ev).item()
        assert not mx.allclose(c.keys[..., 6, :], ek).item()  # the cache itself took the new token


@pytest.mark.real
def test_compiled_decode_on_smollm2(smollm2_float, austen_text):
    """SmolLM2-135M quantized with JANG_4M (mixed bits per tensor, tied embedding),
    greedy continuation of real text: the compiled path gives the same tokens and
    logits as the eager one."""
    from pathlib import Path

    from mlx_lm import utils as mlx_utils

    import jang

    model, _ = mlx_utils.load_model(Path(smollm2_float))
    jang.quantize(model, "JANG_4M", progress=False)
    tok = mlx_utils.load_tokenizer(Path(smollm2_float))
    prompt = tok.encode(austen_text)[:48]

    def continuation(steps=8):
        cache = make_prompt_cache(model)
        logits = model(mx.array([prompt]), cache=cache)[:, -1]
        out, tokens = [logits], []
        for _ in range(steps):
            tokens.append(mx.argmax(out[-1], -1))
            out.append(model(tokens[-1][:, None], cache=cache)[:, -1])
        return mx.concatenate(out), [t.item() for t in tokens]

    ref_logits, ref_tokens = continuation()
    assert compile_decode(model) == 30
    with kernels.enabled({"compiled_decode"}):
        logits, tokens = continuation()
    assert PATHS["step"][1](model)
    assert tokens == ref_tokens
    assert mx.allclose(logits, ref_logits, atol=1e-3, rtol=1e-3).item()
