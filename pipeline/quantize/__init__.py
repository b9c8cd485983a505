"""Quantization passes: one backend per algorithm and library (pipeline/algorithms.py), each standing on
base.py (the interface, calibration input, plan check) and grids.py (the one grid type and how it
becomes compressed-tensors' state)."""

from __future__ import annotations

from pipeline.quantize.base import Backend
from pipeline.recipe import Recipe


def get_backend(recipe: Recipe, tokenizer=None, memory=None) -> Backend:
    """The recipe's pass (pipeline/algorithms.py), built with what any backend may need: the tokenizer
    (auto-round wants one) and the memory plan (pipeline.memory.MemoryPlan: where the block driver runs)."""
    from importlib import import_module

    module, _, cls = recipe.quant_pass.backend.partition(":")
    return getattr(import_module(module), cls)(recipe=recipe, tokenizer=tokenizer, memory=memory)
