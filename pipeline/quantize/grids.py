"""The one grid type every pass hands over, and how it becomes compressed-tensors' state.

Whatever chose the integers (llmcompressor's observers, auto-round's SignRound or RTN, GPTQ's solver,
the QAT repack), the result is a `QuantizedWeight`; `attach_grids` gives the planned modules
compressed-tensors' frozen scheme with exactly those scales, so its compressor packs exactly those
integers, and every export format is written from the same state (pipeline/formats.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.overrides import WeightScheme
from pipeline.plan import Plan
from pipeline.quantize.base import check_applied


@dataclass
class QuantizedWeight:
    """A module's quantization result: the weight on its grid and the grid's parameters."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None  # signed, compressed-tensors' convention; None when symmetric


def weight_args(scheme: WeightScheme):
    from compressed_tensors.quantization import QuantizationArgs

    # Strategy named explicitly: compressed-tensors 0.19's W8A16 preset is group-128, not per-channel.
    return QuantizationArgs(
        num_bits=scheme.bits, type="int", symmetric=scheme.symmetric,
        strategy="group" if scheme.group_size else "channel", group_size=scheme.group_size,
    )


def config_groups(plan: Plan) -> dict:
    """compressed-tensors config groups for the plan: one over every Linear when all quantized modules
    share a scheme (the ignore list keeps the rest), else one per scheme naming its modules exactly
    (exact names, so no module can match two groups)."""
    from compressed_tensors.quantization import QuantizationScheme

    schemes = plan.schemes()
    if len(schemes) <= 1:
        scheme = next(iter(schemes), plan.default_scheme)
        return {"group_0": QuantizationScheme(targets=["Linear"], weights=weight_args(scheme))}
    return {f"group_{i}": QuantizationScheme(targets=names, weights=weight_args(scheme))
            for i, (scheme, names) in enumerate(schemes.items())}


def from_autoround(weight: torch.Tensor, scale: torch.Tensor, zero_point, scheme: WeightScheme,
                   dtype: torch.dtype) -> QuantizedWeight:
    """auto-round's result for one Linear (the weight on its grid, its scale, its unsigned zero point)
    as compressed-tensors' signed grid, stored in `dtype`. The steps are read against the float32
    scale (auto-round computes in float32) and clamped to the b-bit range, then the weight is rebuilt
    on the `dtype`-rounded scale, so that compressed-tensors recovers exactly these integers from what
    is stored. One conversion for auto-round's RTN and the block driver's SignRound."""
    bits, rows = scheme.bits, weight.shape[0]
    offset = 2 ** (bits - 1)
    exact = scale.float().reshape(rows, -1)
    unsigned_zero = (torch.full_like(exact, offset) if scheme.symmetric
                     else torch.as_tensor(zero_point).float().reshape(exact.shape))
    steps = torch.round(weight.float().reshape(rows, exact.shape[1], -1) / exact.unsqueeze(-1))
    steps = torch.clamp(steps + unsigned_zero.unsqueeze(-1), 0, 2 ** bits - 1) - unsigned_zero.unsqueeze(-1)
    stored = exact.to(dtype)
    rebuilt = (steps * stored.float().unsqueeze(-1)).reshape(weight.shape).to(dtype)
    signed_zero = None if scheme.symmetric else (unsigned_zero - offset).to(torch.int8)
    return QuantizedWeight(rebuilt, stored, signed_zero)


def attach_grids(model, plan: Plan, grids: dict[str, QuantizedWeight]) -> None:
    """Mark the planned modules quantized (compressed-tensors' scheme, frozen) with the algorithm's
    scales, so the compressor packs exactly the algorithm's integers."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config

    config = QuantizationConfig(config_groups=config_groups(plan), ignore=plan.pass_ignore,
                                quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, config, show_progress=False)
    for name, grid in grids.items():
        module = model.get_submodule(name)
        module.weight.data = grid.weight.to(module.weight.dtype)
        module.weight_scale.data = grid.scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype)
        if grid.zero_point is not None and hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = grid.zero_point.reshape(module.weight_zero_point.shape).to(
                module.weight_zero_point.dtype)
    check_applied({n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}, plan)
    missing = sorted({m.name for m in plan.quantized} - set(grids))
    if missing:
        raise RuntimeError(f"the calibrated pass produced no grid for {missing[:5]}")


def save_compressed_tensors(model, folder: Path) -> None:
    """A model whose grids were attached (not quantized by llmcompressor) saved as compressed-tensors."""
    from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained

    modify_save_pretrained(model)
    model.save_pretrained(folder, save_compressed=True)


@torch.no_grad()
def relative_weight_errors(model, reference, plan: Plan) -> dict[str, float]:
    """||W - Q(W)|| / ||W|| per layer type (and "all") over every decoder linear, kept ones counting as
    exact, with Q(W) from the module's attached grid as compressed-tensors stores it and W from
    `reference`, an unquantized copy of the model."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for m in plan.modules:
        if m.component != "text_decoder" or m.kind != "linear":
            continue
        original = reference.get_submodule(m.name).weight.float()
        error = 0.0
        if m.quantize:
            module = model.get_submodule(m.name)
            quantized = fake_quantize(module.weight, module.weight_scale, getattr(module, "weight_zero_point", None),
                                      module.quantization_scheme.weights).float()
            error = (original - quantized).pow(2).sum().item()
        for key in (m.layer_type or "decoder", "all"):
            num[key] = num.get(key, 0.0) + error
            den[key] = den.get(key, 0.0) + original.pow(2).sum().item()
    return {key: (num[key] / den[key]) ** 0.5 for key in sorted(den)}
