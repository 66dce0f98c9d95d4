"""What a custom-kernel graph node costs MLX's host, by what the node carries.

A decode step of the 8B shape encodes at ~11 us per graph node (session 14-15), while a
chain of small GEMV nodes inside one mx.compile encoded at ~4 us each (session 3's
host_overhead.py), and removing 32 nodes per token (session 15's whole-MLP launch) did
not measurably shorten the host's time. This separates the candidates. Each variant is
a chain of NODES dependent launches of a trivial kernel (out = x + 1 over 4096 halves)
inside one compiled call, as a decode step is (x: (1, 4096) halves); per node it reports the Python build
(the compiled call), the encode (async_eval with nothing queued: MLX's eval of every
node), and the pipelined wall time (one chain queued while the last runs). Variants:
- inputs: 1 or 16 inputs (15 small constants the body does not read, as weights,
  scales and biases are to the launch machinery), with or without each input's shape
  passed (40 bytes of kernel parameters each: what a body naming `<input>_shape` gets);
- input bytes: one input of 25 MB (the decode's average weight bytes per node), which
  MLX counts towards its 1000 MB per CUDA graph, so the chain commits a graph every ~40
  nodes as the decode does;
- source size: the 1-input kernel with ~12 KB of comment in its source (MLX hashes the
  whole source on every launch);
- what else a decode node has (session 16: ~10 us per kernel in the decode against ~5 for
  the 16-input node): 5 kernels launched in turn, 8 KB of dynamic shared memory, a
  grid of 528 blocks of 512 threads, all of them with 16 inputs, and JANG's own o_proj
  kernel.
GPU only. Usage: node_cost_probe.py; writes $OUT/node_cost_probe.json (medians of
ROUNDS alternating rounds)."""

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlx.core as mx  # noqa: E402

NODES = 160  # about a decode step's custom kernels (162 on the 8B shape)
TOKENS = 16
ROUNDS = 5
N = 4096
BODY = "const int i = threadIdx.x + blockIdx.x * blockDim.x;\nif (i < {n}) out[i] = x[i] + static_cast<T>(1);\n"


def kernel(name, inputs, shapes=False, padding=0, shared_memory=0):
    """A trivial kernel over x with these input names; shapes: the body names every
    input's shape (so MLX passes it); padding: bytes of comment in the source;
    shared_memory: bytes of dynamic shared memory per block."""
    reads = "".join(f"(void){n}_shape;\n" for n in inputs) if shapes else ""
    comment = "// " + "x" * padding + "\n" if padding else ""
    source = comment + reads + BODY.format(n=N)
    extra = {"shared_memory": shared_memory} if shared_memory else {}
    return mx.fast.cuda_kernel(name=name, input_names=list(inputs), output_names=["out"], source=source, **extra)


def launches(kernels, extra, threads=N, block=256):
    """A node function: node i launches kernels[i % len(kernels)] over x and extra,
    with threads threads in blocks of block (threads past N do nothing)."""
    def node(x, i):
        return kernels[i % len(kernels)](inputs=[x, *extra], template=[("T", mx.float16)], grid=(threads, 1, 1),
                                         threadgroup=(block, 1, 1), output_shapes=[x.shape],
                                         output_dtypes=[x.dtype])[0]
    return node


def chain(node):
    def f(x):
        for i in range(NODES):
            x = node(x, i)
        return x
    return mx.compile(f)


def per_node(f, x):
    """(build, encode, pipelined wall) in us per node."""
    y = f(x)
    mx.eval(y)
    build = encode = 0.0
    for _ in range(TOKENS):
        t0 = time.perf_counter()
        y = f(y)
        t1 = time.perf_counter()
        mx.async_eval(y)
        encode += time.perf_counter() - t1
        build += t1 - t0
        mx.eval(y)
    t0 = time.perf_counter()
    for _ in range(TOKENS):
        y = f(y)
        mx.async_eval(y)
    mx.eval(y)
    wall = time.perf_counter() - t0
    scale = 1e6 / (TOKENS * NODES)
    return build * scale, encode * scale, wall * scale


