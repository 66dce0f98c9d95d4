"""One kernel body, two GPU dialects.

Each kernel is written once (``src/*.body``, plus the shared helpers in
``src/common.inc``) in a small neutral vocabulary; a per-dialect table of words
and a prelude turn it into CUDA (``mx.fast.cuda_kernel``) or Metal
(``mx.fast.metal_kernel``). Apple SIMD-groups and NVIDIA warps are both 32
lanes, so one algorithm fits both.

The built-in names are substituted textually rather than hidden behind macros:
MLX's Metal generator adds ``[[thread_index_in_simdgroup]]``-style arguments
only for the names it finds in the body's text.
"""

import hashlib
import os
import re
import threading
import warnings
from functools import lru_cache
from pathlib import Path

SRC = Path(__file__).parent / "src"

# neutral word -> its spelling per dialect
TOKENS = {
    "cuda": {
        "THREAD": "int(threadIdx.x)",
        "BLOCK_X": "int(blockIdx.x)",
        "BLOCK_Y": "int(blockIdx.y)",
        "BLOCK_Z": "int(blockIdx.z)",
        "LANE": "int(threadIdx.x & 31)",
        "WARP": "int(threadIdx.x >> 5)",
        "BARRIER": "__syncthreads()",
        "WARP_BARRIER": "__syncwarp()",
        "SHARED": "__shared__",  # a threadgroup-memory declaration
        "TG": "",  # the address space in a pointer to threadgroup memory
        "GLOBAL": "",  # ... to device memory
        "LOCAL": "",  # ... to a thread's own registers / stack
    },
    "metal": {
        "THREAD": "int(thread_position_in_threadgroup.x)",
        "BLOCK_X": "int(threadgroup_position_in_grid.x)",
        "BLOCK_Y": "int(threadgroup_position_in_grid.y)",
        "BLOCK_Z": "int(threadgroup_position_in_grid.z)",
        "LANE": "int(thread_index_in_simdgroup)",
        "WARP": "int(simdgroup_index_in_threadgroup)",
        "BARRIER": "threadgroup_barrier(mem_flags::mem_threadgroup)",
        "WARP_BARRIER": "simdgroup_barrier(mem_flags::mem_threadgroup)",
        "SHARED": "threadgroup",
        "TG": "threadgroup",
        "GLOBAL": "device",
        "LOCAL": "thread",
    },
}

