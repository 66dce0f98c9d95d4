"""Streaming conversion: models larger than memory.

Nothing is loaded whole. The source shards are opened lazily (``mx.load`` reads a
tensor's bytes only when it is evaluated); the mlx-lm model class is built only
for its module tree and shapes (its random init is lazy and never evaluated), and
its ``sanitize`` renames and stacks the lazy source tensors (tied heads dropped,
experts stacked into switch layers). The plan comes from that tree, so every
output tensor's name, dtype and shape is known up front: shard headers are
written first and tensors are computed one at a time as their bytes are due.
Peak memory is one tensor group (a weight, or an expert stack, with its
quantized form) plus a fixed overhead, whatever the model's size.

Crash safety and resume: output goes to ``.<name>.jang-partial`` beside the
target (the same name every run); each finished shard is fsynced and recorded
with its sha256 in ``jang-journal.jsonl``; ``config.json`` is written last and
the folder is renamed into place only when complete. ``resume=True`` keeps the
journaled shards whose hashes still match and writes the rest: the result is
byte-identical to an uninterrupted run.
"""

import fcntl
import os
import shutil
import signal
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm import utils as mlx_utils

from .allocate import plan_from_profile
from .errors import CorruptShardError, JangError, SourceReadError, WriteError
from .format import FORMAT_VERSION, MAX_SHARD_BYTES, plan_records, shard_metadata, write_config, write_jang_config
from .paths import move_into_place, resumable_partial_name
from .progress import Progress
from .quantize import check_finite, storage_dtype
from .quantizers import QUANTIZERS
from .shards import Journal, TensorSpec, check_readable, layout, write_index, write_shard

COPIED_FILES = ("generation_config.json",)
LOCK_NAME = "jang.lock"
GPTQ_DIR = "gptq"  # quantized tensors of the GPTQ stage, until the shards are written

# Fused 3-D expert tensors some checkpoints carry (transformers 5 writes
# ``mlp.experts.gate_up_proj`` [E, 2*inter, hidden] and ``mlp.experts.down_proj``
# [E, hidden, inter]), which mlx-lm's sanitize of most MoE classes does not take.
# source suffix -> switch layers it splits into, in order along the output axis.
FUSED_EXPERTS = {
    ".experts.gate_up_proj": ("switch_mlp.gate_proj", "switch_mlp.up_proj"),
    ".experts.down_proj": ("switch_mlp.down_proj",),
}


# ---------------------------------------------------------------- fault injection

_steps = 0


def checkpoint():
    """A point where a conversion may be killed. With JANG_KILL_AT_STEP=n set, the
    process SIGKILLs itself at the n-th one (tests/test_stream.py); steps_taken()
    tells a test how many an uninterrupted run passes."""
    global _steps
    _steps += 1
    if os.environ.get("JANG_KILL_AT_STEP") == str(_steps):
        os.kill(os.getpid(), signal.SIGKILL)


def steps_taken() -> int:
    return _steps


# ---------------------------------------------------------------- source

def source_files(source: Path) -> list:
    files = sorted(Path(source).glob("model*.safetensors"))
    if not files:
        raise CorruptShardError(f"{source}: no model*.safetensors files.")
    return files


def lazy_weights(files):
    """(name -> lazy array over all source shards, name -> its file); nothing is read yet."""
    weights, origin = {}, {}
    for f in files:
        check_readable(f)
        try:
            shard = mx.load(str(f))
        except (RuntimeError, ValueError) as e:
            raise CorruptShardError(f"{f}: cannot read ({e}).") from None
        weights.update(shard)
        origin.update(dict.fromkeys(shard, f))
    return weights, origin


def skeleton(config: dict):
    """The mlx-lm model for config, parameters never evaluated (shapes only)."""
    model_cls, args_cls = mlx_utils._get_classes(config)
    return model_cls(args_cls.from_dict(config))


def split_fused_experts(weights: dict, shapes: dict) -> dict:
    """Rewrite fused 3-D expert tensors as mlx-lm switch-layer weights [E, out, in]
    (lazy slices: read when written)."""
    for name in [n for n in weights if n.endswith(tuple(FUSED_EXPERTS))]:
        suffix = next(s for s in FUSED_EXPERTS if name.endswith(s))
        prefix = name[: -len(suffix)]
        targets = [f"{prefix}.{t}.weight" for t in FUSED_EXPERTS[suffix]]
        if not all(t in shapes for t in targets):
            continue  # not a switch-layer model: leave it to sanitize
        fused = weights.pop(name)
        experts, out, inp = shapes[targets[0]]
        if fused.shape[1] == out * len(targets) and fused.shape[2] == inp:
            pass  # [E, out, in], as a Linear stores it (transformers 5)
        elif fused.shape[2] == out * len(targets) and fused.shape[1] == inp:
            fused = fused.swapaxes(1, 2)  # [E, in, out] (older fused exports)
        else:
            raise JangError(f"{name}: fused experts of shape {tuple(fused.shape)} fit none of "
                            f"{', '.join(targets)} ({experts}, {out}, {inp}).")
        for i, t in enumerate(targets):
            weights[t] = fused[:, i * out:(i + 1) * out, :]
    return weights


