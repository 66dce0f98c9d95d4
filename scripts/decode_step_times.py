"""Wall time of each decoded token, one at a time (evaluated before the next is built),
across the KV cache's buffer growth, on a random-weight model of a real shape. With the
whole decode step compiled (route decode_step), a token past the buffers' size grows
them inside the step, which is traced again for the new size (session 11: the chain ran
that token instead): this shows what those tokens cost against the median one.
Usage: decode_step_times.py [out.json] [model name] [new tokens] [config]"""

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from jang import bench_kernels as bk  # noqa: E402
from jang import kernels  # noqa: E402
from jang.layers import adopt_all  # noqa: E402


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] else None
    name = sys.argv[2] if len(sys.argv) > 2 else "llama-3-8b"
    tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 600
    ops = [op for op in (sys.argv[4] if len(sys.argv) > 4 else "").split(",") if op]
    with kernels.enabled(ops):
        model = bk.random_llama(name, 4)
        adopt_all(model)
        cache = make_prompt_cache(model)
        y = mx.argmax(model(mx.random.randint(0, 1000, (1, 200)), cache=cache)[:, -1], axis=-1)
        mx.eval(y)
        rows = []
        for _ in range(tokens):
            size = cache[0].keys.shape[2]
            t0 = time.perf_counter()
            y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
            mx.eval(y)
            rows.append({"offset": cache[0].offset - 1, "ms": 1e3 * (time.perf_counter() - t0),
                         "grew": cache[0].keys.shape[2] != size})
    median = statistics.median(r["ms"] for r in rows)
    around = [r for i, r in enumerate(rows) if r["grew"] or (i and rows[i - 1]["grew"]) or i < 2]
    result = {"model": name, "config": ",".join(ops) or "default", "median_ms": median, "tokens": tokens,
              "first_tokens_and_growth": around}
    print(json.dumps(result, indent=1))
    if out:
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
