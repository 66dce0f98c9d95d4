"""Score the generations stored in a ``jang bench quality`` report again with the current
degeneration checks (word salad included), without generating again: greedy output is
deterministic, so this is what a rerun would score. Rewrites the JSON in place; rebuild
the page with ``jang bench quality --merge FILE --name NAME``.

    python scripts/rescore_degeneration.py docs/quality-smollm2-135m.json
"""

import json
import sys
from pathlib import Path

from mlx_lm import utils as mlx_utils

from jang.coherence import SaladCheck
from jang.convert import resolve_source
from jang.evaluate import for_evaluation, scored_report


def rescore(report: dict, tokenizer, salad) -> dict:
    return scored_report([(o["prompt"], o["output"]) for o in report["outputs"]], tokenizer,
                         report["max_tokens"], salad)


def main(path):
    result = json.loads(Path(path).read_text())
    source = resolve_source(result["model"])
    tokenizer = mlx_utils.load_tokenizer(Path(source))
    salad = SaladCheck(for_evaluation(mlx_utils.load_model(Path(source))[0]), tokenizer)
    if result.get("reference_degeneration"):
        result["reference_degeneration"] = rescore(result["reference_degeneration"], tokenizer, salad)
    for row in result["rows"]:
        if "degeneration" in row:
            row["degeneration"] = rescore(row["degeneration"], tokenizer, salad)
    Path(path).write_text(json.dumps(result, indent=2))
    print(f"rescored {path} (salad threshold {salad.threshold:.2f} nats/token)")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        main(p)
