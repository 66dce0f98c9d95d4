"""``jang bench kernels`` and ``jang bench decode``: JANG's fused GPU kernels against
MLX's own op for the same job, same run, same GPU; results to docs/.

Timing: many launches are queued and evaluated at once (a single launch measures
MLX's dispatch, not the kernel), over rotating input sets larger than the GPU's L2
cache, median of several repeats. Bandwidth counts each input byte read once and
each output byte written once; the device's ceiling is a measured large copy.
"""

import json
import math
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from .kernels import gpu, reference

L2_BYTES = 64 << 20  # rotate inputs so a round trip touches more than the L2 (H100: 50 MB)


def timed(make_calls, launches=64, repeats=7) -> float:
    """Median seconds per launch. make_calls() -> list of zero-arg callables, one per
    input set; launches cycle through them."""
    calls = make_calls()
    mx.eval([c() for c in calls])
    mx.synchronize()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [calls[i % len(calls)]() for i in range(launches)]
        mx.eval(outs)
        mx.synchronize()
        samples.append((time.perf_counter() - t0) / launches)
    return statistics.median(samples)


def _torch_profiler():
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile

        return (profile, ProfilerActivity.CUDA, torch.autograd.DeviceType.CUDA) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - no torch, or one that cannot see this GPU
        return None


def _kernel_us(recorded, cuda) -> dict:
    """GPU microseconds per CUDA kernel name that a torch.profiler run recorded."""
    us = {}
    for e in recorded.events():
        if e.device_type == cuda:
            us[e.name] = us.get(e.name, 0) + e.time_range.elapsed_us()
    return us


def gpu_time(make_calls, launches=32, repeats=1):
    """GPU seconds per launch: the summed durations of every CUDA kernel the launches
    ran, recorded by CUPTI (through torch.profiler, which sees MLX's kernels too since
    both share the device's primary context). None where torch is not available; the
    wall-clock time then stands, which includes MLX's per-op host overhead."""
    prof = _torch_profiler()
    if prof is None:
        return None
    profile, activity, cuda = prof
    calls = make_calls()
    mx.eval([c() for c in calls])
    mx.synchronize()
    best = None
    for _ in range(repeats):
        with profile(activities=[activity]) as p:
            outs = [calls[i % len(calls)]() for i in range(launches)]
            mx.eval(outs)
            mx.synchronize()
        kernels = _kernel_us(p, cuda)
        if not kernels:
            return None
        t = sum(kernels.values()) * 1e-6 / launches
        best = t if best is None else min(best, t)
    return best


