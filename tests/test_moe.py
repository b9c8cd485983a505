"""26B-A4B's fused MoE experts, quantized: planned per expert, stored packed, reloaded quantized."""

import json

import pytest
import torch

from conftest import read_tensors
from pipeline.export import ExportIncomplete, check_complete
from pipeline.tensors import StoredTensors
from pipeline.plan import Plan
from pipeline.recipe import RecipeError, parse_recipe
from pipeline.run import quantize_run

from test_formats import gptq_integers


@pytest.fixture(scope="module", params=[("W8A16", "auto-round", "llmcompressor"), ("W4A16", "gptq", "llmcompressor"),
                                        ("W8A16", "auto-round", "auto-round")],
                ids=["w8-auto-round", "w4-gptq", "w8-auto-round-rtn-by-auto-round"])
def moe_run(request, tmp_path_factory):
    scheme, export, library = request.param
    root = tmp_path_factory.mktemp(f"moe-{export}")
    group = "null" if scheme == "W8A16" else 64
    recipe = root / "recipe.yaml"
    recipe.write_text(f"model: tiny:26b-a4b\nscheme: {scheme}\ngroup_size: {group}\nquantize_experts: true\n"
                      f"library: {library}\nexport: {export}\noutput_dir: {root / 'run'}\neval: {{samples: 2, seq_len: 64, max_new_tokens: 4}}\n")
    return scheme, quantize_run(recipe, card=False), root / "run"


def test_plan_counts_every_expert_as_its_own_linear(moe_run):
    scheme, _, run_dir = moe_run
    plan = Plan.load(run_dir / "plan.json")
    experts = [m for m in plan.modules if m.component == "moe_experts"]
    config = json.loads((run_dir / "export" / "config.json").read_text())["text_config"]
    e, inter, hidden = config["num_experts"], config["moe_intermediate_size"], config["hidden_size"]
    assert len(experts) == config["num_hidden_layers"] * e * 3 and all(m.quantize for m in experts)
    assert {m.submodule: m.shape for m in experts} == {"gate_proj": [inter, hidden], "up_proj": [inter, hidden],
                                                        "down_proj": [hidden, inter]}
    assert not any(m.kind == "experts" for m in plan.modules)  # no fused block left to keep
    routers = [m for m in plan.modules if m.component == "moe_router"]
    assert routers and not any(m.quantize for m in routers)


def test_experts_stored_quantized_router_untouched_and_reloaded(moe_run):
    scheme, manifest, run_dir = moe_run
    bits = {"W8A16": 8, "W4A16": 4}[scheme]
    stored = read_tensors(run_dir / "export")
    plan = Plan.load(run_dir / "plan.json")
    for fate in (m for m in plan.modules if m.component == "moe_experts"):
        out_features, in_features = fate.shape
        assert stored[f"{fate.name}.qweight"].dtype == torch.int32
        assert stored[f"{fate.name}.qweight"].shape == (in_features * bits // 32, out_features)
        assert f"{fate.name}.weight" not in stored
        ints = gptq_integers(stored, fate.name, bits)
        assert ints.min() >= -2 ** (bits - 1) and ints.max() < 2 ** (bits - 1) and ints.abs().max() > 0
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in stored)
    # Validation compared every kept tensor (routers included) with the source, bit for bit, and
    # loaded the folder in transformers with nothing missing or unexpected.
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["passed"] and report["structure"]["problems"] == [] and report["load_problems"] == []
    assert report["structure"]["quantized_stored"] == len(plan.quantized)
    assert manifest.reload.missing_keys == [] and manifest.reload.unexpected_keys == []
    assert manifest.reload.vs_in_memory.kl_mean < 0.05  # unfused experts sum in another order
    assert report["quality"]["top1_agreement"] > (0.95 if bits == 8 else 0.5)
    sizes = manifest.sizes
    assert StoredTensors(run_dir / "export").data_bytes() == sizes.export_weights_bytes_estimate  # the plan counts exactly
    assert sizes.export_weights_bytes == pytest.approx(sizes.export_weights_bytes_estimate, rel=0.04)  # + headers
    assert sizes.export_weights_bytes < 0.6 * sizes.source_bf16_bytes_estimate


def test_an_export_that_does_not_hold_what_the_plan_says_is_refused(moe_run):
    _, _, run_dir = moe_run
    plan = Plan.load(run_dir / "plan.json")
    # A plan that thinks the experts stayed BF16 is off by the experts' saving: the check says so.
    bf16_experts = plan.model_copy(update={"modules": [
        m.model_copy(update={"export_bytes": m.bf16_bytes}) if m.component == "moe_experts" else m
        for m in plan.modules]})
    with pytest.raises(ExportIncomplete, match=r"differ from the plan's estimate .* by more than 2%"):
        check_complete(run_dir / "export", bf16_experts, json.loads((run_dir / "manifest.json").read_text())["recipe"]["export"])


@pytest.mark.parametrize(("fields", "message"), [
    ({"export": "compressed-tensors"}, "quantized MoE experts need export: auto-round or gptq"),
])
def test_quantize_experts_errors(fields, message):
    with pytest.raises(RecipeError) as err:
        parse_recipe({"name": "r", "model": "tiny:26b-a4b", "scheme": "W8A16", "quantize_experts": True, **fields},
                     source="r.yaml")
    assert err.value.key == "quantize_experts" and message in str(err.value)
