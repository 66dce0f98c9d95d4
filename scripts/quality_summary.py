"""The summary tables docs/quality.md shows for one model, printed as markdown from the
JSON `jang bench quality` wrote (so the numbers there are copied, never typed):

    python scripts/quality_summary.py docs/quality-smollm2-135m.json
"""

import json
import sys

TARGET = 0.6  # issue 3's acceptance: JANG KL at most 0.6x each mlx-lm option's at the same size


def gb(x):
    return "n/a" if x is None else f"{x:.2f} GB"


def summary(result: dict) -> str:
    out = ["| mlx-lm option | bits | mlx-lm KL | JANG KL | JANG / mlx-lm | ≤ 0.6x |",
           "| --- | ---: | ---: | ---: | ---: | :---: |"]
    for m in result["matched"]:
        out.append(f"| {m['mlx'][7:]} | {m['bits']:.3f} | {m['mlx_kl']:.3f} | {m['jang_kl']:.3f} | "
                   f"{m['ratio']:.2f}x | {'yes' if m['ratio'] <= TARGET else '**no**'} |")
    costly = [r for r in result["rows"] if r["family"] == "jang" and "--bits" in r["name"]
              or r["family"] == "mlx-lm" and r["method"].startswith(("dynamic", "gptq", "awq"))]
    if costly:
        out += ["", "| quantizer | avg bits | KL | quantize time | MLX peak | RSS peak Δ |",
                "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in costly:
            out.append(f"| {r['name']} | {r['avg_bits']:.3f} | {r['kl']:.3f} | {r['seconds']:.0f} s | "
                       f"{gb(r['mlx_peak_gb'])} | {gb(r['rss_peak_gb'])} |")
    if result.get("sensitivity"):
        s = result["sensitivity"]
        out += ["", f"Sensitivity table (once per model): {s['seconds']:.0f} s, MLX peak {gb(s['mlx_peak_gb'])}, "
                    f"RSS peak Δ {gb(s['rss_peak_gb'])}."]
    if result.get("degeneration"):
        ref = result.get("reference_degeneration")
        out += ["", "| mlx-lm option | bits | mlx-lm flagged | mlx-lm score | JANG flagged | JANG score |",
                "| --- | ---: | ---: | ---: | ---: | ---: |"]
        if ref:
            out.append(f"| (float reference) | 16 | {ref['fraction']:.0%} | {ref['mean_score']:.2f} | | |")
        for p in result["degeneration"]:
            out.append(f"| {p['mlx'][7:]} | {p['bits']:.3f} | {p['mlx_fraction']:.0%} | {p['mlx_score']:.2f} | "
                       f"{p['jang_fraction']:.0%} | {p['jang_score']:.2f} |")
    for s in result.get("skipped", []):
        out += ["", f"Not run: {s['name']} — {s['reason']}"]
    return "\n".join(out)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(summary(json.loads(open(path).read())))