def both(make_calls, launches=64):
    """(wall seconds per launch, GPU seconds per launch or None). One launch (a chain of
    dependent kernels) is profiled alone, best of 3: several chains evaluated together
    run side by side on the GPU and stretch each other's kernels."""
    gpu_s = gpu_time(make_calls, 1, repeats=3) if launches == 1 else gpu_time(make_calls, max(8, launches // 2))
    return timed(make_calls, launches), gpu_s


def sets_for(nbytes: int) -> int:
    return max(1, min(16, math.ceil(2 * L2_BYTES / max(nbytes, 1))))


def copy_bandwidth(launches=16, repeats=7) -> float:
    """Bytes/s of a large device copy (read + write): the best of ``repeats`` chains of
    ``launches`` dependent 512 MB adds. A chain reuses its buffers (each add may donate
    its input), so the allocator is not in the timing; and the best, not the median: a
    slow sample is the machine's noise, not its bandwidth. (Session 13: the first form,
    the median of 16 independent adds evaluated together, 8 GB of outputs, once measured
    an H100 at 2166 GB/s where twelve later measurements gave 2764-2902, and so put the
    decode bench's "JANG / limit" at 63% instead of 47%.)"""
    a = mx.random.normal((256 << 20,)).astype(mx.float16)  # 512 MB
    mx.eval(a)

    def chain():
        v = a
        for _ in range(launches):
            v = v + 1
        return v

    mx.eval(chain())  # warm-up: the kernel and the buffers
    mx.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(chain())
        mx.synchronize()
        best = min(best, (time.perf_counter() - t0) / launches)
    return 2 * a.nbytes / best


def measure(row: dict, key: str, make_calls, launches=64) -> float:
    """Record wall and GPU time per launch as row[key + '_s'] / row[key + '_gpu_s'];
    returns the better-founded of the two (GPU time when available)."""
    wall, gpu_s = both(make_calls, launches)
    row[key + "_s"], row[key + "_gpu_s"] = wall, gpu_s
    return gpu_s if gpu_s is not None else wall


CHAIN = 64


def _chain(op, x, sets):
    """A zero-arg callable running CHAIN dependent launches of op (per-launch times
    are then the recorded times / CHAIN)."""
    def run():
        v = x
        for i in range(CHAIN):
            v = op(v, sets[i % len(sets)])  # values may overflow: timing does not depend on them
        return v
    return run


def chain_time(op, x, sets):
    """_chain's CHAIN dependent launches: (GPU us per launch, best of 3 profiled chains;
    wall us per launch; GPU us per launch of each kernel name). The probes in scripts/
    (qmv_tc_sweep.py, gemv_floor.py) time with it."""
    run, n = _chain(op, x, sets), CHAIN
    prof = _torch_profiler()
    if prof is None:
        raise RuntimeError("chain_time reads kernel times through torch.profiler: it needs torch with CUDA")
    profile, activity, cuda = prof
    mx.eval(run())
    mx.synchronize()
    best, names = None, {}
    for _ in range(3):
        with profile(activities=[activity]) as p:
            mx.eval(run())
            mx.synchronize()
        names = _kernel_us(p, cuda)
        total = sum(names.values()) / n
        best = total if best is None else min(best, total)
    t0 = time.perf_counter()
    mx.eval(run())
    mx.synchronize()
    wall = (time.perf_counter() - t0) / n * 1e6
    return best, wall, {k[:60]: round(v / n, 2) for k, v in names.items()}


def _nbytes(*arrays):
    return sum(a.nbytes for a in arrays)


def _random_quantized(n, k, gs, bits, dtype):
    """(w, scales, biases) of a random (n, k) matrix, seeded by its bit width."""
    mx.random.seed(bits)
    one = mx.quantize(mx.random.normal((n, k)).astype(dtype), group_size=gs, bits=bits)
    mx.eval(one)
    return one


def _rotating(arrays: tuple) -> list:
    """Copies of arrays enough to overflow the L2 when launches cycle through them."""
    sets = [arrays] + [tuple(a + 0 for a in arrays) for _ in range(sets_for(_nbytes(*arrays)) - 1)]
    mx.eval(sets)
    return sets


def _sweep(row: dict, key: str, configs, make_calls_for, launches=64) -> dict:
    """Measure each launch config; copy the fastest one's times into row under key and
    return that config."""
    trials = []
    for config in configs:
        trial = {}
        trials.append((measure(trial, key, make_calls_for(config), launches), trial, config))
    _, trial, config = min(trials, key=lambda t: t[0])
    row.update(trial)
    row[key + "_sweep"] = [{"config": c, **t} for _, t, c in trials]
    return config


# ---------------------------------------------------------------- cases

def qmv_cases(bits_list, n=8192, k=8192, gs=64, dtype=mx.float16, configs=(None,)):
    rows = []
    for bits in bits_list:
        sets = _rotating(_random_quantized(n, k, gs, bits, dtype))
        x = mx.random.normal((1, k)).astype(dtype)
        row = {"kernel": "qmv", "shape": f"1x{k} @ {n}x{k}", "bits": bits, "group": gs, "dtype": str(dtype).split(".")[-1],
               "bytes": _nbytes(*sets[0]) + x.nbytes + n * x.itemsize}
        measure(row, "mlx", lambda: [lambda s=s: reference.quantized_matmul(x, *s, gs, bits) for s in sets])
        config = _sweep(row, "jang", configs,
                        lambda c: lambda: [lambda s=s: gpu.qmv(x, *s, gs, bits, c) for s in sets])
        row["config"] = {**gpu.QMV, **(config or {})}
        tc = gpu.qmv_tc_supported(x, bits, gs)
        if tc:  # the tensor-core GEMV (what decode uses for these bits)
            measure(row, "tc", lambda: [lambda s=s: gpu.qmv_tc(x, *s, gs, bits) for s in sets])
        if n == k:
            # Each launch reads the previous one's output: nothing overlaps, so the GPU time
            # is the kernel's own and the wall time is kernel + launch gap.
            measure(row, "mlx_chain", lambda: [_chain(lambda v, s: reference.quantized_matmul(v, *s, gs, bits), x, sets)], 1)
            measure(row, "jang_chain", lambda: [_chain(lambda v, s: gpu.qmv(v, *s, gs, bits, config), x, sets)], 1)
            if tc:
                measure(row, "tc_chain", lambda: [_chain(lambda v, s: gpu.qmv_tc(v, *s, gs, bits), x, sets)], 1)
        rows.append(row)
        del sets
    return rows


def qmm_cases(bits_list, m=512, n=8192, k=8192, gs=64, dtype=mx.float16, configs=(None,)):
    rows = []
    for bits in bits_list:
        one = _random_quantized(n, k, gs, bits, dtype)
        x = mx.random.normal((m, k)).astype(dtype)
        row = {"kernel": "qmm", "shape": f"{m}x{k} @ {n}x{k}", "bits": bits, "group": gs,
               "dtype": str(dtype).split(".")[-1], "bytes": _nbytes(*one) + x.nbytes + m * n * x.itemsize,
               "flops": 2 * m * n * k}
        measure(row, "mlx", lambda: [lambda: reference.quantized_matmul(x, *one, gs, bits)], launches=16)
        measure(row, "dequant", lambda: [lambda: gpu.dequant_matmul(x, *one, gs, bits)], launches=16)
        config = _sweep(row, "fused", configs, lambda c: lambda: [lambda: gpu.qmm(x, *one, gs, bits, c)], launches=16)
        row["config"] = {**gpu.QMM, **(config or {})}
        # JANG's prefill path is the faster of its two: fused tensor-core GEMM or dequant + cuBLAS
        fused_won = _best(row, "fused") <= _best(row, "dequant")
        row["jang_path"] = "fused" if fused_won else "dequant"
        for suffix in ("_s", "_gpu_s"):
            row["jang" + suffix] = row[row["jang_path"] + suffix]
        rows.append(row)
    return rows


def swiglu_cases(bits_list, n=14336, k=4096, gs=64, dtype=mx.float16):
    rows = []
    for bits in bits_list:
        gate = mx.quantize(mx.random.normal((n, k)).astype(dtype), group_size=gs, bits=bits)
        up = mx.quantize(mx.random.normal((n, k)).astype(dtype), group_size=gs, bits=bits)
        per = _nbytes(*gate, *up)
        sets = [(s[:3], s[3:]) for s in _rotating((*gate, *up))]
        x = mx.random.normal((1, k)).astype(dtype)

        def mlx_path(g, u):
            a = reference.quantized_matmul(x, *g, gs, bits)
            return (a * mx.sigmoid(a)) * reference.quantized_matmul(x, *u, gs, bits)

        row = {"kernel": "swiglu", "shape": f"1x{k} @ 2x{n}x{k}", "bits": bits, "group": gs,
               "dtype": str(dtype).split(".")[-1], "bytes": per + x.nbytes + n * x.itemsize}
        measure(row, "mlx", lambda: [lambda s=s: mlx_path(*s) for s in sets])
        measure(row, "jang", lambda: [lambda s=s: gpu.swiglu(x, s[0], s[1], gs, bits) for s in sets])
        if gpu.qmv_tc_supported(x, bits, gs):  # what compiled decode uses with fused_tc at 2 and 4 bits
            measure(row, "tc", lambda: [lambda s=s: gpu.swiglu_tc(x, s[0], s[1], gs, bits) for s in sets])
        rows.append(row)
    return rows


def embedding_cases(vocab=128256, dims=4096, bits=4, gs=64, dtype=mx.float16, tokens=(1, 512)):
    table = mx.quantize(mx.random.normal((vocab, dims)).astype(dtype), group_size=gs, bits=bits)
    mx.eval(table)
    rows = []
    for t in tokens:
        ids = mx.random.randint(0, vocab, (t,))
        moved = t * (dims * bits // 8 + 2 * (dims // gs) * 2) + t * dims * 2
        row = {"kernel": "embedding", "shape": f"{t} ids of {vocab}x{dims}", "bits": bits, "group": gs,
               "dtype": str(dtype).split(".")[-1], "bytes": moved}
        measure(row, "mlx", lambda: [lambda: reference.embedding_lookup(ids, *table, gs, bits)])
        measure(row, "jang", lambda: [lambda: gpu.qgather(ids, *table, gs, bits, dtype)])
        rows.append(row)
    return rows


def norm_rope_cases(dtype=mx.float16, heads=32, dims=128, lengths=(1, 512)):
    rows = []
    weight = (1 + 0.1 * mx.random.normal((dims,))).astype(dtype)
    inv = gpu.rope_inv_freq(dims, 500000.0)
    for L in lengths:
        x = mx.random.normal((1, L, heads, dims)).astype(dtype)

        def mlx_path():
            y = mx.fast.rms_norm(x, weight, 1e-6).transpose(0, 2, 1, 3)
            return mx.fast.rope(y, dims, traditional=False, base=500000.0, scale=1.0, offset=100)

        row = {"kernel": "norm_rope", "shape": f"1x{L}x{heads}x{dims}", "bits": None, "group": None,
               "dtype": str(dtype).split(".")[-1], "bytes": 2 * x.nbytes}
        measure(row, "mlx", lambda: [mlx_path])
        measure(row, "jang", lambda: [lambda: gpu.norm_rope(x, weight, 1e-6, inv, 100)])
        rows.append(row)
    return rows


# decode attention's launch shapes tried besides the default (gpu.decode_shape; the
# first is the default before session 15)
ATTENTION_SWEEP = ({"WARPS": 4, "PER": 8}, {"WARPS": 4, "PER": 4}, {"WARPS": 8, "PER": 8})


def attention_cases(dtype=mx.float16, hq=32, hkv=8, dims=128, contexts=(640, 1024, 4096, 16384, 32768),
                    prefill=256):
    """One query token over a KV cache (JANG's split decode kernel, default launch and
    ATTENTION_SWEEP, over the cache's whole buffer as compiled decode hands it; and
    "jang_step", the whole decode step's form: keys and values rows of one buffer, the
    query's own key and value apart) and a causal prefill (the one-query-per-block
    kernel), against MLX's SDPA on the live keys."""
    rows = []
    scale = 1 / math.sqrt(dims)
    for S in contexts:
        capacity = -(-S // 256) * 256 + 256  # as mlx-lm's KVCache holds it: steps of 256
        kbuf = mx.random.normal((1, hkv, capacity, dims)).astype(dtype)
        vbuf = mx.random.normal((1, hkv, capacity, dims)).astype(dtype)
        k, v = kbuf[:, :, :S], vbuf[:, :, :S]
        for L in (1, prefill) if S == contexts[1] else (1,):
            q = mx.random.normal((1, hq, L, dims)).astype(dtype)
            mask = None if L == 1 else "causal"
            row = {"kernel": "attention", "shape": f"L={L} S={S} Hq={hq} Hkv={hkv} D={dims}", "bits": None,
                   "group": None, "dtype": str(dtype).split(".")[-1], "bytes": q.nbytes * 2 + k.nbytes + v.nbytes}
            measure(row, "mlx", lambda: [lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)],
                    launches=32)
            if L > 1:
                measure(row, "jang", lambda: [lambda: gpu.attention(q, k, v, scale)], launches=8)
            else:
                measure(row, "jang", lambda: [lambda: gpu.attention_decode(q, kbuf, vbuf, scale, length=S)], launches=32)
                step_buf = mx.concatenate([kbuf, vbuf])  # (2 B, Hkv, capacity, D): keys' rows, then values'
                kv_new = mx.random.normal((2, hkv, 1, dims)).astype(dtype)
                pos = gpu.position(S - 1)  # as the step has it: a host-made int would be read over the bus
                measure(row, "jang_step", lambda: [lambda: gpu.attention_decode(
                    q, step_buf, None, scale, pos=pos, step=(kv_new, 0))], launches=32)
                for shape in ATTENTION_SWEEP:
                    key = "jang_" + "_".join(f"{n.lower()}{v_}" for n, v_ in shape.items())
                    measure(row, key, lambda: [lambda: gpu.attention_decode(
                        q, kbuf, vbuf, scale, length=S, warps=shape["WARPS"], per=shape["PER"])], launches=32)
            rows.append(row)
    return rows


QMV_SWEEP = ({"R": 2, "U": 2, "WARPS": 4}, {"R": 1, "U": 4, "WARPS": 8}, {"R": 2, "U": 1, "WARPS": 8},
             {"R": 4, "U": 2, "WARPS": 4})
QMM_SWEEP = ({"WM": 2, "WN": 2, "FM": 2, "FN": 2}, {"WM": 2, "WN": 4, "FM": 2, "FN": 2}, {"WM": 4, "WN": 2, "FM": 2, "FN": 4})


def _best(row, key):
    return row[key + "_gpu_s"] if row.get(key + "_gpu_s") is not None else row[key + "_s"]


CASE_NAMES = ("qmv", "qmv_other_bits", "qmv_bf16", "swiglu", "embedding", "norm_rope", "attention", "qmm")


def run_kernels(quick=False, out: Path = None, only=None) -> dict:
    """All cases; with ``out`` the result file is rewritten after each case, so a run
    stopped early still leaves what it measured."""
    bits = (2, 4) if quick else gpu.BITS
    result = {"device": device_name(), "mlx": mx.__version__, "copy_GBps": copy_bandwidth() / 1e9, "rows": []}
    cases = [lambda: qmv_cases((2, 4), configs=QMV_SWEEP),
             lambda: qmv_cases([b for b in bits if b not in (2, 4)]),
             lambda: qmv_cases((4,), dtype=mx.bfloat16),
             lambda: swiglu_cases((4,) if quick else (2, 4, 8)),
             lambda: embedding_cases(),
             lambda: norm_rope_cases(),
             lambda: attention_cases(),
             lambda: qmm_cases((2, 4) if quick else bits, configs=QMM_SWEEP[:1])]
    for name, case in zip(CASE_NAMES, cases):
        if only and name not in only:
            continue
        result["rows"] += case()
        if out is not None:
            write(result, out.parent, out.name)
    return result


def device_name() -> str:
    try:
        return mx.device_info().get("device_name", str(mx.default_device()))
    except Exception:  # noqa: BLE001 - older MLX
        return str(mx.default_device())


# ---------------------------------------------------------------- report

def markdown(result: dict) -> str:
    bw = result["copy_GBps"]
    lines = [f"Device: {result['device']}, MLX {result['mlx']}; measured copy bandwidth {bw:.0f} GB/s "
             "(read + write of a 512 MB array). Times are per launch, median of 7 repeats of 64 queued launches "
             "over rotating inputs. GB/s counts each input byte read once and each output byte written once.", "",
             "GPU µs = summed CUDA kernel durations per launch from CUPTI (torch.profiler); wall µs includes MLX's "
             "per-op host overhead. Speed-up and GB/s use GPU time where it was recorded.", "",
             "| kernel | shape | bits | dtype | MLX GPU µs | JANG GPU µs | speed-up | JANG GB/s | of copy bw | "
             "MLX wall µs | JANG wall µs | notes |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    us = lambda v: "-" if v is None else f"{v * 1e6:.1f}"  # noqa: E731
    for r in result["rows"]:
        t_mlx, t_jang = _best(r, "mlx"), _best(r, "jang")
        gbs = r["bytes"] / t_jang / 1e9
        notes = []
        if r["kernel"] == "qmm":
            notes.append(f"JANG path: {r['jang_path']}; dequant+cuBLAS {_best(r, 'dequant') * 1e6:.0f} µs, fused "
                         f"{_best(r, 'fused') * 1e6:.0f} µs ({r['flops'] / _best(r, 'fused') / 1e12:.0f} TFLOP/s)")
        if r["kernel"] == "qmv":
            notes.append("R{R} U{U} W{WARPS}".format(**r["config"]))
            if "jang_chain_s" in r:
                per = {k: _best(r, k) / CHAIN for k in ("mlx_chain", "jang_chain")}
                notes.append(f"chained: MLX {per['mlx_chain'] * 1e6:.1f} µs, JANG {per['jang_chain'] * 1e6:.1f} µs = "
                             f"{r['bytes'] / per['jang_chain'] / 1e9:.0f} GB/s")
        if "tc_s" in r:
            tc = _best(r, "tc")
            notes.append(f"tensor-core kernel {tc * 1e6:.1f} µs = {r['bytes'] / tc / 1e9:.0f} GB/s, "
                         f"{t_mlx / tc:.2f}x MLX")
            if "tc_chain_s" in r:
                tcc = _best(r, "tc_chain") / CHAIN
                notes.append(f"chained {tcc * 1e6:.1f} µs = {r['bytes'] / tcc / 1e9:.0f} GB/s")
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['bits'] or '-'} | {r['dtype']} | {us(r.get('mlx_gpu_s'))} | "
                     f"{us(r.get('jang_gpu_s'))} | {t_mlx / t_jang:.2f}x | {gbs:.0f} | {gbs / bw:.0%} | "
                     f"{us(r['mlx_s'])} | {us(r['jang_s'])} | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def write(result: dict, docs: Path, name: str):
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    (docs / f"{name}.md").write_text(markdown(result))


# ---------------------------------------------------------------- end to end

# Shapes only: speed does not depend on the weights' values, so random weights in
# mlx-lm's own llama class stand in for the real models.
DECODE_MODELS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
}


def random_llama(name: str, bits: int, group_size: int = 64):
    import mlx.nn as nn
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", rms_norm_eps=1e-5, **DECODE_MODELS[name])
    model = llama.Model(args)
    model.set_dtype(mx.float16)
    nn.quantize(model, group_size=group_size, bits=bits)
    mx.eval(model.parameters())
    return model


def decode_speed(model, prompt_len=512, new_tokens=128):
    from mlx_lm.models.cache import make_prompt_cache

    prompt = mx.random.randint(0, model.args.vocab_size, (1, prompt_len))
    for _ in range(2):  # warm-up: compiles every kernel for both shapes
        cache = make_prompt_cache(model)
        y = mx.argmax(model(prompt, cache=cache)[:, -1], axis=-1)
        for _ in range(4):
            y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(y)
    cache = make_prompt_cache(model)
    mx.synchronize()
    t0 = time.perf_counter()
    y = mx.argmax(model(prompt, cache=cache)[:, -1], axis=-1)
    mx.eval(y)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
        mx.async_eval(y)
    mx.eval(y)
    t2 = time.perf_counter()
    return {"prefill_tps": prompt_len / (t1 - t0), "decode_tps": new_tokens / (t2 - t1)}


def bytes_per_token(model, context: int) -> int:
    """Weights read for one decoded token (one embedding row, all else whole) plus the
    KV cache at ``context`` tokens."""
    from mlx.utils import tree_flatten

    total = 0
    for path, a in tree_flatten(model.parameters()):
        total += a.nbytes // a.shape[0] if path.startswith("model.embed_tokens") else a.nbytes
    args = model.args
    head_dim = args.hidden_size // args.num_attention_heads
    total += 2 * args.num_hidden_layers * args.num_key_value_heads * context * head_dim * 2
    return total


KV_STEP = "kv_step="  # a config item that is not a route: the KV cache's growth step


@contextmanager
def kv_cache_step(step=None):
    """mlx-lm's KVCache growing in steps of ``step`` positions (256 as shipped) for the
    duration. MLX's CUDA attention decodes through cuDNN over buffers of a multiple of
    256 positions and through its own vector kernel otherwise (docs/kernels.md)."""
    from mlx_lm.models.cache import KVCache

    saved = KVCache.step
    KVCache.step = step or saved
    try:
        yield
    finally:
        KVCache.step = saved


def decode_row(model, bits, config, nbytes, limit_tps, mlx_runs, jang_runs) -> dict:
    """One table row from the alternating rounds of mlx-lm and one JANG config (lists of
    decode_speed results, round by round): medians, each round's figures, and each
    round's decode speed-up over the mlx-lm run of the same round."""
    import statistics

    def median(runs):
        return {k: statistics.median(r[k] for r in runs) for k in ("decode_tps", "prefill_tps")}

    return {"model": model, "bits": bits, "config": config, "bytes_per_token": nbytes, "limit_tps": limit_tps,
            "mlx": median(mlx_runs), "jang": median(jang_runs), "rounds": len(mlx_runs),
            "decode_tps_rounds": {"mlx": [r["decode_tps"] for r in mlx_runs], "jang": [r["decode_tps"] for r in jang_runs]},
            "speedup_rounds": [j["decode_tps"] / m["decode_tps"] for m, j in zip(mlx_runs, jang_runs)]}


def run_decode(models=("smollm2-135m", "llama-3-8b"), bits=(4,), prompt_len=512, new_tokens=128,
               configs=("",), rounds=5) -> dict:
    """mlx-lm's ops vs JANG on one model, once per config: a comma-separated set of
    routes to turn on ("qmv") or off ("compiled_decode=off") against kernels.ROUTES
    ("" = the defaults, as a user gets them), and optionally "kv_step=N" (the KV cache's
    growth step for that config's runs; mlx-lm's runs keep 256). Decode is bound by host
    work, which drifts on a shared machine, so every model is built once and the runs
    alternate for `rounds` rounds; each figure is the median over the rounds, and each
    round's decode speed-up (JANG over the mlx-lm run just before it) is kept too, so the
    spread shows."""
    from . import kernels
    from .layers import adopt_all

    bw = copy_bandwidth()
    rows = []
    for name in models:
        for b in bits:
            contenders = {"mlx-lm": (random_llama(name, b), (), None)}
            nbytes = bytes_per_token(contenders["mlx-lm"][0], prompt_len + new_tokens // 2)
            for config in configs:
                items = [op for op in config.split(",") if op]
                ops = tuple(op for op in items if not op.startswith(KV_STEP))
                step = next((int(op[len(KV_STEP):]) for op in items if op.startswith(KV_STEP)), None)
                with kernels.enabled(ops):
                    model = random_llama(name, b)
                    adopt_all(model)
                contenders[config or "default"] = (model, ops, step)
            runs = {key: [] for key in contenders}
            for _ in range(rounds):
                for key, (model, ops, step) in contenders.items():
                    with kernels.enabled(ops), kv_cache_step(step):
                        runs[key].append(decode_speed(model, prompt_len, new_tokens))
            del contenders
            # copy_bandwidth counts the bytes read and written; a stream that only reads
            # moves its bytes at about the same total rate, so the floor is bytes / bw.
            limit_tps = bw / nbytes
            mlx_runs = runs.pop("mlx-lm")
            for config, config_runs in runs.items():
                rows.append(decode_row(name, b, config, nbytes, limit_tps, mlx_runs, config_runs))
                base, jang = rows[-1]["mlx"], rows[-1]["jang"]
                print(f"{name} {b}-bit [{config}]: mlx-lm {base['decode_tps']:.1f} tok/s, "
                      f"JANG {jang['decode_tps']:.1f} tok/s (limit {limit_tps:.1f}); "
                      f"prefill {base['prefill_tps']:.0f} vs {jang['prefill_tps']:.0f} tok/s", flush=True)
    return {"device": device_name(), "mlx": mx.__version__, "copy_GBps": bw / 1e9, "prompt": prompt_len,
            "new_tokens": new_tokens, "rounds": rounds, "routes": kernels.ROUTES.get("cuda"), "rows": rows}


def decode_markdown(result: dict) -> str:
    lines = [f"Device: {result['device']}, MLX {result['mlx']}; copy bandwidth {result['copy_GBps']:.0f} GB/s. "
             f"Prompt {result['prompt']} random tokens, then {result['new_tokens']} greedy tokens, medians of "
             f"{result.get('rounds', 1)} alternating rounds; same quantized "
             "weights (mlx-lm's `nn.quantize`, group 64), mlx-lm's ops vs JANG. JANG config: routes turned on (or "
             "off, with =off) against the defaults (`JANG_ENABLE` / `JANG_DISABLE`). Bandwidth limit = bytes read "
             "per token / copy bandwidth (which counts bytes read and written).", "",
             "| model (random weights) | bits | JANG config | MB read / token | mlx-lm decode tok/s | "
             "JANG decode tok/s | speed-up | per round | JANG / limit | mlx-lm prefill tok/s | JANG prefill tok/s |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        m, j = r["mlx"], r["jang"]
        spread = r.get("speedup_rounds")
        spread = f"{min(spread):.2f}–{max(spread):.2f}x" if spread else "—"
        lines.append(f"| {r['model']} | {r['bits']} | {r.get('config', 'default')} | {r['bytes_per_token'] / 1e6:.0f} "
                     f"| {m['decode_tps']:.1f} | {j['decode_tps']:.1f} | {j['decode_tps'] / m['decode_tps']:.2f}x | "
                     f"{spread} | {j['decode_tps'] / r['limit_tps']:.0%} | {m['prefill_tps']:.0f} | {j['prefill_tps']:.0f} |")
    return "\n".join(lines) + "\n"