def param_shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def sanitized_weights(model, weights: dict, where) -> dict:
    """The source tensors under the model's own parameter names, checked against its
    tree. Call once per model: sanitize may change the model (Gemma drops its
    lm_head when the checkpoint ties it to the embedding)."""
    weights = split_fused_experts(weights, param_shapes(model))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    params = param_shapes(model)
    missing = sorted(set(params) - set(weights))
    extra = sorted(set(weights) - set(params))
    if missing or extra:
        raise JangError(f"{where}: the weights do not fit the {type(model).__module__} model: "
                        f"missing {missing[:5]}, unexpected {extra[:5]}.")
    wrong = [(k, tuple(weights[k].shape), s) for k, s in params.items() if tuple(weights[k].shape) != s]
    if wrong:
        k, got, want = wrong[0]
        raise JangError(f"{where}: tensor {k} has shape {got}, the model expects {want}.")
    return weights


# ---------------------------------------------------------------- output tensors

def output_specs(weights: dict, plan):
    """TensorSpecs of every output tensor, and module path -> plan entry per quantized weight."""
    specs, quantized = [], {}
    for name, w in weights.items():
        module, _, kind = name.rpartition(".")
        entry = plan.tensors.get(module)
        if kind == "weight" and entry is not None and entry.quantized:
            *lead, inp = w.shape
            sdt = storage_dtype(w.dtype)
            specs += [TensorSpec(f"{module}.weight", mx.uint32, (*lead, inp * entry.bits // 32)),
                      TensorSpec(f"{module}.scales", sdt, (*lead, inp // entry.group_size)),
                      TensorSpec(f"{module}.biases", sdt, (*lead, inp // entry.group_size))]
            quantized[module] = entry
        else:
            specs.append(TensorSpec(name, w.dtype, tuple(w.shape)))
    return specs, quantized


class Producer:
    """Computes output tensors on demand. A quantized module's weight, scales and
    biases come out of one quantization; the parts not yet written wait here."""

    def __init__(self, weights, quantized, progress, origin, precomputed=None):
        self.weights, self.quantized, self.progress, self.origin = weights, quantized, progress, origin
        self.precomputed = precomputed or {}  # name -> quantized part computed earlier (GPTQ)
        self.nbytes = {k: w.nbytes for k, w in weights.items()}
        self.pending = {}

    def read(self, name):
        """The source tensor, evaluated: the moment its bytes are read from disk. It
        leaves self.weights, which would otherwise keep every tensor read so far."""
        a = self.weights.pop(name)
        try:
            mx.eval(a)
        except RuntimeError as e:
            where = self.origin.get(name) or f"the source shards ({', '.join(sorted({f.name for f in self.origin.values()}))})"
            raise SourceReadError(f"{where}: reading tensor {name} failed ({e}).") from None
        return a

    QUANTIZED_PARTS = ("weight", "scales", "biases")

    def source_bytes(self, name):
        module, _, kind = name.rpartition(".")
        if module in self.quantized and kind in self.QUANTIZED_PARTS:
            return self.nbytes[f"{module}.weight"] if kind == "weight" else 0
        return self.nbytes[name]

    def __call__(self, name):
        checkpoint()
        module, _, kind = name.rpartition(".")
        # a quantized Linear's own bias (Qwen2's q/k/v, Mamba's dt_proj) stays float
        if module not in self.quantized or kind not in self.QUANTIZED_PARTS:
            self.progress.update(self.source_bytes(name), tensor=name)
            return self.read(name)
        if name not in self.pending and f"{module}.weight" in self.precomputed:
            self.pending.update({f"{module}.{k}": self.precomputed.pop(f"{module}.{k}")
                                 for k in ("weight", "scales", "biases")})
            self.weights.pop(f"{module}.weight")
            self.progress.update(self.nbytes[f"{module}.weight"], tensor=f"{module}.weight")
        if name not in self.pending:
            entry = self.quantized[module]
            weight = self.read(f"{module}.weight")
            check_finite(module, weight)
            wq, scales, biases = QUANTIZERS[entry.method](weight.astype(storage_dtype(weight.dtype)),
                                                          entry.bits, entry.group_size)
            mx.eval(wq, scales, biases)
            self.pending.update({f"{module}.weight": wq, f"{module}.scales": scales, f"{module}.biases": biases})
            self.progress.update(weight.nbytes, tensor=f"{module}.weight")
            del weight
        return self.pending.pop(name)


# ---------------------------------------------------------------- the partial folder

def run_key(source: Path, files, profile, method, group_size, max_shard_bytes) -> dict:
    """What a resumed run must share with the run it continues."""
    from . import __version__

    stat = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in [*files, source / "config.json"]]
    return {"jang": __version__, "format_version": FORMAT_VERSION, "profile": profile, "method": method,
            "group_size": group_size, "max_shard_bytes": max_shard_bytes, "source": stat}


def lock(folder: Path):
    """Hold an exclusive lock on the partial folder for the life of the returned file."""
    fh = open(folder / LOCK_NAME, "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise JangError(f"{folder}: another conversion is writing here.") from None
    return fh


def open_partial(partial: Path, resume: bool):
    """The held lock of the partial folder, created (or first cleared, unless resuming)."""
    if partial.exists() and not resume:
        held = lock(partial)  # fails if a live conversion owns it
        journal = partial / Journal.NAME
        shards = len(journal.read_text().splitlines()) - 1 if journal.exists() else 0
        if shards > 0:
            print(f"jang: starting over; discarding {shards} completed shard(s) in {partial} "
                  f"(--resume would have continued them)", file=sys.stderr)
        shutil.rmtree(partial)
        held.close()
    partial.mkdir(parents=True, exist_ok=True)
    return lock(partial)


def clear_except(folder: Path, keep):
    for p in folder.iterdir():
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


# ---------------------------------------------------------------- the pipeline

def gptq_precompute(model, plan, tokenizer, calibration_files, spill_dir, progress, fresh_weights) -> dict:
    """The GPTQ stage (jang.stream_gptq), with its own progress; name -> quantized part."""
    from .calibration import calibration_chunks
    from .stream_gptq import gptq_stage

    chunks = calibration_chunks(tokenizer, text_files=calibration_files)
    n = sum(t.quantized for t in plan)
    stage = Progress(progress, n, n, f"gptq layer by layer ({plan.profile})", unit="tensor")

    def step(path):
        stage.update(1, event="gptq", tensor=path)
        checkpoint()

    precomputed = gptq_stage(model, fresh_weights, plan, chunks, spill_dir, step)
    stage.close()
    return precomputed


def stream_convert(source, output, profile, *, method="rtn", group_size=64, force=False, resume=False,
                   progress=True, max_shard_bytes=MAX_SHARD_BYTES, source_label=None, calibration_files=None) -> dict:
    """Convert the float Hugging Face folder ``source`` into the JANG folder ``output``
    tensor by tensor (named profile; rtn, or gptq layer by layer for the model types in
    jang.stream_gptq.GPTQ_STREAM_TYPES). Returns jang_config."""
    source, output = Path(source), Path(output)
    config = mlx_utils.load_config(source)
    files = source_files(source)
    model = skeleton(config)
    weights, origin = lazy_weights(files)
    weights = sanitized_weights(model, weights, source)
    plan = plan_from_profile(model, profile, method, group_size)
    specs, quantized = output_specs(weights, plan)
    shards = layout(specs, max_shard_bytes)
    tokenizer = mlx_utils.load_tokenizer(source)

    partial = resumable_partial_name(output)
    held = open_partial(partial, resume)
    try:
        key = run_key(source, files, plan.profile, method, group_size, max_shard_bytes)
        key["calibration"] = [str(f) for f in calibration_files or []]
        journal = Journal(partial, key)
        done = journal.completed() if resume else {}
        done = {name: h for name, _ in shards if (h := done.get(name))}
        clear_except(partial, {LOCK_NAME, Journal.NAME, *done})
        journal.start(done, {name: (partial / name).stat().st_size for name in done})

        precomputed = {}
        if method == "gptq":
            precomputed = gptq_precompute(model, plan, tokenizer, calibration_files, partial / GPTQ_DIR, progress,
                                          lambda: sanitized_weights(skeleton(config), lazy_weights(files)[0], source))
        records = plan_records(plan)  # after the GPTQ stage: it notes tensors it leaves to mse
        bar = Progress(progress, sum(w.nbytes for w in weights.values()), len(weights),
                       f"converting {source.name} ({plan.profile}, {method})")
        produce = Producer(weights, quantized, bar, origin, precomputed)
        for name, shard_specs in shards:
            if name in done:
                bar.skip(sum(produce.source_bytes(s.name) for s in shard_specs),
                         sum(produce.source_bytes(s.name) > 0 for s in shard_specs))
                continue
            meta = shard_metadata(records, (s.name for s in shard_specs))
            digest = write_shard(partial / name, shard_specs, meta, produce)
            checkpoint()
            journal.add(name, (partial / name).stat().st_size, digest)
            checkpoint()
        bar.close(bytes_total=bar.total_bytes)

        write_index(partial, shards)
        del precomputed, produce
        shutil.rmtree(partial / GPTQ_DIR, ignore_errors=True)
        tokenizer.save_pretrained(str(partial))
        for name in COPIED_FILES:
            if (source / name).exists():
                shutil.copy(source / name, partial / name)
        summary = write_jang_config(partial, plan, source_label or source)
        checkpoint()
        write_config(partial, config, records)  # last: a folder without it is not a model
        checkpoint()
        (partial / Journal.NAME).unlink()
        (partial / LOCK_NAME).unlink()
        move_into_place(partial, output, force)
        checkpoint()
    except JangError as e:
        # A wrong weight or a bad setting fails again on resume: leave nothing. Write
        # errors (disk full) and interrupts keep the partial folder for --resume.
        if not isinstance(e, WriteError):
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        held.close()
    return summary

