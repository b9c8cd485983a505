"""RTN through auto-round (`algorithm: rtn`, `library: auto-round`): AutoRound with `iters=0`.

`disable_opt_rtn=True` makes it plain round-to-nearest: auto-round's default at `iters=0` is an
"optimized RTN" that wants calibration data (and reaches for its default Hub dataset when it has
none). auto-round picks its own scales (symmetric: max|w| / 2^(b-1), where llmcompressor uses
max|w| / 7.5 at 4 bits), so the two libraries' RTN give different grids. Its grid is attached as
compressed-tensors' state like every backend's, so all export formats hold the same integers.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import torch

from pipeline.plan import Plan
from pipeline.quantize.base import CalibrationData
from pipeline.quantize.grids import attach_grids, from_autoround, save_compressed_tensors
from pipeline.recipe import Recipe
from pipeline.records import QuantizeReport

_AUTOROUND_ATTRIBUTES = ("scale", "zp", "bits", "group_size", "sym", "data_type", "act_bits", "act_group_size",
                         "act_sym", "act_data_type", "act_dynamic", "super_bits", "super_group_size")


@contextmanager
def auto_round_scope():
    """auto-round writes scratch files to ./ar_work_space unless told otherwise, and its constructor
    turns torch's deterministic mode on for the whole process and never back (auto_round
    compressors/base.py): both are put back as they were."""
    previous = os.environ.get("AR_WORK_SPACE")
    deterministic = torch.are_deterministic_algorithms_enabled()
    with tempfile.TemporaryDirectory(prefix="auto-round-") as scratch:
        os.environ["AR_WORK_SPACE"] = scratch
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic)
            if previous is None:
                os.environ.pop("AR_WORK_SPACE", None)
            else:
                os.environ["AR_WORK_SPACE"] = previous


class AutoRoundRTNBackend:
    def __init__(self, tokenizer=None, **_):
        self.tokenizer = tokenizer  # AutoRound wants one for text-only models, though RTN reads no text
        self.report = QuantizeReport()

    def quantize(self, model, plan: Plan, recipe: Recipe, data: CalibrationData | None = None) -> None:
        from auto_round import AutoRound

        # Every module's scheme from the plan (overrides included); the constructor's bits are only
        # auto-round's default for modules the layer config does not name, and it names them all.
        layers = {m.name: {"bits": 16} for m in plan.modules if m.kind == "linear" and not m.quantize}
        layers |= {m.name: {"bits": m.bits, "group_size": m.group_size or -1, "sym": m.symmetric}
                   for m in plan.quantized}
        default = plan.default_scheme
        # auto-round moves the model to float32 on CPUs without bf16: every tensor goes back to its dtype
        # after (buffers such as the rotary frequencies stay float32), new ones (unfused experts) to `dtype`.
        dtype = next(model.parameters()).dtype
        dtypes = {name: t.dtype for name, t in (*model.named_parameters(), *model.named_buffers())}
        with auto_round_scope():
            rounder = AutoRound(model, tokenizer=self.tokenizer, bits=default.bits, group_size=default.group_size or -1,
                                sym=default.symmetric, iters=0, disable_opt_rtn=True, layer_config=layers)
            model, _ = rounder.quantize()
        grids = {}
        for fate in plan.quantized:
            module = model.get_submodule(fate.name)
            bits, group_size = getattr(module, "bits", 16), getattr(module, "group_size", None)
            if (bits, group_size) != (fate.bits, fate.group_size or -1):
                raise RuntimeError(f"auto-round did not quantize {fate.name} as planned (int{fate.bits}, "
                                   f"group {fate.group_size}): it holds bits {bits}, group {group_size}")
            grids[fate.name] = from_autoround(module.weight, module.scale, module.zp, fate.scheme, dtype)
        unplanned = sorted(name for name, module in model.named_modules()
                           if getattr(module, "bits", 16) < 16 and name not in grids)
        if unplanned:
            raise RuntimeError(f"auto-round quantized modules the plan keeps: {unplanned[:5]}")
        for module in model.modules():
            for attribute in _AUTOROUND_ATTRIBUTES:
                module.__dict__.pop(attribute, None)
        with torch.no_grad():
            for name, tensor in (*model.named_parameters(), *model.named_buffers()):
                if tensor.is_floating_point():
                    tensor.data = tensor.data.to(dtypes.get(name, dtype))
        attach_grids(model, plan, grids)

    def save(self, model, folder: Path, recipe: Recipe) -> None:
        save_compressed_tensors(model, folder)

    def versions(self) -> dict[str, str]:
        return {pkg: version(pkg) for pkg in ("auto-round", "compressed-tensors")}