# What differs beyond spelling: warp reductions, float bit casts, zero vectors and
# the 16x16x16 matrix-unit tile (CUDA mma.sync PTX; Metal four 8x8 simdgroup matrices).
PRELUDE = {
    "cuda": r"""
inline float jg_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
inline float jg_warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
inline float jg_shfl_xor(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
// cross-block hand-off (attention_split's last block): publish, count, read from L2
inline void jg_fence() { __threadfence(); }
inline int jg_atomic_add(const int* p, int v) { return atomicAdd(const_cast<int*>(p), v); }
inline float jg_load_l2(const float* p) { return __ldcg(p); }
inline float jg_bits_float(uint32_t v) { return __uint_as_float(v); }
inline uint4 jg_zero4() { return make_uint4(0u, 0u, 0u, 0u); }
inline float jg_exp(float v) { return __expf(v); }
inline float jg_rsqrt(float v) { return rsqrtf(v); }
inline float jg_cos(float v) { return cosf(v); }
inline float jg_sin(float v) { return sinf(v); }

// A 16x16x16 tile on the tensor cores as two mma.sync m16n8k16 (fp32 accumulate),
// fragments read from threadgroup memory with 32-bit loads in the PTX ISA's layout:
// lane = 4 * group + t holds A rows {group, group + 8}, k columns {2t, 2t+1, 2t+8, 2t+9};
// B (stored n-major, p[n * ld + k]) column group, k rows likewise; C rows {group,
// group + 8}, columns {2t, 2t + 1} of each 8-wide half. (No <mma.h>: NVRTC setups
// without the toolkit's crt headers compile this too.)
template <typename U>
struct jg_afrag { uint32_t r[4]; };
template <typename U>
struct jg_bfrag { uint32_t r[2][2]; };
struct jg_acc { float c[2][4]; };
inline void jg_acc_zero(jg_acc& a) {
#pragma unroll
  for (int h = 0; h < 2; h++) for (int i = 0; i < 4; i++) a.c[h][i] = 0.0f;
}
inline uint32_t jg_ld32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }
template <typename U>
inline void jg_load_a(jg_afrag<U>& a, const U* p, int ld) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  a.r[0] = jg_ld32(p + g * ld + 2 * t);
  a.r[1] = jg_ld32(p + (g + 8) * ld + 2 * t);
  a.r[2] = jg_ld32(p + g * ld + 2 * t + 8);
  a.r[3] = jg_ld32(p + (g + 8) * ld + 2 * t + 8);
}
template <typename U>
inline void jg_load_b(jg_bfrag<U>& b, const U* p, int ld) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; h++) {
    b.r[h][0] = jg_ld32(p + (8 * h + g) * ld + 2 * t);
    b.r[h][1] = jg_ld32(p + (8 * h + g) * ld + 2 * t + 8);
  }
}
template <typename U> struct jg_mma_op;
template <> struct jg_mma_op<__half> {
  static inline void run(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
template <> struct jg_mma_op<__nv_bfloat16> {
  static inline void run(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
template <typename U>
inline void jg_mma(jg_acc& c, const jg_afrag<U>& a, const jg_bfrag<U>& b) {
  jg_mma_op<U>::run(c.c[0], a.r, b.r[0]);
  jg_mma_op<U>::run(c.c[1], a.r, b.r[1]);
}
inline void jg_acc_store(const jg_acc& c, float* p, int ld) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; h++) {
    p[g * ld + 8 * h + 2 * t] = c.c[h][0];
    p[g * ld + 8 * h + 2 * t + 1] = c.c[h][1];
    p[(g + 8) * ld + 8 * h + 2 * t] = c.c[h][2];
    p[(g + 8) * ld + 8 * h + 2 * t + 1] = c.c[h][3];
  }
}
""",
    "metal": r"""
#include <metal_stdlib>
using namespace metal;
inline float jg_warp_sum(float v) { return simd_sum(v); }
inline float jg_warp_max(float v) { return simd_max(v); }
inline float jg_shfl_xor(float v, int o) { return simd_shuffle_xor(v, ushort(o)); }
inline void jg_fence() { threadgroup_barrier(mem_flags::mem_device); }
inline int jg_atomic_add(const device int* p, int v) {
  return atomic_fetch_add_explicit((device atomic_int*)p, v, memory_order_relaxed);
}
inline float jg_load_l2(const device float* p) { return *p; }
inline float jg_bits_float(uint32_t v) { return as_type<float>(v); }
inline uint4 jg_zero4() { return uint4(0u); }
inline float jg_exp(float v) { return fast::exp(v); }
inline float jg_rsqrt(float v) { return metal::rsqrt(v); }
inline float jg_cos(float v) { return metal::precise::cos(v); }
inline float jg_sin(float v) { return metal::precise::sin(v); }

template <typename U>
struct jg_afrag { simdgroup_matrix<U, 8, 8> m[2][2]; };
template <typename U>
struct jg_bfrag { simdgroup_matrix<U, 8, 8> m[2][2]; };
struct jg_acc { simdgroup_matrix<float, 8, 8> m[2][2]; };
inline void jg_acc_zero(thread jg_acc& a) {
  for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) a.m[i][j] = simdgroup_matrix<float, 8, 8>(0.0f);
}
template <typename U>
inline void jg_load_a(thread jg_afrag<U>& a, const threadgroup U* p, int ld) {
  for (int i = 0; i < 2; i++) for (int k = 0; k < 2; k++) simdgroup_load(a.m[i][k], p + i * 8 * ld + k * 8, ld);
}
template <typename U>
inline void jg_load_b(thread jg_bfrag<U>& b, const threadgroup U* p, int ld) {
  for (int k = 0; k < 2; k++) for (int j = 0; j < 2; j++)
    simdgroup_load(b.m[k][j], p + j * 8 * ld + k * 8, ld, ulong2(0, 0), true);
}
template <typename U>
inline void jg_mma(thread jg_acc& c, const thread jg_afrag<U>& a, const thread jg_bfrag<U>& b) {
  for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) for (int k = 0; k < 2; k++)
    simdgroup_multiply_accumulate(c.m[i][j], a.m[i][k], b.m[k][j], c.m[i][j]);
}
inline void jg_acc_store(const thread jg_acc& c, threadgroup float* p, int ld) {
  for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) simdgroup_store(c.m[i][j], p + i * 8 * ld + j * 8, ld);
}
""",
}

_WORD = re.compile(r"\b(" + "|".join(TOKENS["cuda"]) + r")\b")


