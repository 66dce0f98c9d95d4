"""Consecutive kernel launches run as one launch: fewer graph nodes for MLX's host.

At decode every graph node costs MLX's host ~6-10 us to encode (docs/kernels.md,
sessions 14-17), and a step of the 8B shape runs five custom kernels per layer. The
kernels depend on each other across the whole grid (q/k/v -> attention -> o_proj: every
block of one reads what every block of the one before wrote), and CUDA starts a
launch's blocks in no guaranteed order, so each has been its own launch.

A chained launch runs the blocks of several kernels. Each block takes a ticket (an
atomic count) when it starts, and runs the block of the kernel its ticket falls to:
tickets go out in the order blocks start, so when a block of kernel i + 1 starts,
every block of kernel i has started already. Before it reads anything, it waits until
kernel i's count of finished blocks is complete. No block ever waits on one that has not
started, so the chain cannot deadlock, however many blocks fit on the GPU at once
(a grid-wide barrier would need every block resident). The counts are never reset:
each launch takes the next epoch of tickets and waits for its own epoch's counts.

A chain needs: CUDA, one block size for all its kernels (a body's barriers count every
thread of its block), no launch bounds. Each kernel's body runs unchanged in a scope of
its own, a lambda, so its returns end only its part: its template values and inputs are
locals there, named as the body expects, and it reads its block's position from
jg_bx / jg_by / jg_bz (dialect.VIRTUAL_BLOCKS).

How a caller uses it: run(fn, *args) calls fn with the kernel calls recorded instead of
launched (dialect.Kernel): each returns its outputs as Pending, which the following
kernel calls take as inputs. Then the recorded launches run, consecutive ones of one
block size as a chain, and the Pendings in fn's result are replaced by arrays. Where fn
hands a Pending to anything but a JANG kernel (an MLX op), fn runs again as it is.
"""

import hashlib
import math
import re
from contextlib import contextmanager
from functools import lru_cache

import mlx.core as mx

from . import dialect

# The most kernels one chain holds: every kernel's blocks wait on the one before it, so a
# long chain only adds the text NVRTC compiles (the decode's chains hold four).
MAX_KERNELS = 8

# MLX's CUDA names of the dtypes a chain's text declares (dtype_to_cuda_type in MLX)
CUDA_TYPES = {mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float", mx.int32: "int32_t",
              mx.uint32: "uint32_t", mx.int64: "int64_t", mx.uint8: "uint8_t", mx.int8: "int8_t", mx.bool_: "bool"}


class Pending:
    """An output of a recorded launch, not launched yet: its shape and dtype (what the
    code building the next launches reads of it), and its array once the recording has
    run."""

    __slots__ = ("shape", "dtype", "launch", "value")

    def __init__(self, shape, dtype, launch):
        self.shape, self.dtype, self.launch, self.value = tuple(shape), dtype, launch, None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)


class Launch:
    """One recorded kernel call: the dialect.Kernel and its keyword arguments."""

    def __init__(self, kernel, call):
        self.kernel, self.call = kernel, call
        self.outputs = [Pending(s, d, self) for s, d in zip(call["output_shapes"], call["output_dtypes"])]

    def block_size(self):
        """Threads per block where this launch can join a chain, else None."""
        k, c = self.kernel, self.call
        if k.dialect != "cuda" or k.launch_bounds or set(c) - {"inputs", "template", "grid", "threadgroup",
                                                              "output_shapes", "output_dtypes"}:
            return None
        if any(x.dtype not in CUDA_TYPES for x in (*c["inputs"], *self.outputs)):
            return None  # a type the chain's text cannot name
        (gx, gy, gz), (tx, ty, tz) = c["grid"], c["threadgroup"]
        # MLX shrinks a block to a grid smaller than it; blocks of one row only
        if ty != 1 or tz != 1 or gx < tx or gx % tx:
            return None
        return tx

    def blocks(self) -> tuple:
        (gx, gy, gz), (tx, _, _) = self.call["grid"], self.call["threadgroup"]
        return gx // tx, gy, gz


class Recording:
    def __init__(self):
        self.launches = []

    def add(self, kernel, call):
        launch = Launch(kernel, call)
        self.launches.append(launch)
        return list(launch.outputs)


@contextmanager
def recording():
    """Kernel calls in this thread recorded (Recording.launches), not launched."""
    if getattr(dialect.RECORDING, "current", None) is not None:
        raise RuntimeError("kernel recordings do not nest")
    rec = dialect.RECORDING.current = Recording()
    try:
        yield rec
    finally:
        dialect.RECORDING.current = None


