"""Conversion progress: a tqdm bar for people, JSON lines on stderr for tools.

Both count bytes of *source* (float) weights processed, so GB/s and the ETA mean
the same thing whatever the output bits are.
"""

import json
import resource
import sys
import time

from tqdm.auto import tqdm

MODES = ("bar", "json", "none")


def peak_rss_mb() -> int:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def memory_fields() -> dict:
    """Peak RSS, current RSS (Linux) and MLX's own peak of array memory, in MB: MLX's
    CPU buffers show in the RSS, numpy's and the interpreter's only there."""
    fields = {"peak_rss_mb": peak_rss_mb()}
    try:
        with open("/proc/self/status") as f:
            fields["rss_mb"] = next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        pass
    mx = sys.modules.get("mlx.core")  # only if the conversion imported it: --help stays light
    if mx is not None:
        fields["mlx_peak_mb"] = mx.get_peak_memory() // 2**20
    return fields


class Progress:
    def __init__(self, mode, total_bytes: int, total_tensors: int, desc: str, unit: str = "B"):
        self.mode = {True: "bar", False: "none", None: "none"}.get(mode, mode)
        if self.mode not in MODES:
            raise ValueError(f"progress must be one of {MODES}, not {mode!r}")
        self.total_bytes, self.total_tensors = total_bytes, total_tensors
        self.bytes = self.tensors = 0
        self.start = time.monotonic()
        self.resumed_bytes = 0
        self.bar = None
        if self.mode == "bar":
            self.bar = tqdm(total=total_bytes, unit=unit, unit_scale=unit == "B", unit_divisor=1000, desc=desc,
                            smoothing=0.1)

    def skip(self, nbytes: int, tensors: int):
        """Work a resumed run finds already done: counted, but not in the rate."""
        self.resumed_bytes += nbytes
        self._advance(nbytes, tensors, event="resumed")

    def update(self, nbytes: int, tensors: int = 1, event: str = "tensor", **extra):
        self._advance(nbytes, tensors, event=event, **extra)

    def _advance(self, nbytes, tensors, event, **extra):
        self.bytes += nbytes
        self.tensors += tensors
        if self.bar is not None:
            if event == "resumed":
                self.bar.reset(total=self.total_bytes)
                self.bar.update(self.bytes)
                self.bar.start_t = time.time()
            else:
                self.bar.update(nbytes)
            self.bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)
        elif self.mode == "json":
            elapsed = time.monotonic() - self.start
            rate = (self.bytes - self.resumed_bytes) / elapsed if elapsed > 0 else 0.0
            left = self.total_bytes - self.bytes
            self.emit(event=event, **memory_fields(), tensors_done=self.tensors, tensors_total=self.total_tensors,
                      bytes_done=self.bytes, bytes_total=self.total_bytes, gb_per_s=round(rate / 1e9, 4),
                      eta_s=round(left / rate, 1) if rate > 0 else None, elapsed_s=round(elapsed, 2), **extra)

    def emit(self, **fields):
        if self.mode == "json":
            print(json.dumps(fields), file=sys.stderr, flush=True)

    def close(self, **fields):
        if self.bar is not None:
            self.bar.close()
        self.emit(event="done", elapsed_s=round(time.monotonic() - self.start, 2), **fields)