# A chained launch (chain.py) runs each kernel's blocks under another block index: its
# bodies read the block's position from these locals instead of the hardware's.
VIRTUAL_BLOCKS = {"BLOCK_X": "jg_bx", "BLOCK_Y": "jg_by", "BLOCK_Z": "jg_bz"}


def translate(text: str, dialect: str, virtual_blocks: bool = False) -> str:
    table = {**TOKENS[dialect], **VIRTUAL_BLOCKS} if virtual_blocks else TOKENS[dialect]
    return _WORD.sub(lambda m: table[m.group(1)], text)


@lru_cache(maxsize=None)
def body(name: str) -> str:
    return (SRC / f"{name}.body").read_text()


# bodies written for one dialect only (no export to the other)
CUDA_ONLY_BODIES = ("qmv_tc",)

# helpers only some dialects have (the tensor-core GEMV reads mma.sync fragments
# register by register: no Metal counterpart)
DIALECT_INCLUDES = {"cuda": ("cuda.inc",), "metal": ()}


@lru_cache(maxsize=None)
def header(dialect: str) -> str:
    files = ("common.inc",) + DIALECT_INCLUDES[dialect]
    return PRELUDE[dialect] + "".join(translate((SRC / f).read_text(), dialect) for f in files)


def minify(text: str) -> str:
    """text without comments, indentation or blank lines; preprocessor lines keep their
    own line. MLX rebuilds and hashes a CUDA kernel's whole source string on every
    launch, so every byte handed to it is host time at decode: CUDA kernels now go to
    MLX as #include lines (cuda_include_form), and the text stays lean for Metal's
    sources and for JANG_CUDA_SOURCE=inline."""
    text = re.sub(r"//[^\n]*", "", text)
    return "\n".join(line.strip() for line in text.split("\n") if line.strip())


_CONDITIONAL = re.compile(r"#\s*(ifdef|ifndef|if|elif|else|endif)\b\s*(\w*).*")


def resolve_conditionals(text: str, defines) -> str:
    """text with its #ifdef / #ifndef / #else / #endif blocks resolved for ``defines``
    (every other macro counts as undefined): a body's unused fusions cost host time on
    every launch (see minify), so they are cut before MLX sees the source."""
    defined, keep, out = set(defines), [], []  # keep: per open block, whether its current branch is taken
    for line in text.split("\n"):
        m = _CONDITIONAL.fullmatch(line.strip())
        if m is None:
            if all(keep):
                out.append(line)
        elif m.group(1) in ("if", "elif"):
            raise ValueError(f"kernel bodies use #ifdef / #ifndef only, not #{m.group(1)} (resolve_conditionals)")
        elif m.group(1) in ("ifdef", "ifndef"):
            keep.append((m.group(2) in defined) == (m.group(1) == "ifdef"))
        elif m.group(1) == "else":
            keep.append(not keep.pop())
        else:
            keep.pop()
    if keep:
        raise ValueError("unterminated #ifdef block in a kernel source")
    return "\n".join(out)


_HELPER = re.compile(r"\bjg_\w+")


