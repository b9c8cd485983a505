"""RTN through llmcompressor's QuantizationModifier, saved as compressed-tensors."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import torch

from pipeline.plan import Plan
from pipeline.quantize.base import check_applied
from pipeline.quantize.grids import config_groups
from pipeline.recipe import Recipe
from pipeline.records import QuantizeReport


def kv_cache_scheme(recipe: Recipe):
    """Static per-tensor FP8 (e4m3) scales for keys and values, the form `vllm --kv-cache-dtype fp8` reads."""
    from compressed_tensors.quantization import QuantizationArgs

    if recipe.kv_cache != "fp8":
        return None
    return QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)


def allow_global_head_dim(model) -> None:
    """compressed-tensors sizes KV observers from the text config's global `head_dim`, which a
    heterogeneous Gemma 4 config refuses to give (AmbiguousGlobalPerLayerAttributeError), both here
    and when transformers loads the export. With per-tensor scales the head dim does not shape any
    stored tensor, so the global read is safe; the flag is saved with the config so the export loads."""
    text = model.config.get_text_config(decoder=True)
    if getattr(text, "is_heterogeneous", False):
        text.allow_global_per_layer_attribute_access = True


def keep_global_head_dim_flag(model, config_file: Path) -> None:
    """The compressed save drops the text config's `allow_global_per_layer_attribute_access`;
    write it back so transformers can load the KV scales (see allow_global_head_dim)."""
    import json

    if not model.config.get_text_config(decoder=True).__dict__.get("allow_global_per_layer_attribute_access"):
        return
    config = json.loads(config_file.read_text())
    text = config.get("text_config", config)
    text["allow_global_per_layer_attribute_access"] = True
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def calibration_dataset(tokens: torch.Tensor):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})


class LLMCompressorBackend:
    def __init__(self, **_):  # RTN needs neither the tokenizer nor the memory plan
        self.report = QuantizeReport()

    def quantize(self, model, plan: Plan, recipe: Recipe, data=None) -> None:  # RTN weights need no data
        from compressed_tensors.offload import update_offload_parameter
        from llmcompressor import oneshot
        from llmcompressor.modeling.moe.linearize import repack_moe
        from llmcompressor.modifiers.quantization import QuantizationModifier

        kv_scheme = kv_cache_scheme(recipe)
        modifier = QuantizationModifier(config_groups=config_groups(plan), ignore=plan.pass_ignore,
                                        kv_cache_scheme=kv_scheme)
        calibration = {}
        if kv_scheme is not None:
            allow_global_head_dim(model)
            tokens = data.tokens
            # The basic pipeline runs whole-model forwards: Gemma 4's KV-shared layers then read their
            # source layer's K/V of the same batch (the sequential pipeline loses them, see the notes).
            # oneshot insists on a processor when given data; the dataset is already tokenized, and
            # the tokenizer avoids building Gemma 4's multimodal processor (which needs torchvision).
            from transformers import AutoTokenizer

            calibration = dict(dataset=calibration_dataset(tokens), num_calibration_samples=tokens.shape[0],
                               max_seq_length=tokens.shape[1], shuffle_calibration_samples=False, pipeline="basic",
                               processor=AutoTokenizer.from_pretrained(model.name_or_path))
        # oneshot converts offset norms (Gemma 3's `1 + w`) to `w` and back, in the model dtype: in
        # bf16 that round trip changes weights, though RTN never needs to touch a norm. Keep them exact.
        vectors = {name: p.detach().clone() for name, p in model.named_parameters() if p.ndim <= 1}
        oneshot(model=model, recipe=[modifier], log_dir=None, **calibration)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in vectors and not torch.equal(param, vectors[name]):
                    # through compressed-tensors so that a disk-offloaded module's stored copy changes too
                    owner, _, attribute = name.rpartition(".")
                    update_offload_parameter(model.get_submodule(owner), attribute, vectors[name])
        # oneshot unfuses MoE experts into per-expert linears (`experts.<i>.<gate|up|down>_proj`, the
        # names the plan gives quantized experts). Kept experts are fused back, the layout transformers
        # loads; quantized ones stay per expert for the packed exports (its fused layout loads as random).
        if not recipe.quantize_experts:
            repack_moe(model)
        # Attention modules carrying only KV-cache scales are not weight-quantized modules of the plan.
        check_applied({name for name, module in model.named_modules()
                       if getattr(getattr(module, "quantization_scheme", None), "weights", None) is not None}, plan)

    def save(self, model, folder: Path, recipe: Recipe) -> None:
        model.save_pretrained(folder, save_compressed=True)
        if kv_cache_scheme(recipe) is not None:
            keep_global_head_dim_flag(model, folder / "config.json")

    def versions(self) -> dict[str, str]:
        return {pkg: version(pkg) for pkg in ("llmcompressor", "compressed-tensors")}
