"""Converting a model larger than memory: JANG's streaming convert vs mlx_lm.convert.

    python scripts/make_big_llama.py /tmp/scale/big-llama --layers 17     # ~30 GB of bf16
    python scripts/scale_bench.py /tmp/scale/big-llama --work /tmp/scale  # writes docs/scale.md

Each conversion runs in its own process; a watchdog samples the resident memory of
that process tree every 0.2 s and kills it (SIGKILL) past --kill-gib, so a
converter that would exhaust memory is stopped before the kernel's OOM killer
picks a victim. Peak RSS is the watchdog's maximum (and, for a process that ends
normally, getrusage's ru_maxrss of the children). Not run in CI: it needs ~45 GB of disk.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(pid: int) -> int:
    """Resident bytes of pid and its descendants (from /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def run_watched(cmd, kill_bytes: int, log: Path, env=None) -> dict:
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        peak, killed = 0, False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # this child's own rusage
            if pid:
                break
            rss = tree_rss(proc.pid)
            peak = max(peak, rss)
            if rss > kill_bytes and not killed:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.2)
    wall = time.monotonic() - start
    code = os.waitstatus_to_exitcode(status)
    return {"cmd": " ".join(map(str, cmd)), "returncode": code, "killed_at_limit": killed,
            "peak_rss_bytes": max(peak, usage.ru_maxrss * 1024), "watchdog_peak_bytes": peak,
            "ru_maxrss_bytes": usage.ru_maxrss * 1024,
            "wall_s": round(wall, 1), "log_tail": log.read_text()[-1500:]}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("model*.safetensors"))


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), {mem / 2**30:.1f} GiB RAM, no swap"


def gib(n):
    return f"{n / 2**30:.2f} GiB"


def report(results: dict, path: Path):
    src = results["source_bytes"]
    j, m = results["jang"], results.get("mlx_lm")
    lines = [
        "# Converting models larger than memory",
        "",
        f"Machine: {results['machine']}. Source: {results['source']} — a Llama-shaped model "
        f"(hidden 8192, intermediate 28672, 64/8 heads, {results['layers']} layers) with random bf16 weights, "
        f"{src / 1e9:.1f} GB ({gib(src)}) on disk, more than this machine's memory. Written by "
        "`scripts/make_big_llama.py`; measured by `scripts/scale_bench.py` (a watchdog samples the process "
        "tree's resident memory every 0.2 s and SIGKILLs it past the limit).",
        "",
        "| converter | result | peak RSS | wall time | source GB/s |",
        "| --- | --- | --- | --- | --- |",
        f"| `jang convert --profile JANG_4M` (rtn, streaming) | {'completed' if j['returncode'] == 0 else 'FAILED'}, "
        f"{j.get('output_bytes', 0) / 1e9:.2f} GB written | {gib(j['peak_rss_bytes'])} | {j['wall_s']:.0f} s | "
        f"{src / 1e9 / j['wall_s']:.3f} |",
    ]
    if m:
        outcome = (f"killed by the watchdog at {gib(results['kill_bytes'])} RSS" if m["killed_at_limit"]
                   else "completed" if m["returncode"] == 0 else f"exited {m['returncode']}")
        lines.append(f"| `mlx_lm.convert -q --q-bits 4` | {outcome} | {gib(m['peak_rss_bytes'])} | {m['wall_s']:.0f} s | "
                     f"{'—' if m['returncode'] else format(src / 1e9 / m['wall_s'], '.3f')} |")
    lines += ["", "Largest single source tensor: "
              f"{results['largest_tensor_bytes'] / 1e6:.0f} MB (an MLP projection, 28672 x 8192 bf16).", ""]
    lines += results.get("notes", [])
    path.write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/scale"))
    ap.add_argument("--kill-gib", type=float, default=20.0)
    ap.add_argument("--skip-mlx-lm", action="store_true")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kill = int(args.kill_gib * 2**30)
    config = json.loads((args.source / "config.json").read_text())
    header_sizes = json.loads((args.source / "model.safetensors.index.json").read_text())
    from jang.format import read_folder

    _, tensors = read_folder(args.source)
    results = {"machine": machine(), "source": str(args.source), "layers": config["num_hidden_layers"],
               "source_bytes": header_sizes["metadata"]["total_size"], "kill_bytes": kill,
               "largest_tensor_bytes": max(t["nbytes"] for t in tensors.values())}

    out = args.work / "big-llama-JANG_4M"
    shutil.rmtree(out, ignore_errors=True)
    results["jang"] = run_watched([sys.executable, "-m", "jang", "convert", "--model", str(args.source), "-o", str(out),
                                   "--profile", "JANG_4M", "--progress", "json"], kill, args.work / "jang.log", env)
    if out.exists():
        results["jang"]["output_bytes"] = folder_bytes(out)
    print(json.dumps(results["jang"], indent=1)[:800], flush=True)
    shutil.rmtree(out, ignore_errors=True)

    if not args.skip_mlx_lm:
        out = args.work / "big-llama-mlx-4bit"
        shutil.rmtree(out, ignore_errors=True)
        results["mlx_lm"] = run_watched([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(args.source),
                                         "--mlx-path", str(out), "-q", "--q-bits", "4"], kill,
                                        args.work / "mlx_lm.log", env)
        print(json.dumps(results["mlx_lm"], indent=1)[:800], flush=True)
        shutil.rmtree(out, ignore_errors=True)

    (args.docs / "scale.json").write_text(json.dumps(results, indent=1))
    report(results, args.docs / "scale.md")
    print(f"wrote {args.docs / 'scale.md'}")


if __name__ == "__main__":
    main()