def jang_o_proj():
    """A node of JANG's own: the decode's o_proj + residual (4096 x 4096, 4 bits, group
    64, tensor cores), as its kernel reaches MLX (an #include form unless
    JANG_CUDA_SOURCE=inline). Its GPU time (~6 us) is above the host's per node, so only
    its build and encode columns say what the host pays."""
    from jang.kernels import gpu

    w, scales, biases = mx.quantize(mx.random.normal((N, N)).astype(mx.float16), group_size=64, bits=4)
    resid = mx.random.normal((1, N)).astype(mx.float16)
    mx.eval(w, scales, biases, resid)
    return lambda x, i: gpu.qmv_tc(x, w, scales, biases, 64, 4, resid=resid)


def main():
    from jang.bench_kernels import device_name

    x = mx.zeros((1, N), mx.float16)  # one token's hidden state, as the o_proj node takes it
    small = [mx.zeros((N,), mx.float16) + i for i in range(15)]
    big = mx.zeros((25 << 20) // 2, mx.float16)  # 25 MB
    mx.eval(x, small, big)
    names16 = ["x", *(f"c{i}" for i in range(15))]
    decode_like = [kernel(f"probe_decode_like_{k}", names16, shapes=True, shared_memory=8192) for k in range(5)]
    variants = {
        "1 input": launches([kernel("probe_1", ["x"])], []),
        "1 input, 12 KB source": launches([kernel("probe_1_big_source", ["x"], padding=12 << 10)], []),
        "16 inputs": launches([kernel("probe_16", names16)], small),
        "16 inputs with shapes": launches([kernel("probe_16_shapes", names16, shapes=True)], small),
        "2 inputs, one of 25 MB": launches([kernel("probe_2_big", ["x", "c0"])], [big]),
        "16 inputs with shapes, one of 25 MB": launches([kernel("probe_16_shapes_big", names16, shapes=True)],
                                                        [big, *small[1:]]),
        # what else a decode node has: 5 kernels in turn (a block's 5 modules), 8 KB of
        # dynamic shared memory, 528 blocks of 512 threads (the tensor-core kernels' launch)
        "5 kernels in turn": launches([kernel(f"probe_turn_{k}", ["x"]) for k in range(5)], []),
        "1 input, 8 KB shared memory": launches([kernel("probe_smem", ["x"], shared_memory=8192)], []),
        "1 input, 528 blocks of 512": launches([kernel("probe_grid", ["x"])], [], threads=528 * 512, block=512),
        "all of the above but the source": launches(decode_like, [big, *small[1:]], threads=528 * 512, block=512),
        "JANG's o_proj + residual": jang_o_proj(),
    }
    # Rounds alternate the variants, so a drift in the host's speed within the process
    # (seen in sessions 12-15) shows as spread across rounds rather than as a variant's cost.
    chains = {name: chain(node) for name, node in variants.items()}
    times = {name: [] for name in variants}
    for r in range(ROUNDS):
        for name, f in chains.items():
            times[name].append(per_node(f, x))
            build, encode, wall = times[name][-1]
            print(f"round {r} {name:40s} build {build:6.2f}  encode {encode:6.2f}  pipelined {wall:6.2f} us per node",
                  flush=True)
    rows = []
    for name, runs in times.items():
        build, encode, wall = (statistics.median(column) for column in zip(*runs))
        rows.append({"variant": name, "build_us": build, "encode_us": encode, "pipelined_us": wall,
                     "rounds": [list(run) for run in runs]})
        print(f"median {name:40s} build {build:6.2f}  encode {encode:6.2f}  pipelined {wall:6.2f} us per node")
    out = Path(os.environ.get("OUT", "/tmp")) / "node_cost_probe.json"
    out.write_text(json.dumps({"device": device_name(), "mlx": mx.__version__, "nodes": NODES,
                               "mlx_env": {k: v for k, v in os.environ.items() if k.startswith("MLX_")},
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
