"""Lossless repack of weights that already lie on a k-bit grid (`algorithm: qat-repack`).

Google's `-qat-q4_0-unquantized` checkpoints store BF16 weights that quantization-aware training
put on GGML's q4_0 grid: per group of 32, d = m / -8 where m is the group's value of largest
magnitude *with its sign*, and each weight is q * d with q = round(w / d) clamped to [-8, 7]. The
extreme value is therefore always q = -8, and d is negative whenever m is positive: such a group
has no positive-scale form with integers in [-8, 7] (it would need +8). So the scale keeps its
sign; compressed-tensors dequantizes q * scale whatever the sign.

Every group is fitted against the scales that put its extreme on the grid (-8 with the sign of m,
+-8 and +-7 with a positive scale), each rounded to the weight's dtype as the export stores it; the
fit that reproduces the most values bit-identically wins. A group none of them reproduces within
BF16 rounding is off the grid and fails the pass, naming the tensor and how far off it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from pipeline.plan import Plan
from pipeline.quantize.base import CalibrationData
from pipeline.quantize.grids import QuantizedWeight, attach_grids, save_compressed_tensors
from pipeline.recipe import Recipe
from pipeline.records import QuantizeReport, RepackReport

# A value on the grid differs from q * scale only by BF16 rounding (of the scale, and of the product):
# at most about one ulp of the group's largest magnitude, 2^-7 of it. Off the grid means further than
# 2^-6 of it, an eighth of a 4-bit grid step.
OFF_GRID_RELATIVE = 2.0 ** -6


class OffGrid(RuntimeError):
    """The source's weights do not lie on the grid the recipe names: a repack would not be lossless."""


@dataclass
class GridFit:
    """One tensor on its grid: integers, per-group scales (dtype of the weight), and how well they fit."""

    name: str
    ints: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # [out, groups], the weight's dtype; negative where the group's extreme is positive
    weight: torch.Tensor  # ints * scale in the weight's dtype: what a reload computes
    groups: int
    off_grid_groups: int
    values: int
    identical_values: int  # reproduced bit for bit by ints * scale
    worst_relative_error: float  # max |w - q * s| / max |w| over the tensor's groups
    worst_group: tuple[int, int]  # (row, group) where it occurs
    negative_scales: int


def fit_grid(name: str, weight: torch.Tensor, bits: int, group_size: int) -> GridFit:
    out_features, in_features = weight.shape
    dtype, qmin, qmax = weight.dtype, -2 ** (bits - 1), 2 ** (bits - 1) - 1
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    extreme_abs, index = w.abs().max(-1, keepdim=True)
    extreme = w.gather(-1, index)
    zero = extreme_abs == 0  # an all-zero group: any scale gives q = 0; 1 keeps the division finite
    candidates = [extreme / qmin, extreme_abs / -qmin, extreme_abs / qmax]  # GGML's signed d first

    best = None
    for candidate in candidates:
        scale = torch.where(zero, torch.ones_like(candidate), candidate).to(dtype).float()
        ints = torch.clamp(torch.round(w / scale), qmin, qmax)
        rebuilt = (ints * scale).to(dtype).float()
        identical = (rebuilt == w).sum(-1, keepdim=True)
        error = (rebuilt - w).abs().amax(-1, keepdim=True)
        if best is None:
            best = [scale, ints, rebuilt, identical, error]
            continue
        better = (identical > best[3]) | ((identical == best[3]) & (error < best[4]))
        for slot, value in enumerate((scale, ints, rebuilt, identical, error)):
            best[slot] = torch.where(better, value, best[slot])
    scale, ints, rebuilt, identical, error = best

    relative = (error / torch.where(zero, torch.ones_like(extreme_abs), extreme_abs)).squeeze(-1)
    worst = int(relative.argmax())
    return GridFit(
        name=name, ints=ints.reshape(out_features, in_features).to(torch.int8),
        scale=scale.squeeze(-1).to(dtype), weight=rebuilt.reshape(out_features, in_features).to(dtype),
        groups=relative.numel(), off_grid_groups=int((relative > OFF_GRID_RELATIVE).sum()),
        values=w.numel(), identical_values=int(identical.sum()),
        worst_relative_error=float(relative.max()) if relative.numel() else 0.0,
        worst_group=divmod(worst, relative.shape[1]), negative_scales=int((scale < 0).sum()),
    )


def repack_report(fits: list[GridFit]) -> RepackReport:
    """How exactly the integers and scales reproduce the source."""
    values = sum(f.values for f in fits)
    worst = max(fits, key=lambda f: f.worst_relative_error)
    return RepackReport(
        tensors=len(fits), groups=sum(f.groups for f in fits), off_grid_groups=sum(f.off_grid_groups for f in fits),
        values=values, identical_share=sum(f.identical_values for f in fits) / values,
        worst_relative_error=worst.worst_relative_error, worst_tensor=worst.name,
        negative_scale_groups=sum(f.negative_scales for f in fits))


def off_grid_message(fits: list[GridFit], bits: int, group_size: int) -> str:
    off = [f for f in fits if f.off_grid_groups]
    lines = [f"{f.name}: {f.off_grid_groups} of {f.groups} groups off the grid, worst at row {f.worst_group[0]} "
             f"group {f.worst_group[1]}: {f.worst_relative_error:.3g} of the group's largest magnitude "
             f"(on-grid values are within {OFF_GRID_RELATIVE:.3g})" for f in off]
    return (f"{len(off)} tensors do not lie on a {bits}-bit grid with groups of {group_size}, so qat-repack "
            "would not be lossless: " + "; ".join(lines[:5]) + ("; ..." if len(lines) > 5 else ""))


class QATRepackBackend:
    """Recover the integers and scales of weights already on the recipe's grid; write them packed."""

    def __init__(self, **_):
        self.report = QuantizeReport()

    def quantize(self, model, plan: Plan, recipe: Recipe, data: CalibrationData | None = None) -> None:
        fits = [fit_grid(m.name, model.get_submodule(m.name).weight, m.bits, m.group_size or m.shape[1])
                for m in plan.quantized]
        self.report = QuantizeReport(qat_repack=repack_report(fits) if fits else None)
        if any(f.off_grid_groups for f in fits):
            raise OffGrid(off_grid_message(fits, plan.bits, plan.group_size))
        attach_grids(model, plan, {f.name: QuantizedWeight(f.weight, f.scale) for f in fits})

    def save(self, model, folder: Path, recipe: Recipe) -> None:
        save_compressed_tensors(model, folder)

    def versions(self) -> dict[str, str]:
        return {pkg: version(pkg) for pkg in ("llmcompressor", "compressed-tensors")}
