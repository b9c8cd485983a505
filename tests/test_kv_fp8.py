"""Recipe `kv_cache: fp8`: static FP8 KV-cache scales calibrated in the RTN pass, exported for vLLM."""

import json

import pytest
import torch
from safetensors import safe_open

from pipeline.recipe import RecipeError, load_recipe


def test_kv_cache_is_rejected_with_the_blockwise_algorithms(write_recipe):
    path = write_recipe(model="tiny:e2b", scheme="W4A16", algorithm="gptq", kv_cache="fp8")
    with pytest.raises(RecipeError, match=r"kv_cache: FP8 KV-cache scales are calibrated by llmcompressor's RTN pass only"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"rtn on llmcompressor \(its default library\) with kv_cache: fp8, or drop kv_cache for rtn on auto-round"):
        load_recipe(write_recipe(model="tiny:e2b", scheme="W4A16", library="auto-round", kv_cache="fp8"))
    with pytest.raises(RecipeError, match=r"kv_cache: got 'int8'; allowed: 'fp8'"):
        load_recipe(write_recipe(model="tiny:e2b", scheme="W4A16", kv_cache="int8"))
    recipe = load_recipe(write_recipe(model="tiny:e2b", scheme="W4A16", kv_cache="fp8"))
    assert recipe.calibrated and not load_recipe(write_recipe(model="tiny:e2b", scheme="W4A16")).calibrated


# e2b: KV-shared layers (no k_proj/v_proj); 31b: full-attention layers with attention_k_eq_v (no v_proj).
@pytest.fixture(scope="module", params=["e2b", "31b"])
def fp8_run(request, tmp_path_factory):
    from pipeline.run import quantize_run

    root = tmp_path_factory.mktemp(f"kvfp8-{request.param}")
    recipe = root / "tiny-kv-fp8.yaml"
    recipe.write_text(f"model: tiny:{request.param}\nscheme: W4A16\nkv_cache: fp8\ncalibration: {{samples: 4, seq_len: 64}}\n"
                      f"output_dir: {root / 'run'}\neval: {{samples: 2, seq_len: 64, max_new_tokens: 4}}\n")
    manifest = quantize_run(recipe)
    return root / "run", manifest


def _stored_scales(export) -> dict[str, torch.Tensor]:
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.endswith(("k_scale", "v_scale"))}


def test_fp8_kv_export_has_the_scheme_and_one_scale_pair_per_kv_computing_layer(fp8_run):
    run, manifest = fp8_run
    export = run / "export"
    config = json.loads((export / "config.json").read_text())
    scheme = config["quantization_config"]["kv_cache_scheme"]
    assert {k: scheme[k] for k in ("num_bits", "type", "strategy", "dynamic", "symmetric")} == \
        {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    text = config["text_config"]
    first_shared = text["num_hidden_layers"] - (text.get("num_kv_shared_layers") or 0)
    scales = _stored_scales(export)
    # KV-shared layers have no k_proj/v_proj and no cache of their own: no scales for them.
    expected = {f"model.language_model.layers.{i}.self_attn.{kv}_scale" for i in range(first_shared) for kv in "kv"}
    assert set(scales) == expected
    assert all(t.numel() == 1 and torch.isfinite(t).all() and (t > 0).all() for t in scales.values())
    assert manifest.status == "validated"
    report = json.loads((run / "eval.json").read_text())
    assert report["passed"] and report["structure"]["problems"] == []
    card = (export / "README.md").read_text()
    assert "--kv-cache-dtype fp8" in card and "`k_scale`" in card


def test_fp8_kv_scales_reload_in_transformers_and_are_used(fp8_run):
    from transformers import AutoModelForImageTextToText

    export = fp8_run[0] / "export"
    scales = _stored_scales(export)
    model = AutoModelForImageTextToText.from_pretrained(export, dtype=torch.bfloat16).eval()
    modules = dict(model.named_modules())
    for key, stored in scales.items():
        owner, _, leaf = key.rpartition(".")
        assert torch.equal(getattr(modules[owner], leaf).data, stored), key
    ids = torch.randint(20, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for key in scales:  # a scale 1000× too large flushes the FP8 keys/values to zero
            owner, _, leaf = key.rpartition(".")
            getattr(modules[owner], leaf).data.mul_(1000)
        after = model(input_ids=ids).logits
    assert (before - after).abs().max() > 0.1


def test_fp8_kv_scales_fit_the_models_keys_and_values(fp8_run):
    """Static per-tensor FP8: 448 (e4m3's largest value) × scale is the calibrated maximum |K| or |V|.
    Checked loosely against the unquantized source on the calibration text: llmcompressor's observer
    sees the W4 model's activations through its own statistics, so the maxima agree to within 2×,
    which an uncalibrated scale (its initial value) or one of the wrong tensor would not."""
    from transformers import AutoTokenizer, DynamicCache

    from pipeline.calibration import build
    from pipeline.model import load_config, load_model, resolve

    run, manifest = fp8_run
    recipe = manifest.recipe
    source = resolve(recipe.model)
    tokens, _ = build(recipe.calibration, AutoTokenizer.from_pretrained(source.ref))
    model = load_model(source, load_config(source)).eval()
    caches = []
    with torch.no_grad():
        for row in tokens:
            caches.append(DynamicCache())  # plain layers: sliding ones keep every token too
            model(input_ids=row[None], past_key_values=caches[-1])
    scales = _stored_scales(run / "export")
    for idx in range(len(caches[0].layers)):
        prefix = f"model.language_model.layers.{idx}.self_attn"
        for kind, attr in (("k", "keys"), ("v", "values")):
            observed = max(getattr(c.layers[idx], attr).float().abs().max().item() for c in caches)
            calibrated = 448 * scales[f"{prefix}.{kind}_scale"].float().item()
            assert 0.5 * observed <= calibrated <= 2 * observed, (prefix, kind, observed, calibrated)
