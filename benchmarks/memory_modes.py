"""Wall time and peak memory of all-at-once vs sequential (layer-by-layer) runs, measured in one run.

Every pass runs in its own subprocess, so peak host RSS (`ru_maxrss`; torch's CPU tensors are invisible
to tracemalloc) and, with a GPU, `torch.cuda.max_memory_allocated` belong to that pass alone:

- RTN W8A16 and RTN W4A16 (llmcompressor): gemma-quant all-at-once; gemma-quant sequential (a host budget
  between the two modes' needs, so the memory plan picks disk offload); and the raw llmcompressor call
  (load, oneshot, save_pretrained) beside them, so our overhead is a ratio.
- AutoRound W4A16 (the block driver): all-at-once; its sequential mode is GPU layer onloading, so on a
  CPU-only machine there is nothing to compare it with.

Models: on CPU a tiny 31B-shaped Gemma 4 widened (`--hidden`) so the model stands above the libraries'
own memory. With a GPU, `--full e2b 31b` builds full-size random-weight sources from the bundled configs
(meta device, then materialized) and runs the same passes with a GPU budget that forces layer onloading.

The memory plan against measured peaks (`--calibrated [RECIPE ...]`): the shipped calibrated 270M recipes on
real weights, each quantize stage in its own process, peak RSS and sampled peak anonymous RSS against the
plan's host need.

    .venv/bin/python benchmarks/memory_modes.py [--hidden 1536] [--full e2b 31b] [--out benchmarks/RESULTS.md]
    .venv/bin/python benchmarks/memory_modes.py --calibrated [gemma3-270m-w4a16-autoround]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent("""
    import json, sys, time
    def peak_rss():
        # VmHWM: this process image's peak RSS. ru_maxrss would not do: Linux carries it over fork and
        # exec, so a child of a big parent reports the parent's peak.
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    def status(field):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))
    def rss():
        return status("VmRSS:")
    import threading
    anonymous = [0]  # peak anonymous RSS, sampled: the mmapped weight files are file-backed pages, reclaimable
    def sample():
        while True:
            anonymous[0] = max(anonymous[0], status("RssAnon:"))
            time.sleep(0.05)
    threading.Thread(target=sample, daemon=True).start()
    import torch, transformers, llmcompressor, auto_round  # the libraries' own resident size, before any model
    kind, recipe, budget = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    libraries, libraries_anonymous, planned = rss(), status("RssAnon:"), None
    start = time.perf_counter()
    if kind == "ours":
        from pipeline.recipe import MemorySpec
        from pipeline.run import quantize_run
        manifest = quantize_run(recipe, validate=False, card=False, reload_check=False,
                                memory=MemorySpec(**budget))
        mode, planned = manifest.memory.mode, manifest.memory.needs
    else:  # the raw library call a publisher would write, with the same scheme and ignore list
        sys.path.insert(0, "benchmarks")
        from memory_modes import raw_llmcompressor
        mode = raw_llmcompressor(recipe)
    print(json.dumps({"mode": mode, "seconds": time.perf_counter() - start,
                      "peak_rss": peak_rss(), "libraries_rss": libraries, "planned": planned,
                      "peak_anonymous": anonymous[0], "libraries_anonymous": libraries_anonymous,
                      "peak_gpu": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}))
""")


def raw_llmcompressor(recipe_path: str) -> str:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from pipeline.model import model_class
    from pipeline.quantize.llmcompressor_backend import quantization_scheme
    from pipeline.run import load_recipe, make_plan

    recipe = load_recipe(recipe_path)
    source, config, plan = make_plan(recipe, recipe_path)
    model = model_class(config).from_pretrained(source.ref, dtype=torch.bfloat16)
    modifier = QuantizationModifier(config_groups={"group_0": quantization_scheme(recipe)}, ignore=plan.ignore)
    oneshot(model=model, recipe=[modifier], log_dir=None)
    model.save_pretrained(Path(recipe.run_dir) / "raw-export", save_compressed=True)
    return "all-at-once"


def measure(kind: str, recipe: Path, budget: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, kind, str(recipe), json.dumps(budget)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{kind} {recipe.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def random_source(variant: str, dest: Path, hidden: int | None) -> Path:
    """A tiny widened source (`hidden`), or a full-size one (hidden None) built on the meta device and
    materialized with the model's own random init."""
    from pipeline.tiny import build_tiny_source

    if hidden is not None:
        return build_tiny_source(variant, dest, text_hidden=hidden)
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from pipeline.tiny import full_config

    config = AutoConfig.for_model(**full_config(variant))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    model.init_weights()
    model.save_pretrained(dest)
    return dest


def needs(recipe: Path) -> dict:
    from pipeline.memory import plan_memory
    from pipeline.run import load_recipe, make_plan

    loaded = load_recipe(recipe)
    _, config, plan = make_plan(loaded, recipe)
    return plan_memory(plan, loaded, config.get_text_config(), 2**62, [], {"cpu": "-", "gpu": "-"}).model_dump()


