"""Quality per bit on real weights: our passes against the libraries' own loops at the same budget.

Gemma 3 270M, W4A16 symmetric, every model in float32, the same calibration windows for every calibrated
pass (the harness: benchmarks/parity.py).

    python benchmarks/quality_per_bit.py [--samples 64] [--seq-len 512] [--eval 16] [--group-size 128]
        [--only "gptq|opt-rtn"]

Prints one JSON line per pass and appends it to --out (the tables in README.md come from it).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import parity  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval", type=int, default=16, help=f"held-out windows of {parity.EVAL_LEN} tokens")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--autoround-iters", type=int, default=20)
    parser.add_argument("--autoround-batch", type=int, default=8)
    parser.add_argument("--only", default="", help="substrings of the pass names to run, separated by |")
    parser.add_argument("--out", type=Path, default=Path("quality-per-bit.jsonl"))
    args = parser.parse_args()

    bench = parity.setup({"samples": args.samples, "seq_len": args.seq_len}, args.eval,
                         Path(tempfile.mkdtemp(prefix="quality-per-bit-")), args.group_size)
    tuned = {"iters": args.autoround_iters, "batch_size": args.autoround_batch}
    budget = f"{tuned['iters']} iters, batch {tuned['batch_size']}"
    passes = {
        "rtn (min/max)": lambda: parity.rtn(bench),
        "calibration-free scale search (weight MSE, no importance)": lambda: parity.calibration_free_search(bench),
        "auto-round's own optimized RTN (iters=0)": lambda: parity.auto_round(bench, iters=0),
        "ours opt-rtn": lambda: parity.ours(bench, "opt-rtn"),
        "llmcompressor's own GPTQ oneshot": lambda: parity.llmcompressor_gptq(bench),
        "ours gptq (min/max grid)": lambda: parity.ours(bench, "gptq", gptq={"grid": "minmax", "actorder": None}),
        "ours gptq (min/max grid, actorder static)": lambda: parity.ours(bench, "gptq", gptq={"grid": "minmax"}),
        "ours gptq (imatrix grid)": lambda: parity.ours(bench, "gptq", gptq={"actorder": None}),
        "ours gptq (imatrix grid, actorder static)": lambda: parity.ours(bench, "gptq"),
        f"auto-round's own tuned loop ({budget})": lambda: parity.auto_round(bench, **tuned),
        f"ours autoround ({budget})": lambda: parity.ours(bench, "autoround", autoround=tuned),
    }
    wanted = [w for w in args.only.split("|") if w]
    for name, quantize in passes.items():
        if wanted and not any(w in name for w in wanted):
            continue
        start = time.perf_counter()
        model = quantize()
        row = {"pass": name, "seconds": round(time.perf_counter() - start, 1), **parity.measure(bench, model),
               "group_size": args.group_size, "calibration": f"{args.samples}x{args.seq_len}",
               "eval_tokens": args.eval * parity.EVAL_LEN}
        print(json.dumps(row), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        del model
        gc.collect()


if __name__ == "__main__":
    main()
