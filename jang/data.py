"""Real English text for calibration and evaluation: Jane Austen's six novels.

Debian's ``r-cran-janeaustenr`` package carries them as R data; ``apt-get
download`` fetches the .deb without installing R, and the ``rdata`` package
reads the lazy-load database inside it.
"""

import os
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

from .errors import DownloadError
from .paths import cache_dir

BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
_DEB = "r-cran-janeaustenr"
_RDATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"


def _fetch_deb() -> Path:
    folder = cache_dir("data", "janeaustenr")
    if (folder / f"{_RDATA}.rdb").exists():
        return folder
    deb = os.environ.get("JANG_AUSTEN_DEB")
    with tempfile.TemporaryDirectory() as tmp:
        if not deb:
            done = subprocess.run(["apt-get", "download", _DEB], cwd=tmp, capture_output=True, text=True)
            debs = list(Path(tmp).glob("*.deb"))
            if done.returncode != 0 or not debs:
                raise DownloadError(
                    f"could not fetch Debian's {_DEB} with apt-get download ({done.stderr.strip()[-400:]}); "
                    "run 'apt-get update' first, or set JANG_AUSTEN_DEB to a downloaded .deb."
                )
            deb = debs[0]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(folder)], check=True)
    return folder


def _read_rdb(folder: Path) -> dict:
    import warnings

    import rdata

    base = folder / _RDATA
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_file(str(base) + ".rdx"))
    raw = (Path(str(base) + ".rdb")).read_bytes()
    books = {}
    for name, (offset, length) in index["variables"].items():
        blob = raw[int(offset): int(offset) + int(length)]
        struct.unpack(">I", blob[:4])  # uncompressed length; zlib checks the rest
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))
        books[str(name)] = "\n".join(str(line) for line in lines)
    return books


def austen(book: str) -> str:
    """The full text of one novel (see BOOKS)."""
    if book not in BOOKS:
        raise ValueError(f"unknown book {book!r}; choose from {', '.join(BOOKS)}")
    cached = cache_dir("data", "austen") / f"{book}.txt"
    if not cached.exists():
        for name, text in _read_rdb(_fetch_deb()).items():
            (cached.parent / f"{name}.txt").write_text(text)
    return cached.read_text()


def paragraphs(book: str, min_words: int = 40):
    """Paragraphs of prose (blank-line separated), skipping headings and short lines."""
    paras = [" ".join(p.split()) for p in austen(book).split("\n\n")]
    return [p for p in paras if len(p.split()) >= min_words]
