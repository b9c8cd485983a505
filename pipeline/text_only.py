"""Text-only builds (`modalities: text`): the text decoder of a multimodal Gemma 4, without its
vision and audio towers and projectors, saved as a text model (`Gemma4ForCausalLM`, `gemma4_text`).

The multimodal checkpoint stores the decoder under `model.language_model.`; the text class
expects `model.`. transformers 5.17 has no built-in Gemma 4 mapping for this (it has one for
qwen3.5's text class), so the load passes its documented `key_mapping`; the towers' tensors are
then the only unexpected keys, which this module checks rather than assumes.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

TEXT_KEY_MAPPING = {r"^model\.language_model\.": "model."}
TOWER_COMPONENTS = ("vision", "audio", "projector")
# The multimodal processor's files: a text-only export ships the tokenizer and chat template only.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")


def wanted(recipe) -> bool:
    return getattr(recipe, "modalities", "all") == "text"


def text_only_config(config):
    """The text model's config of a multimodal config (a text config is returned as it is)."""
    from pipeline.model import is_multimodal

    if not is_multimodal(config):
        return config
    text = copy.deepcopy(config.get_text_config())
    # The end-of-turn ids live on the multimodal config; generation needs them on this one.
    if getattr(config, "eos_token_id", None) is not None:
        text.eos_token_id = config.eos_token_id
    return text


def source_key(key: str) -> str | None:
    """The text model's name for a multimodal checkpoint's tensor; None for tower tensors."""
    from pipeline.plan import component_of

    owner = key.rpartition(".")[0]
    if component_of(owner) in TOWER_COMPONENTS or component_of(key) in TOWER_COMPONENTS:
        return None
    for pattern, replacement in TEXT_KEY_MAPPING.items():
        key = re.sub(pattern, replacement, key)
    return key


class TowerKeysLeft(RuntimeError):
    """Loading the text model from the multimodal checkpoint left something other than towers out."""


def load_text_model(source, config, dtype=None):
    """The source's text decoder as the text class, towers never loaded; every weight accounted for
    (in `dtype`, BF16 by default)."""
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        source.ref, revision=source.spec.revision, config=config, key_mapping=TEXT_KEY_MAPPING,
        dtype=dtype or torch.bfloat16, output_loading_info=True)
    not_towers = sorted(k for k in info["unexpected_keys"] if source_key(k) is not None)
    if info["missing_keys"] or not_towers or info["mismatched_keys"]:
        raise TowerKeysLeft(f"{source.spec.id}: the text model does not load cleanly from the checkpoint: "
                            f"missing {sorted(info['missing_keys'])[:3]}, unexpected outside the towers "
                            f"{not_towers[:3]}, mismatched {sorted(map(str, info['mismatched_keys']))[:3]}")
    # save_pretrained reverts the renamings the load applied, which would write the decoder back
    # under `model.language_model.`; the export is a text checkpoint, so ours are forgotten.
    model._weight_conversions = [c for c in model._weight_conversions or []
                                 if list(getattr(c, "source_patterns", [])) != list(TEXT_KEY_MAPPING)]
    return model


def detach_from_source_config(model) -> None:
    """llmcompressor's save rewrites config.json from the file at `config._name_or_path` (here the
    multimodal source's); without a path it keeps the text config transformers serializes. Only for
    saving: oneshot reads that path before quantizing."""
    model.config._name_or_path = ""


def dropped_towers(source_config) -> dict[str, int]:
    """Parameters (and persistent buffers) per tower component that a text-only build leaves out."""
    import torch

    from pipeline.model import build_meta_model, is_multimodal
    from pipeline.plan import component_of

    if not is_multimodal(source_config):
        return {}
    dropped: dict[str, int] = {}
    for name, tensor in build_meta_model(source_config).state_dict().items():
        component = component_of(name.rpartition(".")[0])
        if component in TOWER_COMPONENTS and isinstance(tensor, torch.Tensor):
            dropped[component] = dropped.get(component, 0) + tensor.numel()
    return dropped


def export_sidecars(recipe, files: list[Path]) -> list[Path]:
    """The source's side files a build ships: all of them, less the processor's for text-only."""
    return [p for p in files if not (wanted(recipe) and p.name in PROCESSOR_FILES)]
