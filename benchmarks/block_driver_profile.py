"""Where a calibrated pass spends its time: our block driver beside the library's own loop.

Gemma 3 270M, W4A16 g128, float32, the same calibration windows for both (the harness:
benchmarks/parity.py). Ours: each stage of the block driver timed where it is called. The library's:
its loop under cProfile, the cumulative time of the functions that do the same work (the decoder
layer's forward, the Hessian, the solver, the scale search, the backward pass). The profiler slows
Python-heavy code more than the rest: read the shares, and take wall-time ratios from
benchmarks/quality_per_bit.py, which runs without it.

    python benchmarks/block_driver_profile.py [--samples 32] [--seq-len 256] [--only "gptq|autoround"]

Prints one JSON line per pass: total seconds and seconds per stage.
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import functools
import inspect
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import parity  # noqa: E402

# Our stages: (module, function) timed where the driver calls them; the solver's own time is what is
# left of it once the scale search and the GPTQ solve inside it are taken out.
OURS = [("pipeline.quantize.blockwise", f) for f in (
    "record_inputs", "rtn_error", "input_statistics", "searched_qparams", "chain_error", "save_checkpoint")]
OURS.append(("llmcompressor.modifiers.gptq.gptq_quantize", "quantize_weight"))
INSIDE_SOLVERS = ("searched_qparams", "quantize_weight", "input_statistics")



def _library_stages() -> dict[str, object]:
    """The library's stages: functions whose cumulative time under cProfile is the stage's."""
    import torch
    from auto_round.algorithms.quantization.sign_round.sign_sgd import SignSGD
    from auto_round.data_type.int import search_scales
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian
    from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer

    # the layer forwards include what the library's hooks do inside them (GPTQ's Hessian accumulation)
    return {"decoder layer forwards": Gemma3DecoderLayer.forward, "Hessian accumulation": accumulate_hessian,
            "GPTQ solve": quantize_weight, "scale search": search_scales, "backward": torch.Tensor.backward,
            "optimizer step": SignSGD.step}


def _timed(times: collections.Counter, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[name] += time.perf_counter() - start
    return wrapper


def profile_ours(bench, algorithm: str, options: dict) -> dict[str, float]:
    import importlib

    from pipeline.quantize import blockwise

    times: collections.Counter = collections.Counter()
    originals = []
    for module_name, name in OURS:
        module = importlib.import_module(module_name)
        originals.append((module, name, getattr(module, name)))
        setattr(module, name, _timed(times, name, getattr(module, name)))
    advance = blockwise.advance

    def timed_advance(layer, index, cal, chain):
        start = time.perf_counter()
        advance(layer, index, cal, chain)
        times[f"{chain} chain forwards"] += time.perf_counter() - start

    solver = blockwise.BLOCK_SOLVERS[algorithm]
    originals += [(blockwise, "advance", advance)]
    blockwise.advance = timed_advance
    blockwise.BLOCK_SOLVERS[algorithm] = _timed(times, "solver", solver)
    start = time.perf_counter()
    try:
        parity.ours(bench, algorithm, **options)
    finally:
        blockwise.BLOCK_SOLVERS[algorithm] = solver
        for module, name, fn in originals:
            setattr(module, name, fn)
    total = time.perf_counter() - start
    times["solver"] -= sum(times[name] for name in INSIDE_SOLVERS)
    times["other"] = total - sum(times.values())
    return {"total": total, **{k: v for k, v in times.items() if v}}


def profile_library(run) -> dict[str, float]:
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    run()
    profiler.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats
    stages = collections.Counter()
    for stage, function in _library_stages().items():
        code = inspect.unwrap(function).__code__
        found = stats.get((code.co_filename, code.co_firstlineno, code.co_name))
        if found:
            stages[stage] = found[3]  # cumulative seconds
    stages["other (incl. profiler overhead)"] = max(0.0, total - sum(v for k, v in stages.items()
                                                                     if k != "Hessian accumulation"))
    return {"total": total, **{k: v for k, v in stages.items() if v}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--only", default="", help="substrings of the pass names to run, separated by |")
    parser.add_argument("--out", type=Path, default=Path("block-driver-profile.jsonl"))
    args = parser.parse_args()
    bench = parity.setup({"samples": args.samples, "seq_len": args.seq_len}, 1,
                         Path(tempfile.mkdtemp(prefix="block-driver-profile-")))
    tuned = {"iters": 20, "batch_size": 8}
    passes = {
        "ours gptq (imatrix grid, actorder static)": lambda: profile_ours(bench, "gptq", {}),
        "ours gptq (min/max grid, actorder static)": lambda: profile_ours(bench, "gptq", {"gptq": {"grid": "minmax"}}),
        "llmcompressor's own GPTQ oneshot": lambda: profile_library(lambda: parity.llmcompressor_gptq(bench)),
        "ours opt-rtn": lambda: profile_ours(bench, "opt-rtn", {}),
        "auto-round's own optimized RTN (iters=0)": lambda: profile_library(lambda: parity.auto_round(bench, iters=0)),
        "ours autoround (20 iters, batch 8)": lambda: profile_ours(bench, "autoround", {"autoround": tuned}),
        "auto-round's own tuned loop (20 iters, batch 8)": lambda: profile_library(lambda: parity.auto_round(bench, **tuned)),
    }
    wanted = [w for w in args.only.split("|") if w]
    for name, run in passes.items():
        if wanted and not any(w in name for w in wanted):
            continue
        row = {"pass": name, "calibration": f"{args.samples}x{args.seq_len}",
               **{k: round(v, 1) for k, v in run().items()}}
        print(json.dumps(row), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
