"""Our passes against the libraries' own loops on the same model and windows: the harness that
benchmarks/quality_per_bit.py and tests/test_parity_270m.py share.

Gemma 3 270M from the PyPI GGUF, W4A16 symmetric, every model in float32 (the figure is the quantization
error, not bf16 arithmetic); the same calibration windows (`pipeline.calibration.build`, built-in mixture)
for every calibrated pass; KL, top-1 and PPL ratio against the float32 source on the built-in held-out
text. The reference log-probs go to disk in float16 (16 x 512 x 262k in float32 would be 8.6 GB).
Each pass returns a plain float32 model with the weights it chose, whatever the library left behind.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

EVAL_LEN = 512


@dataclass
class Bench:
    source_model: torch.nn.Module
    plan: object
    tokenizer: object
    windows: torch.Tensor
    calibration: torch.Tensor
    calibration_spec: dict
    group_size: int
    scratch: Path
    reference_ppl: float


def _recipe(calibration: dict, group_size: int, **fields):
    from pipeline.recipe import parse_recipe

    return parse_recipe({"name": "t", "model": "gguf:gemma3-270m", "scheme": "W4A16", "group_size": group_size,
                         "calibration": calibration, **fields})


@torch.no_grad()
def _log_probs(model, window: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=window[None]).logits.float(), -1)[0]


def setup(calibration: dict, eval_windows: int, scratch: Path, group_size: int = 128) -> Bench:
    from transformers import AutoTokenizer

    from pipeline.calibration import build
    from pipeline.corpus import load_texts, token_windows
    from pipeline.model import load_model
    from pipeline.run import make_plan

    recipe = _recipe(calibration, group_size)
    source, config, plan = make_plan(recipe, "parity.yaml")
    tokenizer = AutoTokenizer.from_pretrained(source.ref)
    model = load_model(source, config, dtype=torch.float32).eval()
    windows = token_windows(tokenizer, load_texts("builtin", "eval"), eval_windows, EVAL_LEN)
    calibration_ids, _ = build(recipe.calibration, tokenizer)
    nll = []
    for i, window in enumerate(windows):
        ref = _log_probs(model, window)
        torch.save(ref.half(), scratch / f"{i}.pt")
        nll.append(-ref[:-1].gather(-1, window[1:, None]).flatten())
    return Bench(model, plan, tokenizer, windows, calibration_ids, calibration, group_size, scratch,
                 torch.cat(nll).mean().exp().item())


@torch.no_grad()
def measure(bench: Bench, model) -> dict[str, float]:
    kls, agree, nll = [], [], []
    for i, window in enumerate(bench.windows):
        ref, got = torch.load(bench.scratch / f"{i}.pt").float(), _log_probs(model, window)
        kls.append((ref.exp() * (ref - got)).sum(-1))
        agree.append(ref.argmax(-1) == got.argmax(-1))
        nll.append(-got[:-1].gather(-1, window[1:, None]).flatten())
    return {"kl": torch.cat(kls).mean().item(), "top1": torch.cat(agree).float().mean().item(),
            "ppl_ratio": torch.cat(nll).mean().exp().item() / bench.reference_ppl}


def with_weights(bench: Bench, weights: dict[str, torch.Tensor]):
    """A copy of the float32 source with these weights."""
    model = copy.deepcopy(bench.source_model)
    for name, weight in weights.items():
        model.get_submodule(name).weight.data = weight.float().clone()
    return model


def ours(bench: Bench, algorithm: str, **options):
    """Our block driver with `algorithm` at the recipe's defaults and `options`."""
    from pipeline.quantize.blockwise import quantize_blockwise

    recipe = _recipe(bench.calibration_spec, bench.group_size, algorithm=algorithm, **options)
    model = copy.deepcopy(bench.source_model)
    with tempfile.TemporaryDirectory() as checkpoints:
        quantize_blockwise(model, bench.plan, recipe, bench.calibration, Path(checkpoints), "sha")
    return model


def _on_grid(bench: Bench, qparams) -> torch.nn.Module:
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    from pipeline.quantize.grids import weight_args

    weights = {}
    for m in bench.plan.quantized:
        weight = bench.source_model.get_submodule(m.name).weight.data
        weights[m.name] = fake_quantize(weight, *qparams(weight, m.scheme), weight_args(m.scheme))
    return with_weights(bench, weights)


def rtn(bench: Bench):
    """Round to nearest on compressed-tensors' min/max grid."""
    from pipeline.quantize.blockwise import rtn_qparams

    return _on_grid(bench, rtn_qparams)


def calibration_free_search(bench: Bench):
    """The scale search on weight error alone (every input channel equally important)."""
    from pipeline.quantize.blockwise import searched_qparams

    return _on_grid(bench, lambda weight, scheme: searched_qparams(weight, scheme, torch.ones(weight.shape[1])))


def llmcompressor_gptq(bench: Bench):
    """llmcompressor's own `oneshot(GPTQModifier)` at its defaults (static activation order, min/max grid,
    block 128, dampening 0.01); the weights as its compressor stores them, on the scales it chose."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    model = copy.deepcopy(bench.source_model)
    dataset = Dataset.from_dict({"input_ids": bench.calibration.tolist(),
                                 "attention_mask": torch.ones_like(bench.calibration).tolist()})
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=bench.group_size)
    oneshot(model=model, dataset=dataset, tokenizer=bench.tokenizer,
            recipe=GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                                ignore=["lm_head"]),
            num_calibration_samples=len(bench.calibration), max_seq_length=bench.calibration.shape[1],
            shuffle_calibration_samples=False)
    on_grid = {}
    with torch.no_grad():
        for m in bench.plan.quantized:
            module = model.get_submodule(m.name)
            on_grid[m.name] = fake_quantize(module.weight.data, module.weight_scale, module.weight_zero_point,
                                            module.quantization_scheme.weights)
    return with_weights(bench, on_grid)


def auto_round(bench: Bench, **settings):
    """auto-round's own `AutoRound(...).quantize()` with `settings` (iters=0: its optimized RTN); the
    weights it leaves on its grids. In float32 as every model here: on a CPU with bf16 (AMX, avx512_bf16)
    auto-round's default `amp` tunes in BF16 autocast, which made its loop 1.5x faster than in float32 and its
    KL 0.636 against 0.628 (16 x 256, benchmarks/RESULTS.md)."""
    from auto_round import AutoRound

    from pipeline.quantize.autoround_backend import auto_round_scope

    with auto_round_scope():  # puts back torch's deterministic mode, which auto-round turns on for good
        rounder = AutoRound(copy.deepcopy(bench.source_model), tokenizer=bench.tokenizer, bits=4,
                            group_size=bench.group_size, sym=True, nsamples=len(bench.calibration),
                            seqlen=bench.calibration.shape[1], dataset=[w[None] for w in bench.calibration],
                            layer_config={"lm_head": {"bits": 16}}, enable_torch_compile=False, amp=False,
                            **settings)
        rounder.quantize()
    model = with_weights(bench, {m.name: rounder.model.get_submodule(m.name).weight.data
                                 for m in bench.plan.quantized})
    del rounder
    return model
