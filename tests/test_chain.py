"""Chained launches (jang/kernels/chain.py) on any machine: recording gpu.py's own kernel
calls, grouping them, and the text of the chained kernel. The GPU tests
(test_kernels_gpu.py) run the chains against the separate launches."""

import mlx.core as mx
import pytest

from jang.kernels import chain, dialect, gpu

H, HQ, HKV, D = 4096, 32, 8, 128  # Llama-3-8B's attention: its launches share one block size


def _mat(n, k, bits=4):
    return mx.quantize(mx.zeros((n, k), mx.float16), group_size=64, bits=bits)


def _attention_half(capacity=768):
    """One decode layer's attention half at the 8B shape, as the whole step launches it:
    q/k/v + norm + RoPE, the step's attention over a KV buffer of this capacity, o_proj
    + residual. (run, x): run() makes the launches; x is the layer's input."""
    mats, o = [_mat(HQ * D, H), _mat(HKV * D, H), _mat(HKV * D, H)], _mat(H, HQ * D)
    x, pos = mx.zeros((1, 1, H), mx.float16), mx.zeros((1,), mx.int32)
    kv = mx.zeros((4, HKV, capacity, D), mx.float16)
    norm, inv = (mx.ones((H,), mx.float16), 1e-5), gpu.rope_inv_freq(D, 5e5)

    def run():
        q, pair = gpu.qmv_tc_multi(x, mats, 64, 4, norm=norm, rope=(inv, pos, D, False),
                                   shapes=[(1, HQ, 1, D), (2, HKV, 1, D)], kv_pair=True)
        h = gpu.qmv_tc(gpu.attention_decode(q, kv, None, 0.088, pos=pos, step=(pair, 2)), *o, 64, 4, resid=x)
        return h, pair
    return run, x


@pytest.fixture(scope="module")
def layer():
    return _attention_half()


def test_kernels_are_built_at_their_first_launch():
    """A kernel object needs no GPU until it launches, so recordings work anywhere."""
    kern = dialect.kernel("concat", ("p0", "p1"), ("out",), "cuda", macros=(("JG_INPUTS", "JG_EACH(0, p0)"),))
    assert kern.full_name.startswith("jang_concat_") and kern._mlx is None


def test_a_recording_returns_pending_outputs_and_groups_one_layer(layer):
    run, x = layer
    with chain.recording() as rec:
        h, pair = run()
    assert [launch.kernel.name for launch in rec.launches] == ["qmv_tc", "attention_split", "qmv_tc"]
    assert isinstance(h, chain.Pending) and h.shape == x.shape and h.dtype == mx.float16
    assert pair.shape == (2, HKV, 1, D) and pair.launch is rec.launches[0]
    assert [launch.block_size() for launch in rec.launches] == [256] * 3
    assert [len(g) for g in chain.groups(rec.launches)] == [3]
    assert dialect.RECORDING.current is None


def test_the_chain_text_waits_aliases_and_counts(layer):
    run, x = layer
    with chain.recording() as rec:
        run()
    (group,) = chain.groups(rec.launches)
    external, outputs = chain.inputs_outputs(group)
    head, body, smem, contiguous = chain.chain_text(group, external, outputs)
    blocks = tuple(launch.blocks() for launch in group)
    assert blocks == ((192, 1, 1), (12, 8, 1), (256, 1, 1))
    # the layout the kernel reads: each kernel's last ticket + 1 (192 q/k/v blocks, 96
    # attention blocks, 256 o_proj blocks), then each one's blocks in x and y
    assert chain._layout(blocks).tolist() == [192, 288, 544, 192, 1, 12, 8, 256, 1]
    assert "if (jg_t < jg_end[0]) {" in body and "else if (jg_t < jg_end[2]) {" in body
    # each kernel after the first waits for all of the one before, in its launch's epoch
    assert "jg_chain_wait(jg_chain, 1, (jg_epoch + 1) * (jg_end[0] - 0));" in body
    assert "jg_chain_wait(jg_chain, 2, (jg_epoch + 1) * (jg_end[1] - jg_end[0]));" in body
    assert "jg_chain_done(jg_chain, 3);" in body and "jg_chain_wait" in head
    assert "jg_epoch = jg_ticket / gridDim.x;" in body
    # the attention's block position from its grid of 12 x 8
    assert "const int jg_by = jg_v / jg_layout[5] % jg_layout[6];" in body
    # attention reads q and the KV pair from the first kernel's outputs, with their shapes
    assert "const __half* q = jg_out0;" in body and "const __half* kv_new = jg_out1;" in body
    assert "const int q_shape[4] = {1, 32, 1, 128};" in body and "const int64_t q_strides[4] = {4096, 128, 128, 1};" in body
    # ... and o_proj the attention's output; x, read by q/k/v and added by o_proj, is one input
    assert "const __half* x = jg_out2;" in body and "const __half* resid = jg_in0;" in body
    assert sum(a is x for a in external) == 1 and len(external) == 21
    assert "blockIdx" not in body.split("const int jg_t")[1], "the kernels' blocks are the tickets' positions"
    assert "#undef JG_NORM" in body and "using T = __half;" in body and "constexpr int BITS = 4;" in body
    assert smem == 2 * H and contiguous


