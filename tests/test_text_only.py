"""Text-only builds (`modalities: text`): no towers, a text model's config and keys, the same logits."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from pipeline import reload as reloading
from pipeline.tensors import StoredTensors
from pipeline.plan import Plan
from pipeline.recipe import parse_recipe
from pipeline.run import quantize_run
from pipeline.text_only import PROCESSOR_FILES, TOWER_COMPONENTS, export_sidecars, source_key

_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8}


def _build(root: Path, variant: str, modalities: str, validate: bool) -> tuple[dict, Path]:
    recipe = root / f"{variant}-{modalities}.yaml"
    recipe.write_text(f"model: tiny:{variant}\nscheme: W4A16\ngroup_size: 64\nmodalities: {modalities}\n"
                      f"output_dir: {root / modalities}\neval: {{samples: 2, seq_len: 64, max_new_tokens: 4}}\n")
    return quantize_run(recipe, validate=validate, card=validate), root / modalities


@pytest.mark.parametrize("variant", ["e2b", "26b-a4b"])
def test_text_only_build_reloads_as_a_text_model_with_the_multimodal_logits(tmp_path, variant):
    text_manifest, text_run = _build(tmp_path, variant, "text", validate=variant == "e2b")
    full_manifest, full_run = _build(tmp_path, variant, "all", validate=False)
    text_export, full_export = text_run / "export", full_run / "export"

    config = AutoConfig.from_pretrained(text_export)
    assert config.model_type == "gemma4_text" and config.architectures == ["Gemma4ForCausalLM"]
    model, info = AutoModelForCausalLM.from_pretrained(text_export, dtype=torch.bfloat16, output_loading_info=True)
    assert type(model).__name__ == "Gemma4ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    # Same RTN on the same decoder: the text model computes exactly what the multimodal one does on text.
    probe = reloading.probe_input_ids(AutoTokenizer.from_pretrained(text_export))
    multimodal = AutoModelForImageTextToText.from_pretrained(full_export, dtype=torch.bfloat16)
    text_logits, full_logits = reloading.logits(model, probe), reloading.logits(multimodal, probe)
    assert (text_logits - full_logits).abs().max().item() <= 1e-5

    plan = Plan.load(text_run / "plan.json")
    assert not [m for m in plan.modules if m.component in TOWER_COMPONENTS]
    assert len(plan.quantized) == len(Plan.load(full_run / "plan.json").quantized)

    # Smaller by exactly the towers: their stored tensors in the multimodal export, nothing else.
    full_headers, text_headers = StoredTensors(full_export).headers, StoredTensors(text_export).headers
    towers = {k: v for k, v in full_headers.items() if source_key(k) is None}
    assert {source_key(k) for k in full_headers} - {None} == set(text_headers)
    assert sum(torch.Size(shape).numel() for _, shape in towers.values()) == sum(
        text_manifest.modalities.dropped_params.values())
    def data_bytes(headers):
        return sum(torch.Size(shape).numel() * _BYTES[dtype] for dtype, shape in headers.values())

    tower_bytes = data_bytes(towers)
    assert data_bytes(full_headers) - data_bytes(text_headers) == tower_bytes
    # On disk the files also lose the towers' entries in the safetensors header (names, shapes).
    saved = full_manifest.sizes.export_weights_bytes - text_manifest.sizes.export_weights_bytes
    assert tower_bytes <= saved < 1.05 * tower_bytes, (saved, tower_bytes)
    assert set(text_manifest.modalities.dropped_params) == (
        {"vision", "audio", "projector"} if variant == "e2b" else {"vision", "projector"})

    if variant == "e2b":  # validated: structure checked tensor by tensor against the renamed source
        assert text_manifest.validation.passed
        eval_report = json.loads((text_run / "eval.json").read_text())
        assert eval_report["structure"]["problems"] == [] and eval_report["structure"]["kept_identical"] > 0
        card = (text_export / "README.md").read_text()
        assert "This is a **text-only build** (`modalities: text`)" in card and "audio tower (" in card
        assert "pipeline_tag: text-generation" in card


def test_text_only_exports_leave_the_processor_files_out(tmp_path):
    files = [tmp_path / name for name in ("tokenizer.json", "chat_template.jinja", *PROCESSOR_FILES)]
    text = parse_recipe({"name": "t", "model": "tiny:e2b", "scheme": "W4A16", "modalities": "text"})
    full = parse_recipe({"name": "t", "model": "tiny:e2b", "scheme": "W4A16"})
    assert [p.name for p in export_sidecars(text, files)] == ["tokenizer.json", "chat_template.jinja"]
    assert export_sidecars(full, files) == files and full.modalities == "all"


def test_modalities_key_is_validated():
    from pipeline.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"modalities: got 'vision'; allowed: 'all' or 'text'"):
        parse_recipe({"name": "t", "model": "tiny:e2b", "scheme": "W4A16", "modalities": "vision"}, source="r.yaml")