def run(fn, *args, owner=None):
    """fn(*args), its kernel launches chained where they can be (see the module's
    docstring). fn must not change anything outside its result: it may run twice. Meant
    for code that mx.compile traces: the chains' text is built on every call. owner:
    what the chains' counts belong to (_counts), e.g. the model; None: shared."""
    try:
        with recording() as rec:
            result = fn(*args)
    except (TypeError, AttributeError):  # a Pending reached an MLX op (qwen3's q/k norms): no chains here
        return fn(*args)
    for i, group in enumerate(groups(rec.launches)):
        if len(group) == 1:
            launch_alone(group[0])
        else:
            launch_chain(group, (id(owner), i))
    return resolve(result)


def resolve(result):
    """result with each Pending replaced by its array (in tuples and lists)."""
    if isinstance(result, Pending):
        if result.value is None:
            raise RuntimeError("a recorded kernel's output was read before its launch ran")
        return result.value
    if isinstance(result, (tuple, list)):
        return type(result)(resolve(r) for r in result)
    return result


def groups(launches) -> list:
    """The launches in order, consecutive ones of one block size together (at most
    MAX_KERNELS), each group one launch."""
    out, last_size = [], None
    for launch in launches:
        size = launch.block_size()
        if size is not None and size == last_size and len(out[-1]) < MAX_KERNELS:
            out[-1].append(launch)
        else:
            out.append([launch])
            last_size = size
    return out


def launch_alone(launch):
    """One recorded launch as MLX's own kernel call, its Pending inputs resolved."""
    call = dict(launch.call, inputs=[resolve(x) for x in launch.call["inputs"]])
    for pending, array in zip(launch.outputs, launch.kernel.mlx(**call)):
        pending.value = array


def inputs_outputs(group) -> tuple:
    """(the arrays the group's launches read from outside it, each once, in order of first
    use; every launch's outputs, in order): the chained launch's inputs and outputs."""
    external, seen = [], set()
    for launch in group:
        for x in launch.call["inputs"]:
            if not (isinstance(x, Pending) and x.launch in group):
                x = resolve(x)
                if id(x) not in seen:
                    seen.add(id(x))
                    external.append(x)
    return external, [p for launch in group for p in launch.outputs]


def launch_chain(group, key):
    """The group's launches as one (chain_text), its outputs every kernel's outputs; key:
    whose counts it takes (_counts)."""
    external, outputs = inputs_outputs(group)
    head, body, smem, contiguous = chain_text(group, external, outputs)
    digest = hashlib.sha256(f"{body}\0{smem}\0{contiguous}".encode()).hexdigest()[:12]
    kern = _chain_kernel(f"jang_chain{len(group)}_{digest}", head, body, len(external), len(outputs), contiguous, smem)
    blocks, threads = tuple(launch.blocks() for launch in group), group[0].block_size()
    arrays = kern(inputs=[*external, _layout(blocks), _counts(key, blocks)],
                  grid=(sum(math.prod(b) for b in blocks) * threads, 1, 1),
                  threadgroup=(threads, 1, 1), output_shapes=[p.shape for p in outputs],
                  output_dtypes=[p.dtype for p in outputs])
    for pending, array in zip(outputs, arrays):
        pending.value = array


@lru_cache(maxsize=None)
def _chain_kernel(name, head, body, n_inputs, n_outputs, contiguous, shared_memory):
    inputs = tuple(f"jg_in{i}" for i in range(n_inputs)) + ("jg_layout", "jg_chain")  # _layout, _counts
    return dialect.mlx_kernel(name, head, body, inputs, tuple(f"jg_out{i}" for i in range(n_outputs)), "cuda",
                              contiguous, shared_memory)


@lru_cache(maxsize=None)
def _layout(blocks: tuple):
    """The chain's block layout as the kernel reads it at run time: each kernel's last
    ticket + 1, then each kernel's blocks in x and y (chain_text). Not constants in the
    text: the attention's blocks follow the KV buffer's capacity, which mlx-lm grows every
    256 tokens, and a new text is a new NVRTC compile (seconds) in the middle of a decode."""
    ends = [sum(math.prod(b) for b in blocks[:i + 1]) for i in range(len(blocks))]
    layout = mx.array(ends + [v for b in blocks for v in b[:2]], mx.int32)  # 12+ bytes: on the device (gpu._scalar)
    mx.eval(layout)
    return layout


@lru_cache(maxsize=None)
def _counts(key, blocks: tuple):
    """The ticket and per-kernel finished-block counts (uint64, never reset: see
    jg_chain_wait) of the chains of one key, (owner, position in its recording), and
    one block layout. The launches that share them must run one after another, which
    MLX's graph orders only through data: a decode step's chains each read the one
    before's output, and the next step's read this step's; two models' steps evaluated
    together have two owners. Every launch takes exactly its blocks' tickets, so each
    launch's tickets are the next epoch's."""
    counts = mx.zeros((len(blocks) + 1,), mx.uint64)
    mx.eval(counts)
    return counts