def test_the_chain_text_does_not_follow_the_kv_capacity():
    """mlx-lm grows a KV cache every 256 tokens, and the attention's blocks follow the
    buffer's capacity: the chain's text must not, or each growth would compile it again."""
    def text(capacity):
        run, _ = _attention_half(capacity)
        with chain.recording() as rec:
            run()
        (group,) = chain.groups(rec.launches)
        return chain.chain_text(group, *chain.inputs_outputs(group)), [launch.blocks() for launch in group]

    (small, small_blocks), (large, large_blocks) = text(768), text(1024)
    assert small_blocks[1] == (12, 8, 1) and large_blocks[1] == (16, 8, 1)
    assert small == large


def test_groups_split_at_another_block_size(layer):
    run, x = layer
    gate, up = _mat(14336, H), _mat(14336, H)
    with chain.recording() as rec:
        h, _ = run()
        gpu.swiglu_tc(h, gate, up, 64, 4)  # 64 threads per block: a launch of its own
        run()
    assert [launch.block_size() for launch in rec.launches] == [256, 256, 256, 64, 256, 256, 256]
    assert [len(g) for g in chain.groups(rec.launches)] == [3, 1, 3]
    assert [len(g) for g in chain.groups(rec.launches * 3)][:2] == [3, 1]
    long = chain.groups([rec.launches[0]] * (chain.MAX_KERNELS + 1))
    assert [len(g) for g in long] == [chain.MAX_KERNELS, 1]


def test_recordings_do_not_nest():
    with chain.recording():
        with pytest.raises(RuntimeError, match="do not nest"):
            with chain.recording():
                pass
    assert dialect.RECORDING.current is None


def test_run_calls_again_where_a_pending_meets_an_mlx_op(layer):
    """A recorded output handed to an MLX op cannot be chained: fn runs again as it is."""
    run, x = layer
    calls = []

    def fn(y):
        calls.append(dialect.RECORDING.current is not None)
        h = run()[0] if calls[-1] else y  # on the CPU only the recording may call a kernel
        return h * 2

    out = chain.run(fn, x)
    assert calls == [True, False] and mx.array_equal(out, x * 2)


def test_resolve_refuses_an_output_that_never_ran(layer):
    run, _ = layer
    with chain.recording():
        h, _ = run()
    with pytest.raises(RuntimeError, match="before its launch ran"):
        chain.resolve((h,))


def test_the_route_chains_only_on_cuda():
    """kernels.chained records only where route "chain" is on: on CUDA, with JANG_ENABLE
    (opt-in), never on the CPU; elsewhere fn runs once, as it is."""
    from jang import kernels

    assert not kernels.route("chain", b="cuda") and not kernels.route("chain", b="cpu")
    with kernels.enabled({"chain"}):
        assert kernels.route("chain", b="cuda") and not kernels.route("chain", b="cpu")
    calls, x = [], mx.ones((2,))
    device = mx.default_device()
    mx.set_default_device(mx.cpu)  # on a CUDA machine too
    try:
        with kernels.enabled({"chain"}):
            out = kernels.chained(lambda y: (calls.append(dialect.RECORDING.current), y + 1)[1], x)
    finally:
        mx.set_default_device(device)
    assert mx.array_equal(out, x + 1) and calls == [None]
