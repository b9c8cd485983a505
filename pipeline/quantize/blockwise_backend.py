"""Calibrated passes (AutoRound, GPTQ) through our Gemma 4-aware block driver, saved as
compressed-tensors with the grids the algorithms chose."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import torch

from pipeline.plan import Plan
from pipeline.quantize.base import CalibrationData
from pipeline.quantize.blockwise import quantize_blockwise
from pipeline.quantize.grids import attach_grids, save_compressed_tensors
from pipeline.recipe import Recipe
from pipeline.records import QuantizeReport

CHECKPOINTS = "checkpoints"


def spread(model, budgets: list[int] | dict) -> dict:
    """The model placed over the devices within their budgets by accelerate (infer_auto_device_map,
    decoder layers never split; dispatch_model's hooks move activations between devices): one GPU,
    several (multi-GPU without recipe changes), or a `{"cpu": bytes}` budget, the same code path on a
    machine without a GPU. Returns the device map."""
    from accelerate import dispatch_model, infer_auto_device_map

    max_memory = dict(enumerate(budgets)) if isinstance(budgets, list) else dict(budgets)
    device_map = infer_auto_device_map(model, max_memory=max_memory,
                                       no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []))
    if set(device_map.values()) - set(max_memory):
        raise RuntimeError(f"the model does not fit on {sorted(map(str, max_memory))} within {max_memory}")
    dispatch_model(model, device_map)
    return device_map


def gather(model) -> None:
    """Back to the host in one piece, accelerate's hooks removed."""
    from accelerate.hooks import remove_hook_from_submodules

    remove_hook_from_submodules(model)
    model.cpu()


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class BlockwiseBackend:
    """`algorithm: autoround` runs auto-round's SignRound, `algorithm: gptq` llmcompressor's GPTQ solver."""

    def __init__(self, memory=None, **_):
        self.memory = memory  # pipeline.memory.MemoryPlan: where the blocks run
        self.report = QuantizeReport()

    def placement(self, model) -> str:
        """The memory plan's GPU placement; without one, the whole model on the GPU when it fits."""
        if self.memory is not None:
            return self.memory.gpu
        if torch.cuda.is_available() and _weight_bytes(model) < 0.8 * torch.cuda.mem_get_info()[0]:
            return "whole-model"
        return "none"

    def quantize(self, model, plan: Plan, recipe: Recipe, data: CalibrationData | None = None) -> None:
        if data is None:
            raise ValueError(f"algorithm {recipe.algorithm!r} needs calibration data")
        model.eval()
        placement = self.placement(model)
        if placement == "whole-model":
            spread(model, self.memory.gpu_budget_bytes if self.memory else [torch.cuda.mem_get_info(0)[0]])
        onload = torch.device("cuda", 0) if placement == "per-layer" else None
        # The memory plan's measuring dtype: float32 chains where the CPU emulates bf16 and it fits.
        compute = torch.float32 if self.memory is not None and self.memory.compute_dtype == "float32" else None
        try:
            result = quantize_blockwise(model, plan, recipe, data.tokens, data.work_dir / CHECKPOINTS, data.sha256,
                                        onload=onload, compute=compute,
                                        chain_batch=self.memory.chain_batch if self.memory is not None else 1)
        finally:
            if placement == "whole-model":
                gather(model)
        attach_grids(model, plan, result.grids)
        self.report = QuantizeReport(block_errors=result.block_errors, error_batches=result.error_batches,
                                     resumed_blocks=result.resumed_blocks)

    def save(self, model, folder: Path, recipe: Recipe) -> None:
        save_compressed_tensors(model, folder)

    def versions(self) -> dict[str, str]:
        return {pkg: version(pkg) for pkg in ("auto-round", "llmcompressor", "compressed-tensors")}