def _items(text: str) -> list:
    """Top-level items of comment-free C-like text: (defined name or None, item text).
    An item ends at the semicolon or closing brace that brings nesting back to zero;
    its name is the last jg_ word before its first '(' or '{'."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if depth == 0 and ch in ";}" and not text[i + 1:].lstrip().startswith(";"):
            item = text[start:i + 1].strip()
            start = i + 1
            if item:
                head = re.split(r"[({]", item, maxsplit=1)[0]
                names = _HELPER.findall(head)
                items.append((names[-1] if names else None, item))
    tail = text[start:].strip()
    if tail:
        items.append((None, tail))
    return items


def _split_preprocessor(text: str):
    lines = text.split("\n")
    pre = [l for l in lines if l.startswith("#") and not l.startswith("#pragma")]
    rest = "\n".join(l for l in lines if not (l.startswith("#") and not l.startswith("#pragma")))
    return pre, rest


def _launch_bounds_text(launch_bounds: tuple) -> str:
    """Header lines that give the kernel after them CUDA's __launch_bounds__(threads,
    min_blocks): MLX writes the kernel's signature itself, so the header redefines the
    __global__ it starts with (CUDA's own definition, plus the bounds). The bounds cap
    the registers (65536 / (threads rounded up to warps * min_blocks)), so that
    min_blocks blocks fit on an SM."""
    if not launch_bounds:
        return ""
    threads, min_blocks = launch_bounds
    return f"#undef __global__\n#define __global__ __location__(global) __launch_bounds__({threads}, {min_blocks})\n"


@lru_cache(maxsize=None)
def source(name: str, dialect: str, defines: tuple = (), launch_bounds: tuple = (), macros: tuple = ()) -> tuple:
    """(header, body) of kernel ``name`` as it is built: minified, and the header cut
    to the helpers the body uses (directly or through other helpers). ``defines``
    are macros set at the top of the body: a body's optional fusions (JG_NORM ...).
    launch_bounds: (threads, min_blocks) for CUDA (see _launch_bounds_text). macros:
    (name, text) pairs defined at the top of the body too, for text only the launch
    knows (concat.body's list of inputs)."""
    if launch_bounds and dialect != "cuda":
        raise ValueError(f"launch bounds are CUDA's; kernel {name} asked for them in {dialect}")
    body_text = body_source(name, dialect, defines, macros)
    return header_for(body_text, dialect) + _launch_bounds_text(launch_bounds), body_text


@lru_cache(maxsize=None)
def body_source(name: str, dialect: str, defines: tuple = (), macros: tuple = (), virtual_blocks: bool = False) -> str:
    """The body of kernel ``name`` as source() builds it; with virtual_blocks it reads
    its block's position from jg_bx / jg_by / jg_bz (VIRTUAL_BLOCKS)."""
    if any("\n" in text for _, text in macros):
        raise ValueError(f"kernel {name}: a macro's text must be one line (a #define ends at the newline)")
    return "".join(f"#define {d} 1\n" for d in defines) + "".join(
        f"#define {m} {text}\n" for m, text in macros) + resolve_conditionals(
        minify(translate(body(name), dialect, virtual_blocks)), defines + tuple(m for m, _ in macros))


def header_for(body_text: str, dialect: str) -> str:
    """The dialect's header cut to the helpers body_text uses, directly or through
    other helpers (each helper is hashed and compiled with every kernel that gets it)."""
    pre, rest = _split_preprocessor(minify(header(dialect)))
    items = _items(rest)
    wanted, frontier = set(), set(_HELPER.findall(body_text))
    while frontier:
        wanted |= frontier
        frontier = {ref for n, item in items if n in frontier for ref in _HELPER.findall(item)} - wanted
    kept = [item for n, item in items if n is None or n in wanted]
    return "\n".join(pre + kept) + "\n"


# MLX passes an input's shape / strides / ndim to a CUDA kernel only when it finds
# "<input>_shape" (...) in the source it is handed
SHAPE_PARAMETERS = ("_shape", "_strides", "_ndim")


def shape_parameters_read(name: str, text: str) -> list:
    """The suffixes of SHAPE_PARAMETERS that text names for input ``name``."""
    return [suffix for suffix in SHAPE_PARAMETERS if name + suffix in text]


def cuda_include_form(full_name: str, head: str, body_text: str, inputs) -> tuple:
    """(header, source) for mx.fast.cuda_kernel that #include head and body_text from
    two files instead of carrying them. MLX hashes a custom kernel's whole source
    string on every launch: at ~0.2 us per KB (H200, session 16's node_cost_probe) a
    decode step's ~50 KB of kernel text per layer cost ~0.3 ms of host time per token.
    The files are named by the hash of their content, so MLX's module cache (keyed by
    the kernel's name and the hash of the text it is handed) can never pair a changed
    body with an old module. NVRTC opens an absolute #include path itself; MLX compiles
    a kernel at its first launch with new template values, so the files must outlive
    the process's use of them (MLX keeps no disk cache of custom kernels). The source
    keeps a comment naming the shape parameters the body reads, for MLX's search
    (SHAPE_PARAMETERS). Where the folder cannot be written, (head, body_text) come
    back as they are, with a warning."""
    from jang.paths import cache_dir

    digest = hashlib.sha256(f"{head}\0{body_text}".encode()).hexdigest()[:20]
    try:
        folder = cache_dir("cuda-sources").resolve()  # absolute: MLX compiles later, from any directory
        if any(c in str(folder) for c in '"\\\n'):
            raise OSError(f"{folder} has a quote, backslash or newline in its path, which an #include cannot name")
        paths = [folder / f"{full_name}-{digest}.{part}.cuh" for part in ("header", "body")]
        for path, text in zip(paths, (head + "\n", body_text + "\n")):
            _write_whole(path, text)
    except OSError as e:  # a read-only home: the kernels still run, with MLX hashing their whole text
        warnings.warn(f"JANG cannot write kernel sources under $JANG_CACHE or ~/.cache/jang ({e}); "
                      "handing MLX the whole text instead (slower decode)", stacklevel=2)
        return head, body_text
    used = [n + suffix for n in inputs for suffix in shape_parameters_read(n, body_text)]
    uses = f"// reads {' '.join(used)}\n" if used else ""
    return f'#include "{paths[0]}"\n', f'{uses}#include "{paths[1]}"\n'


def _write_whole(path: Path, text: str):
    """path holding exactly text: a file already there with other bytes (one cut short by
    a crash) is written again. Written to a temporary name, synced, then renamed, so no
    process ever reads half a file."""
    try:
        if path.read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# JANG_CUDA_SOURCE=inline hands MLX the whole text, as before session 16 (for timing)
_INLINE_CUDA_SOURCE = os.environ.get("JANG_CUDA_SOURCE", "") == "inline"


@lru_cache(maxsize=None)
def kernel(name: str, inputs: tuple, outputs: tuple, dialect: str, contiguous: bool = True, defines: tuple = (),
           shared_memory: int = 0, launch_bounds: tuple = (), macros: tuple = ()):
    """The kernel object for ``src/<name>.body`` in ``dialect`` (one per argument set;
    see Kernel). Each set of defines gets its own kernel name: MLX caches compiled
    kernels by name. shared_memory: bytes of dynamic shared memory (CUDA only). It is
    part of the name too, since MLX raises a kernel's limit past 48 KB once, when it
    first loads it. launch_bounds: (threads, min_blocks), CUDA only; part of the name as
    well. macros: (name, text) pairs (see source); the name gets the hash of their text."""
    full_name = "_".join([f"jang_{name}", *(d.lower().removeprefix("jg_") for d in defines)])
    if shared_memory:
        full_name = f"{full_name}_smem{shared_memory}"
    if launch_bounds:
        full_name = f"{full_name}_lb{launch_bounds[0]}x{launch_bounds[1]}"
    if macros:
        full_name = f"{full_name}_{hashlib.sha256(repr(macros).encode()).hexdigest()[:8]}"
    return Kernel(name, full_name, inputs, outputs, dialect, contiguous, defines, shared_memory, launch_bounds, macros)


# The recordings open in this thread (chain.recording): while one is, kernel calls are
# recorded there instead of launched.
RECORDING = threading.local()


class Kernel:
    """A kernel as gpu.py calls it: kernel(inputs=..., template=..., grid=...,
    threadgroup=..., output_shapes=..., output_dtypes=...) -> outputs, as MLX's own
    kernel objects. MLX's object is made at the first launch (a machine without the
    dialect's backend can still build and record launches: chain.py's tests), and
    while a chain.recording is open in this thread the call is recorded there
    instead, returning its outputs as chain.Pending."""

    def __init__(self, name, full_name, inputs, outputs, dialect, contiguous, defines, shared_memory, launch_bounds,
                 macros):
        self.name, self.full_name, self.inputs, self.outputs, self.dialect = name, full_name, inputs, outputs, dialect
        self.contiguous, self.defines, self.shared_memory = contiguous, defines, shared_memory
        self.launch_bounds, self.macros = launch_bounds, macros
        self._mlx = None

    def __call__(self, **launch):
        recording = getattr(RECORDING, "current", None)
        if recording is not None:
            return recording.add(self, launch)
        return self.mlx(**launch)

    @property
    def mlx(self):
        """MLX's kernel object (mx.fast.cuda_kernel / metal_kernel), made once."""
        if self._mlx is None:
            head, src = source(self.name, self.dialect, self.defines, self.launch_bounds, self.macros)
            self._mlx = mlx_kernel(self.full_name, head, src, self.inputs, self.outputs, self.dialect,
                                   self.contiguous, self.shared_memory)
        return self._mlx


def mlx_kernel(full_name, head, src, inputs, outputs, dialect, contiguous=True, shared_memory=0):
    """MLX's kernel object for this text: CUDA's as #include lines (cuda_include_form)."""
    import mlx.core as mx

    make = mx.fast.cuda_kernel if dialect == "cuda" else mx.fast.metal_kernel
    extra = {"shared_memory": shared_memory} if shared_memory else {}
    if dialect == "cuda" and not _INLINE_CUDA_SOURCE:
        head, src = cuda_include_form(full_name, head, src, inputs)
    return make(name=full_name, input_names=list(inputs), output_names=list(outputs),
                source=src, header=head, ensure_row_contiguous=contiguous, **extra)
