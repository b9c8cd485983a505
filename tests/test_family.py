"""The 12B (`gemma4_unified`): a tiny 12B from the real config through every algorithm to a validated export, its
offline plan beside Google's own build, and the packed formats refused where their loader breaks the embedders."""

import json

import pytest

from pipeline.recipe import RECIPES_DIR, RecipeError, load_recipe
from pipeline.run import make_plan, quantize_run


def _run(tmp_path, **fields):
    lines = {"model": "tiny:12b", "scheme": "W4A16", "group_size": 32, "calibration": {"samples": 4, "seq_len": 64},
             "eval": {"samples": 2, "seq_len": 64, "max_new_tokens": 4}, "output_dir": str(tmp_path / "run"), **fields}
    (tmp_path / "r.yaml").write_text(json.dumps(lines))
    quantize_run(tmp_path / "r.yaml", serve=False)
    return json.loads((tmp_path / "run" / "eval.json").read_text()), json.loads((tmp_path / "run" / "plan.json").read_text())


def test_tiny_12b_keeps_the_real_shape():
    """Full-attention layers with one KV head of the global width and no v_proj (`attention_k_eq_v`), and the
    vision and audio embedders (no towers)."""
    from pipeline.tiny import tiny_config

    text = tiny_config("12b")["text_config"]
    assert text["attention_k_eq_v"] and text["num_global_key_value_heads"] == 1
    assert text["layer_types"][-1] == "full_attention" and "sliding_attention" in text["layer_types"]


@pytest.mark.parametrize("fields", [
    {"algorithm": "rtn"},
    {"algorithm": "gptq"},
    {"algorithm": "autoround", "autoround": {"iters": 2}},
    {"algorithm": "gptq", "export": "gptq", "modalities": "text"},
], ids=["rtn", "gptq", "autoround", "gptq-folder-text"])
def test_tiny_12b_quantizes_reloads_and_validates(tmp_path, fields):
    """Every calibrated pass runs through the block driver past the first full-attention `k_eq_v` layer (where
    auto-round's own loop is reported to crash: the head width doubles), and the export reloads and validates
    with the embedders kept BF16."""
    report, plan = _run(tmp_path, **fields)
    assert report["passed"] and report["structure"]["problems"] == [] and report["load_problems"] == []
    fates = {m["name"]: m for m in plan["modules"]}
    full = [n for n in fates if ".layers.5.self_attn." in n]
    assert not any(n.endswith("v_proj") for n in full) and len(full) == 3  # q, k, o: V reuses K
    quantized = [m for m in plan["modules"] if m["quantize"]]
    assert len(quantized) == 5 * 7 + 6
    embedders = [m for m in plan["modules"] if m["component"] == "projector"]
    assert (len(embedders), any(m["quantize"] for m in embedders)) == ((0, False) if fields.get("modalities") else (3, False))


def test_tiny_12b_as_gguf_is_scored_by_llama_cpp_and_its_embedders_ship_as_a_projector(tmp_path):
    """llama.cpp's converter and runtime take the 12B's text model; the RTN-Q4_0 file holds the run's integers and
    scores as the compressed-tensors export of the same integers does. Given the processor config a real 12B ships
    (the image processor's fields written out: its class needs torchvision, which has no build here), the
    embedders become `mmproj-<name>-F16.gguf` (llama.cpp's gemma4uv / gemma4ua projectors), which mtmd loads."""
    import shutil

    from transformers.models.gemma4_unified import Gemma4UnifiedAudioFeatureExtractor

    from conftest import needs_llama_cpp
    from pipeline.model import resolve
    from pipeline.recipe import ModelSpec

    needs_llama_cpp()
    source = shutil.copytree(resolve(ModelSpec(id="tiny:12b")).path, tmp_path / "my-12b")
    image = {"image_processor_type": "Gemma4UnifiedImageProcessor", "image_mean": [0.0] * 3, "image_std": [1.0] * 3,
             "do_normalize": False, "do_rescale": True, "rescale_factor": 1 / 255, "patch_size": 16,
             "max_soft_tokens": 280, "pooling_kernel_size": 3, "resample": 3, "do_convert_rgb": True}
    (source / "processor_config.json").write_text(json.dumps({
        "image_processor": image, "feature_extractor": Gemma4UnifiedAudioFeatureExtractor().to_dict(),
        "processor_class": "Gemma4UnifiedProcessor"}, default=str))
    report, _ = _run(tmp_path, model=str(source), export="gguf", gguf={"types": ["Q4_0"]})
    [q4] = report["gguf"]
    assert report["passed"] and q4["label"] == "RTN-Q4_0" and q4["quality"]["top1_agreement"] >= 0.9
    assert report["projector"] == {"file": "mmproj-my-12b-F16.gguf", "vision": True, "audio": True, "problem": None,
                                   "why_not": None, "bytes": (tmp_path / "run" / "export" / "mmproj-my-12b-F16.gguf").stat().st_size}


def test_packed_folders_of_the_12b_with_its_embedders_are_refused_naming_why(write_recipe):
    path = write_recipe(model="tiny:12b", scheme="W4A16", group_size=32, export="auto-round")
    with pytest.raises(RecipeError, match=r"export: auto-round folders of the 12B .* `embed_vision.pos_embedding`"):
        make_plan(load_recipe(path), path)


def test_the_12b_plans_offline_beside_google_s_own_w4a16_build():
    """The bundled config: 11.96 B parameters, 328 decoder Linears at int4 g32 (48 layers; the 8 full-attention
    ones without v_proj); embedders and the tied table BF16, as in Google's gemma-4-12B-it-qat-w4a16-ct
    (int4 symmetric g32, 8.28 GiB loaded in vLLM): planned 7.7 GiB of weights."""
    recipe = load_recipe(RECIPES_DIR / "12b-w4a16.yaml")
    _, _, plan = make_plan(recipe, RECIPES_DIR / "12b-w4a16.yaml")
    assert plan.total_params == 11_959_730_224 and len(plan.quantized) == 40 * 7 + 8 * 6
    assert {m.kept_because.value for m in plan.modules if not m.quantize} == {
        "embedding table", "lm_head", "multimodal projector"}
    assert 7.5 < plan.export_bytes / 2 ** 30 < 8.28
    # Google's QAT weights (BF16 on q4_0's grid) plan as the same model, repacked to the same size
    qat = RECIPES_DIR / "12b-qat-w4a16.yaml"
    _, _, repacked = make_plan(load_recipe(qat), qat)
    assert repacked.total_params == plan.total_params and repacked.export_bytes == plan.export_bytes