def _template_line(name, value) -> str:
    if isinstance(value, mx.Dtype):
        return f"using {name} = {CUDA_TYPES[value]};"
    if isinstance(value, bool):
        return f"constexpr bool {name} = {'true' if value else 'false'};"
    return f"constexpr int {name} = {int(value)};"


def _input_lines(name, x, body, slot, out_slot) -> list:
    """Locals that give a kernel's body its input ``name`` as it expects it: the chain's
    input jg_in{slot} (with MLX's shape parameters where the body reads them), or an
    output of an earlier kernel of the chain, jg_out{out_slot}, whose shape is known now
    (row-contiguous: MLX allocates outputs so)."""
    ctype = CUDA_TYPES[x.dtype]
    used = dialect.shape_parameters_read(name, body)
    if out_slot is None:
        return [f"const {ctype}* {name} = jg_in{slot};"] + [f"const auto& {name}{s} = jg_in{slot}{s};" for s in used]
    shape = x.shape
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    values = {"_shape": f"const int {name}_shape[{len(shape)}] = {{{', '.join(map(str, shape))}}};",
              "_strides": f"const int64_t {name}_strides[{len(shape)}] = {{{', '.join(map(str, strides))}}};",
              "_ndim": f"const int {name}_ndim = {len(shape)};"}
    return [f"const {ctype}* {name} = jg_out{out_slot};"] + [values[s] for s in used]


def chain_text(group, external, outputs) -> tuple:
    """(header, body, dynamic shared memory, whether inputs must be row-contiguous) of
    the chained launch of group; external: its inputs from outside, in slot order;
    outputs: every kernel's outputs, in slot order. The text does not depend on the
    kernels' block counts (read from jg_layout: _layout). Inputs are row-contiguous if
    any kernel asks for it (a kernel reading strides then gets a contiguous copy of a
    strided input: the same values). Each kernel's static shared memory is its own, so
    they add up (48 KB at most, or the launch fails)."""
    slots = {id(x): i for i, x in enumerate(external)}
    out_slots = {id(p): i for i, p in enumerate(outputs)}
    n = len(group)
    lines = ["__shared__ unsigned long long jg_ticket;",
             f"int jg_end[{n}];",  # loaded while the ticket's atomic is in flight
             f"for (int i = 0; i < {n}; i++) jg_end[i] = jg_layout[i];",
             "if (threadIdx.x == 0) jg_ticket = atomicAdd((unsigned long long*)jg_chain, 1ull);",
             "__syncthreads();",
             "const uint64_t jg_epoch = jg_ticket / gridDim.x;",
             "const int jg_t = int(jg_ticket - jg_epoch * gridDim.x);"]
    for p, launch in enumerate(group):
        k, call = launch.kernel, launch.call
        body = dialect.body_source(k.name, "cuda", k.defines, k.macros, virtual_blocks=True)
        start = f"jg_end[{p - 1}]" if p else "0"
        lines.append(f"{'else ' if p else ''}if (jg_t < jg_end[{p}]) {{")
        if p:  # counts[p]: kernel p - 1's finished blocks, (jg_end[p - 1] - its start) per launch
            lines.append(f"jg_chain_wait(jg_chain, {p}, (jg_epoch + 1) * (jg_end[{p - 1}] - {f'jg_end[{p - 2}]' if p > 1 else '0'}));")
        nx, ny = f"jg_layout[{n + 2 * p}]", f"jg_layout[{n + 2 * p + 1}]"
        position = {"jg_bx": f"jg_v % {nx}", "jg_by": f"jg_v / {nx} % {ny}", "jg_bz": f"jg_v / ({nx} * {ny})"}
        lines += ["[&]() {", f"const int jg_v = jg_t - {start};"]
        lines += [f"const int {v} = {e};" for v, e in position.items() if re.search(rf"\b{v}\b", body)]
        lines += [_template_line(name, value) for name, value in call.get("template", ())]
        for name, x in zip(k.inputs, call["inputs"]):
            inside = isinstance(x, Pending) and x.launch in group
            lines += _input_lines(name, x, body, None if inside else slots[id(resolve(x))],
                                  out_slots[id(x)] if inside else None)
        lines += [f"{CUDA_TYPES[p_.dtype]}* {name} = jg_out{out_slots[id(p_)]};"
                  for name, p_ in zip(k.outputs, launch.outputs)]
        lines += [body, "}();"]
        # the body's own macros end with its scope (another kernel may define them otherwise)
        lines += [f"#undef {m}" for m in (*k.defines, *(m for m, _ in k.macros))]
        lines += [f"jg_chain_done(jg_chain, {p + 1});", "}"]  # counts[p + 1]: this kernel's finished blocks
    text = "\n".join(lines)
    head = dialect.header_for(text, "cuda")
    smem = max(launch.kernel.shared_memory for launch in group)
    return head, text, smem, any(launch.kernel.contiguous for launch in group)