def bench_model(label: str, source: Path, work: Path, on_gpu: bool, only: list[str]) -> list[str]:
    rows, slug = [], source.name.lower()
    passes = {"RTN W8A16": "scheme: W8A16\n", "RTN W4A16": "scheme: W4A16\ngroup_size: 128\n",
              "AutoRound W4A16": "scheme: W4A16\ngroup_size: 128\nalgorithm: autoround\n"
                                 "autoround: {iters: 20, batch_size: 4}\n"
                                 "calibration: {samples: 8, seq_len: 128}\n"}
    for name, body in passes.items():
        if only and name.replace(" ", "-").lower() not in only:
            continue
        recipes = {}
        for mode in ("all", "seq", "raw"):
            recipes[mode] = work / f"{slug}-{name.replace(' ', '-').lower()}-{mode}.yaml"
            recipes[mode].write_text(f"model: {source}\n{body}output_dir: {work / recipes[mode].stem}\n")
        plan = needs(recipes["all"])
        found = {"all": measure("ours", recipes["all"], {})}
        if on_gpu:  # a GPU budget of about one layer forces layer-by-layer onloading
            seq_budget = {"max_gpu_memory": plan["needs"]["sequential_host"] + plan["largest_layer_bytes"]}
        else:
            seq_budget = {"max_cpu_memory": (plan["needs"]["sequential_host"] + plan["needs"]["all_at_once_host"]) // 2}
        if "RTN" in name or on_gpu:
            found["seq"] = measure("ours", recipes["seq"], seq_budget)
        if "RTN" in name:
            found["raw"] = measure("raw", recipes["raw"], {})
        base = found["all"]
        for mode, title in (("raw", "raw llmcompressor (load, oneshot, save)"), ("all", "gemma-quant all-at-once"),
                            ("seq", "gemma-quant sequential")):
            if mode not in found:
                continue
            r = found[mode]
            gpu = f"{r['peak_gpu'] / 2**30:.2f}" if r["peak_gpu"] is not None else "-"
            rows.append(f"| {label} | {name} | {title} ({r['mode']}) | {r['seconds']:.1f} | "
                        f"{r['seconds'] / base['seconds']:.2f} | {r['peak_rss'] / 2**20:.0f} | "
                        f"{r['peak_rss'] / base['peak_rss']:.2f} | {gpu} |")
        if "seq" not in found:
            rows.append(f"| {label} | {name} | gemma-quant sequential | n/a on CPU: the block driver's sequential "
                        f"mode onloads layers to a GPU | | | | |")
    return rows


CALIBRATED_270M = ("gemma3-270m-w4a16-gptq", "gemma3-270m-w4a16-opt-rtn", "gemma3-270m-w4a16-autoround")


def calibrated_passes(work: Path, names) -> list[str]:
    """The memory plan's host need for each shipped calibrated 270M recipe (real weights) against the peak
    RSS its quantize stage measures, less what the libraries hold resident before any model loads (the plan
    counts the run's own bytes: weights, export, calibration state, solver and activations)."""
    rows = []
    for name in names:
        recipe = work / f"{name}.yaml"
        recipe.write_text((ROOT / "recipes" / f"{name}.yaml").read_text() + f"\noutput_dir: {work / name}\n")
        r = measure("ours", recipe, {})
        planned = r["planned"]["all_at_once_host"]
        run, anonymous = r["peak_rss"] - r["libraries_rss"], r["peak_anonymous"] - r["libraries_anonymous"]
        rows.append(f"| {name} | {r['seconds']:.0f} | {planned / 2**20:.0f} | {r['peak_rss'] / 2**20:.0f} | "
                    f"{r['libraries_rss'] / 2**20:.0f} | {run / 2**20:.0f} ({run / planned:.2f}×) | "
                    f"{anonymous / 2**20:.0f} ({anonymous / planned:.2f}×) |")
    return rows


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1536, help="text hidden size of the widened tiny 31B")
    parser.add_argument("--full", nargs="*", default=[], help="full-size variants (GPU machine): e2b 31b")
    parser.add_argument("--passes", nargs="*", default=[],
                        help="subset to run: rtn-w8a16 rtn-w4a16 autoround-w4a16 (default: all)")
    parser.add_argument("--calibrated", nargs="*", default=None, metavar="RECIPE",
                        help="instead: the memory plan against measured peaks, shipped calibrated 270M recipes "
                             f"(default: {' '.join(CALIBRATED_270M)})")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    if args.calibrated is not None:
        lines = [f"## The memory plan against measured peaks: calibrated passes, Gemma 3 270M, CPU ({os.cpu_count()} "
                 "cores), one run", "",
                 "| recipe | seconds | plan: host need MiB | peak RSS MiB | libraries resident MiB | "
                 "peak − libraries MiB (× plan) | anonymous peak − libraries' MiB (× plan) |",
                 "|---|---:|---:|---:|---:|---:|---:|", *calibrated_passes(work, args.calibrated or CALIBRATED_270M), ""]
        return _report(lines, args.out)
    rows = []
    source = random_source("31b", work / "wide-31b", args.hidden)
    bf16 = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    rows += bench_model(f"tiny 31B, hidden {args.hidden} ({bf16 / 2**20:.0f} MiB)", source, work, on_gpu, args.passes)
    for variant in args.full:
        rows += bench_model(f"full {variant}, random", random_source(variant, work / f"full-{variant}", None), work,
                            on_gpu, args.passes)
    device = torch.cuda.get_device_name(0) if on_gpu else f"CPU ({os.cpu_count()} cores)"
    lines = [f"## Memory modes: all-at-once vs sequential, {device}, one run", "",
             "| model | pass | path (mode) | seconds | × all-at-once | peak RSS MiB | × all-at-once | peak GPU GiB |",
             "|---|---|---|---:|---:|---:|---:|---:|", *rows, ""]
    _report(lines, args.out)


def _report(lines: list[str], out: Path | None) -> None:
    print("\n".join(lines))
    if out:
        text = out.read_text() if out.exists() else "# Benchmarks\n"
        out.write_text(text.rstrip("\n") + "\n\n`benchmarks/memory_modes.py`\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
