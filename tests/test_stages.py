"""The stages of a run, each called on its own from the previous stage's saved output, not through
quantize_run: what each returns is what the next one (and the manifest) needs."""

import json

import pytest
import torch

from pipeline.export import file_checksums, folder_bytes
from pipeline.model import load_model
from pipeline.recipe import RECIPES_DIR, load_recipe
from pipeline.reload import RELOAD_KL_LIMIT
from pipeline.run import ReloadFailed, export_stage, load_stage, plan_stage, quantize_stage, reload_stage
from pipeline.rundir import DIGESTS, EXPORT, MEMORY_PLAN, PLAN

RECIPE = RECIPES_DIR / "tiny-e2b-w4a16.yaml"


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Plan, load, quantize (with an unquantized copy to measure against) and export into a candidate;
    the probe and both logit tensors saved to disk, as a later stage would find them."""
    recipe, candidate = load_recipe(RECIPE), tmp_path_factory.mktemp("candidate")
    planned = plan_stage(recipe, RECIPE, None, candidate)
    loaded = load_stage(planned, recipe, candidate / "offload")
    reference = load_model(planned.source, planned.config).eval()
    quantized = quantize_stage(loaded, planned, recipe, None, reference_model=reference)
    exported = export_stage(loaded.model, quantized, planned, recipe, candidate)
    torch.save({"probe": loaded.probe, "reference": loaded.reference_logits,
                "in_memory": quantized.in_memory_logits, "measuring": loaded.measuring}, candidate / "logits.pt")
    return recipe, planned, quantized, exported, candidate


def test_plan_stage_writes_the_plan_and_memory_plan_it_returns(stages):
    _, planned, _, _, candidate = stages
    assert json.loads((candidate / PLAN).read_text()) == json.loads(planned.plan.model_dump_json())
    assert json.loads((candidate / MEMORY_PLAN).read_text())["mode"] == planned.memory.mode


def test_quantize_stage_measures_weight_error_per_layer_type_against_the_reference(stages):
    _, planned, quantized, _, _ = stages
    errors = quantized.report.weight_error
    assert set(errors) == {"all", *{m.layer_type for m in planned.plan.modules if m.component == "text_decoder"
                                    and m.kind == "linear"}}
    # int4 g128 RTN on random weights: a few percent, never zero (nothing left unquantized), never ~1
    assert all(0.03 < e < 0.3 for e in errors.values()), errors
    assert min(errors.values()) <= errors["all"] <= max(errors.values())


def test_export_stage_record_matches_what_it_wrote(stages):
    _, _, _, exported, candidate = stages
    export = candidate / EXPORT
    assert exported.record.files == file_checksums(export)
    assert exported.sizes.export_weights_bytes == folder_bytes(export, "*.safetensors")
    assert exported.sizes.export_weights_bytes < exported.sizes.source_bf16_bytes_estimate
    digests = json.loads((candidate / DIGESTS).read_text())
    assert any(name.endswith("weight_packed") for name in digests)
    assert any(name.endswith("embed_tokens.weight") for name in digests)  # a kept table, stored as it was


def test_reload_stage_from_the_saved_export_and_logits(stages):
    recipe, planned, _, _, candidate = stages
    saved = torch.load(candidate / "logits.pt")
    report = reload_stage(candidate / EXPORT, planned, recipe, saved["probe"], saved["reference"],
                          saved["in_memory"], saved["measuring"])
    assert report.vs_in_memory.kl_mean < RELOAD_KL_LIMIT
    assert report.vs_unquantized.kl_mean > report.vs_in_memory.kl_mean  # the reference is not the quantized model
    # Logits that are not the quantized model's (its own, vocabulary shuffled) are caught.
    shuffle = torch.randperm(saved["in_memory"].shape[-1], generator=torch.Generator().manual_seed(0))
    wrong = saved["in_memory"][..., shuffle]
    with pytest.raises(ReloadFailed, match="reloaded logits differ from the in-memory quantized model"):
        reload_stage(candidate / EXPORT, planned, recipe, saved["probe"], saved["reference"], wrong,
                     saved["measuring"])
