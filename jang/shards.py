"""Writing safetensors shards one tensor at a time.

``mx.save_safetensors`` needs a whole shard (~5 GB) in memory and lays tensors out
in hash order. JANG knows every output tensor's name, dtype and shape before
computing any of them (from the plan), so it writes each shard's header first and
then streams the tensors in name order: memory holds one tensor, and the bytes
depend only on the tensors -- the in-memory ``jang.save`` and the streaming
``jang convert`` write identical files.

A shard is written as ``<name>.tmp``, fsynced and renamed, then recorded in the
journal (see ``Journal``), so a shard that the journal names is complete on disk.
"""

import errno
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Tuple

import mlx.core as mx
import numpy as np

from .errors import CorruptShardError, JangError, WriteError

SAFETENSORS_DTYPE = {
    mx.bool_: "BOOL", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16",
    mx.uint32: "U32", mx.int32: "I32", mx.uint64: "U64", mx.int64: "I64",
    mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32",
}


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor, known before it is computed."""
    name: str
    dtype: object  # mx.Dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.size
        for d in self.shape:
            n *= d
        return n


def layout(specs, max_bytes: int):
    """Group specs (sorted by name) into shards of at most max_bytes (a tensor larger
    than that gets a shard of its own); returns [(file name, [spec, ...])]."""
    shards, shard, size = [], [], 0
    for spec in sorted(specs, key=lambda s: s.name):
        if shard and size + spec.nbytes > max_bytes:
            shards.append(shard)
            shard, size = [], 0
        shard.append(spec)
        size += spec.nbytes
    if shard:
        shards.append(shard)
    n = len(shards)
    return [("model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors", s)
            for i, s in enumerate(shards, 1)]


def header_bytes(specs, metadata: dict) -> bytes:
    header, offset = {"__metadata__": metadata}, 0
    for s in specs:
        header[s.name] = {"dtype": SAFETENSORS_DTYPE[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the safetensors spec aligns tensor data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def array_bytes(a: mx.array) -> memoryview:
    """The row-major bytes of an evaluated array (numpy has no bfloat16: view it as uint16)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return memoryview(np.ascontiguousarray(np.asarray(a))).cast("B")


def write_shard(path: Path, specs, metadata: dict, produce: Callable[[str], mx.array]) -> str:
    """Write one shard, computing each tensor with produce(name) just before its bytes
    are written; returns the file's sha256. The file appears under its name only
    once complete and fsynced."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            def put(data):
                f.write(data)
                digest.update(data)

            put(header_bytes(specs, metadata))
            for s in specs:
                a = produce(s.name)
                mx.eval(a)
                if a.dtype != s.dtype or tuple(a.shape) != tuple(s.shape):
                    raise JangError(f"{path.name}: tensor {s.name} came out {a.dtype} {tuple(a.shape)}, "
                                    f"planned {s.dtype} {s.shape}.")
                put(array_bytes(a))
                del a
                mx.clear_cache()  # MLX keeps freed buffers for reuse; give them back
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        hint = "the disk is full; free space and rerun with --resume" if e.errno == errno.ENOSPC else e.strerror
        raise WriteError(f"{path}: writing failed ({hint}).") from None
    return digest.hexdigest()


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """``jang-journal.jsonl`` in the partial folder: the run's settings on the first
    line, then one line per completed shard {shard, bytes, sha256}, each fsynced.
    Resume trusts a shard only if the journal names it and its hash still matches."""

    NAME = "jang-journal.jsonl"

    def __init__(self, folder: Path, run_key: dict):
        self.path = Path(folder) / self.NAME
        self.run_key = run_key

    def completed(self) -> dict:
        """shard name -> sha256 of the shards a previous run finished; raises when that
        run used different settings or source files."""
        if not self.path.exists():
            return {}
        lines = self.path.read_text().splitlines()
        try:
            entries = [json.loads(line) for line in lines]
        except json.JSONDecodeError:  # a line torn by a crash mid-write: keep the whole ones
            entries = []
            for line in lines:
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    break
        if not entries or entries[0].get("run") != self.run_key:
            raise JangError(f"{self.path.parent}: this partial conversion was started with other settings or "
                            f"source files; rerun without --resume to start over.")
        done = {}
        for e in entries[1:]:
            f = self.path.parent / e["shard"]
            if f.exists() and f.stat().st_size == e["bytes"] and file_sha256(f) == e["sha256"]:
                done[e["shard"]] = e["sha256"]
        return done

    def start(self, done: dict, sizes: dict):
        """Rewrite the journal with the settings and the shards being kept."""
        lines = [{"run": self.run_key}] + [{"shard": s, "bytes": sizes[s], "sha256": h} for s, h in done.items()]
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def add(self, shard: str, nbytes: int, sha256: str):
        with open(self.path, "a") as f:
            f.write(json.dumps({"shard": shard, "bytes": nbytes, "sha256": sha256}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def write_index(folder, shards):
    weight_map = {s.name: name for name, specs in shards for s in specs}
    total = sum(s.nbytes for _, specs in shards for s in specs)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def check_readable(path) -> None:
    """Fail early, naming the file, on a source shard that cannot be opened."""
    from .format import read_safetensors_header

    try:
        read_safetensors_header(path)
    except OSError as e:
        raise CorruptShardError(f"{path}: cannot read ({e.strerror}).") from None
