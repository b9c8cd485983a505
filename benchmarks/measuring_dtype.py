"""The measuring dtype on a CPU without bf16 instructions: one quantize run measured in BF16 against the
same run measured in float32 (pipeline/compute.py), side by side in one process, interleaved, median.

Both runs quantize the same BF16 weights to the same export; only the measuring forwards (probe, reload
check, validation) and the block driver's chains change dtype. The BF16 side is what a CPU with bf16
instructions would pick, forced here. Usage:

    .venv/bin/python benchmarks/measuring_dtype.py [--recipe tiny-e2b-w4a16] [--repeats 3] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import yaml

STAGES = ("quantize", "reload_check", "validate")


def one_run(recipe: Path, run_dir: Path, bf16: bool) -> dict:
    import pipeline.memory
    from pipeline.run import quantize_run

    pipeline.memory.cpu_computes_bf16 = lambda: bf16  # the measuring dtype a bf16 CPU would pick
    manifest = quantize_run(recipe, run_dir, card=False)
    quality = json.loads((run_dir / "eval.json").read_text())["quality"]
    return {"timings": manifest["timings_s"], "quality": quality}


def main() -> None:
    from pipeline.compute import cpu_computes_bf16
    from pipeline.recipe import RECIPES_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tiny-e2b-w4a16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if cpu_computes_bf16():
        raise SystemExit("this CPU has bf16 instructions: it measures in BF16 already; run this where it does not")
    work = Path(tempfile.mkdtemp(prefix="measuring-dtype-"))
    fields = yaml.safe_load((RECIPES_DIR / f"{args.recipe}.yaml").read_text())
    recipe = work / f"{args.recipe}.yaml"
    recipe.write_text(yaml.safe_dump({**fields, "name": args.recipe}))
    runs = {"bfloat16": [], "float32": []}
    for i in range(args.repeats):
        for dtype in runs:
            runs[dtype].append(one_run(recipe, work / f"{dtype}-{i}", bf16=dtype == "bfloat16"))

    def median(dtype: str, stage: str) -> float:
        return statistics.median(r["timings"].get(stage, 0.0) for r in runs[dtype])

    q = {dtype: runs[dtype][0]["quality"] for dtype in runs}
    lines = [f"## Measuring dtype: BF16 vs float32 on a CPU without bf16 instructions, `{args.recipe}`, "
             f"CPU (2 cores), median of {args.repeats}", "",
             "| stage | BF16 s | float32 s | BF16 / float32 |", "|---|---:|---:|---:|"]
    for stage in (*STAGES, "total"):
        if stage == "total":
            b, f = (statistics.median(sum(r["timings"].values()) for r in runs[d]) for d in runs)
        else:
            b, f = median("bfloat16", stage), median("float32", stage)
        lines.append(f"| {stage} | {b:.1f} | {f:.1f} | {b / f:.1f}× |" if f else f"| {stage} | {b:.1f} | {f:.1f} | |")
    lines += ["", "| measured in | KL mean | top-1 | PPL ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {d} | {q[d]['kl_mean']:.4f} | {q[d]['top1_agreement']:.4f} | {q[d]['ppl_ratio']:.4f} |" for d in q]
    lines += ["", f"Eval {q['float32']['samples']} × {q['float32']['seq_len']} tokens. The export is the same "
                  "in both (RTN); the quality figures differ by BF16 arithmetic only.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write("\n`benchmarks/measuring_dtype.py`\n\n" + text)


if __name__ == "__main__":
    main()
