"""Learning-rate / batch sweep for jang.tune, scored as `jang bench quality` scores
(held-out Pride and Prejudice, KL to the float model, top-1).

Quantizes once (JANG mse at --bits, the bench's 32 calibration chunks), keeps the
result in a folder, then tunes a fresh load of it per setting:

    python scripts/tune_sweep.py --bits 2.5 --settings 20:1e-4:4 40:1e-4:2 40:3e-4:2 40:5e-5:2
    python scripts/tune_sweep.py --bits 2.5 --settings 40:1e-4:2 --chunks 80   # 80 distinct chunks

A setting is steps:lr:batch_size. --chunks other than 32 draws that many chunks from the
calibration novels (never the held-out ones).
"""

import argparse
import copy
import json
import tempfile
from pathlib import Path

from jang.bench import Bench, measured_avg_bits
from jang.calibration import calibration_chunks
from jang.convert import resolve_source, save
from jang.evaluate import for_evaluation
from jang.loader import load
from jang.quantize import quantize
from jang.tune import tune


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=float, default=2.5)
    ap.add_argument("--settings", nargs="+", default=["40:1e-4:2"])
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "jang-tune-sweep"))
    args = ap.parse_args()

    source = resolve_source(args.model)
    bench = Bench(source, args.eval_tokens, calibration_chunks_n=32)
    folder = Path(args.work) / f"{Path(str(args.model)).stem}-{args.bits:g}-mse"
    if not folder.exists():
        model, config = bench.fresh()
        quantize(model, bits=args.bits, method="mse", tokenizer=bench.tokenizer, calibration=bench.calibration,
                 source=source, progress=False)
        save(model, bench.tokenizer, folder, config)
    chunks = bench.calibration if args.chunks == 32 else calibration_chunks(bench.tokenizer, n_chunks=args.chunks)
    teacher = for_evaluation(bench.fresh()[0])
    model, _ = load(str(folder))
    print(json.dumps({"setting": "untuned", "bits": measured_avg_bits(model), **bench.score(model)}), flush=True)
    for setting in args.settings:
        steps, lr, batch = setting.split(":")
        model, _ = load(str(folder))
        stats = tune(model, teacher, chunks, steps=int(steps), lr=float(lr), batch_size=int(batch), progress=False)
        print(json.dumps({"setting": setting, "chunks": args.chunks, **bench.score(copy.deepcopy(model)),
                          "tuning": stats}), flush=True)


if __name__ == "__main__":
    main()
