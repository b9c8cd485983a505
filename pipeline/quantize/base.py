"""What every quantization pass shares: the interface, its calibration input, and the check that the
library quantized exactly the plan's modules."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from pipeline.plan import Plan
from pipeline.recipe import Recipe
from pipeline.records import QuantizeReport


@dataclass(frozen=True)
class CalibrationData:
    tokens: torch.Tensor  # [samples, seq_len]
    sha256: str
    work_dir: Path  # where a calibrated pass keeps its per-block checkpoints


class Backend(Protocol):
    """A pass quantizes a loaded model in place, exactly as the plan says (each module on its own
    planned scheme, nothing else), and saves it as compressed-tensors."""

    report: QuantizeReport  # what the pass measured (block errors, grid fits), for the manifest

    def quantize(self, model, plan: Plan, recipe: Recipe, data: CalibrationData | None = None) -> None: ...

    def save(self, model, folder: Path, recipe: Recipe) -> None: ...

    def versions(self) -> dict[str, str]: ...


class PlanMismatch(RuntimeError):
    """The library quantized a different set of modules than the plan asked for."""


def check_applied(quantized_names: set[str], plan: Plan) -> None:
    """Compare what the library actually quantized with the plan, both ways."""
    wanted = {m.name for m in plan.quantized}
    missing, extra = sorted(wanted - quantized_names), sorted(quantized_names - wanted)
    if missing or extra:
        raise PlanMismatch(
            f"the quantizer did not follow the plan: {len(missing)} planned modules left unquantized "
            f"{missing[:5]}, {len(extra)} unplanned modules quantized {extra[:5]}"
        )
