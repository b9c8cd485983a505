"""RTN through llmcompressor's QuantizationModifier, saved as compressed-tensors."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import torch

from pipeline.plan import Plan
from pipeline.quantize import check_applied
from pipeline.recipe import Recipe


def quantization_scheme(recipe: Recipe):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    # Strategy named explicitly: compressed-tensors 0.19's W8A16 preset is group-128, not per-channel.
    weights = QuantizationArgs(
        num_bits=recipe.bits, type="int", symmetric=recipe.symmetric,
        strategy="group" if recipe.group_size else "channel", group_size=recipe.group_size,
    )
    return QuantizationScheme(targets=["Linear"], weights=weights)


class LLMCompressorBackend:
    name = "llmcompressor"

    def quantize(self, model, plan: Plan, recipe: Recipe, data=None) -> None:  # RTN needs no data
        from compressed_tensors.offload import update_offload_parameter
        from llmcompressor import oneshot
        from llmcompressor.modeling.moe.linearize import repack_moe
        from llmcompressor.modifiers.quantization import QuantizationModifier

        modifier = QuantizationModifier(config_groups={"group_0": quantization_scheme(recipe)}, ignore=plan.ignore)
        # oneshot converts offset norms (Gemma 3's `1 + w`) to `w` and back, in the model dtype: in
        # bf16 that round trip changes weights, though RTN never needs to touch a norm. Keep them exact.
        vectors = {name: p.detach().clone() for name, p in model.named_parameters() if p.ndim <= 1}
        oneshot(model=model, recipe=[modifier], log_dir=None)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in vectors and not torch.equal(param, vectors[name]):
                    # through compressed-tensors so that a disk-offloaded module's stored copy changes too
                    owner, _, attribute = name.rpartition(".")
                    update_offload_parameter(model.get_submodule(owner), attribute, vectors[name])
        # oneshot unfuses MoE experts into per-expert linears; fuse them back so the export has
        # the source's layout, the one transformers loads (its per-expert layout loads as random).
        repack_moe(model)
        check_applied({name for name, module in model.named_modules()
                       if getattr(module, "quantization_scheme", None) is not None}, plan)

    def save(self, model, folder: Path, recipe: Recipe) -> None:
        model.save_pretrained(folder, save_compressed=True)

    def versions(self) -> dict[str, str]:
        return {pkg: version(pkg) for pkg in ("llmcompressor", "compressed-tensors")}
