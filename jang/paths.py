"""Where JANG keeps downloads and imports, and how it writes folders safely."""

import contextlib
import os
import shutil
from pathlib import Path


def cache_dir(*parts) -> Path:
    """$JANG_CACHE, else ~/.cache/jang; never inside the repository."""
    root = Path(os.environ.get("JANG_CACHE") or Path.home() / ".cache" / "jang")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def partial_name(target: Path) -> Path:
    return target.parent / f".{target.name}.jang-partial-{os.getpid()}"


def resumable_partial_name(target: Path) -> Path:
    """The same name on every run, so ``--resume`` finds what a killed run left."""
    return target.parent / f".{target.name}.jang-partial"


def move_into_place(tmp: Path, target: Path, force: bool):
    """fsync tmp and rename it to target (replacing it only with force)."""
    fsync_tree(tmp)
    if target.exists():
        if not force:
            raise FileExistsError(f"{target} appeared while this conversion was writing; not replacing it.")
        old = target.parent / f".{target.name}.jang-old-{os.getpid()}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    fd = os.open(target.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(target, force: bool = False):
    """Yield a temporary folder beside ``target``; rename it into place only when
    the block completes. On error the temporary folder is removed; a killed
    process leaves only a hidden ``.<name>.jang-partial-<pid>`` folder, never
    ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        move_into_place(tmp, target, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_tree(folder):
    """Flush a written folder to disk before it is renamed into place."""
    for root, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
