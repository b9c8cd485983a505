"""The plan classifies every module of each Gemma 4 shape and estimates sizes that hold."""

import re

import pytest
from transformers import AutoConfig

from pipeline.model import build_meta_model, resolve
from pipeline.plan import Plan, build_plan, component_of
from pipeline.recipe import ModelSpec, parse_recipe
from pipeline.tiny import full_config, tiny_config

from conftest import VARIANTS

DECODER = re.compile(r"^model\.language_model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")
EXPECTED_COMPONENT = [
    (re.compile(r"^model\.vision_tower\."), "vision"),
    (re.compile(r"^model\.audio_tower\."), "audio"),
    (re.compile(r"^model\.embed_(vision|audio)\.embedding_projection$"), "projector"),
    (re.compile(r"^model\.language_model\.(per_layer_model_projection|layers\.\d+\.per_layer_(input_gate|projection))$"), "ple"),
    (re.compile(r"^lm_head$"), "lm_head"),
    (re.compile(r"^model\.language_model\.layers\.\d+\.router\.proj$"), "moe_router"),
    (DECODER, "text_decoder"),
]


def _plan(cfg: dict, **recipe_fields) -> tuple[Plan, object]:
    config = AutoConfig.for_model(**cfg)
    recipe = parse_recipe({"name": "t", "model": "tiny:e2b", "scheme": "W4A16", **recipe_fields})
    return build_plan(build_meta_model(config), config, recipe), config


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_linear_classified_by_name(variant):
    plan, config = _plan(tiny_config(variant), group_size=64)
    linears = [m for m in plan.modules if m.kind == "linear"]
    for m in linears:
        expected = [c for pattern, c in EXPECTED_COMPONENT if pattern.search(m.name)]
        assert expected[:1] == [m.component], m.name
        assert m.quantize == (m.component == "text_decoder"), m.name
    # Text decoder linears carry their layer's attention type from the config.
    for m in linears:
        if m.component == "text_decoder":
            layer = int(DECODER.match(m.name).group(1))
            assert m.layer_type == config.text_config.layer_types[layer]
    names = {m.name for m in linears}
    text = config.text_config
    if text.num_kv_shared_layers:
        first_shared = text.num_hidden_layers - text.num_kv_shared_layers
        # KV-shared layers read another layer's K/V: they own no k_proj / v_proj to quantize.
        for layer in range(text.num_hidden_layers):
            has_kv = f"model.language_model.layers.{layer}.self_attn.k_proj" in names
            assert has_kv == (layer < first_shared)
    if text.attention_k_eq_v:
        for layer, kind in enumerate(text.layer_types):
            has_v = f"model.language_model.layers.{layer}.self_attn.v_proj" in names
            assert has_v == (kind == "sliding_attention")
    assert ("ple" in {m.component for m in linears}) == bool(text.hidden_size_per_layer_input)
    assert ("audio" in {m.component for m in linears}) == (config.audio_config is not None)


def test_moe_experts_and_router_kept_and_counted_separately():
    plan, config = _plan(tiny_config("26b-a4b"), group_size=64)
    experts = [m for m in plan.modules if m.component == "moe_experts"]
    assert [m.name for m in experts] == [f"model.language_model.layers.{i}.experts" for i in range(6)]
    text = config.text_config
    per_layer = text.num_experts * 3 * text.hidden_size * text.moe_intermediate_size
    assert all(m.kind == "experts" and not m.quantize and m.params == per_layer for m in experts)
    routers = [m for m in plan.modules if m.component == "moe_router"]
    assert len(routers) == 6 and not any(m.quantize for m in routers)
    # Fused experts are ignored both as the fused module and as vLLM's / llmcompressor's per-expert linears.
    assert "model.language_model.layers.0.experts" in plan.ignore
    pattern = next(p for p in plan.ignore if p.startswith("re:") and "layers\\.0\\.experts" in p)
    assert re.fullmatch(pattern[3:], "model.language_model.layers.0.experts.17.down_proj")


def test_indivisible_widths_are_kept_with_the_reason():
    # 26B-A4B's MLP is 2112 wide in the real model (192 in the tiny one): not a multiple of 128.
    plan, _ = _plan(tiny_config("26b-a4b"), group_size=128)
    downs = [m for m in plan.modules if m.name.endswith("mlp.down_proj")]
    assert downs and all(not m.quantize and m.reason == "shape: in 192 % group 128 != 0" for m in downs)
    assert all(m.name in plan.ignore for m in downs)
    plan64, _ = _plan(tiny_config("26b-a4b"), group_size=64)
    assert all(m.quantize for m in plan64.modules if m.name.endswith("mlp.down_proj"))


def test_recipe_skip_by_name_and_regex():
    plan, _ = _plan(tiny_config("31b"), skip=["re:.*layers\\.0\\..*", "model.language_model.layers.5.mlp.down_proj"])
    skipped = {m.name: m.reason for m in plan.modules if m.component == "text_decoder" and not m.quantize}
    assert set(skipped) == {n for n in skipped if ".layers.0." in n} | {"model.language_model.layers.5.mlp.down_proj"}
    assert len([n for n in skipped if ".layers.0." in n]) == 7
    assert skipped["model.language_model.layers.5.mlp.down_proj"] == "recipe: skip model.language_model.layers.5.mlp.down_proj"


def test_tied_lm_head_stored_once():
    plan, _ = _plan(tiny_config("e2b"))
    head = next(m for m in plan.modules if m.name == "lm_head")
    assert head.tied_to == "model.language_model.embed_tokens" and head.bf16_bytes == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_estimate_matches_the_source_checkpoint(variant):
    source = resolve(ModelSpec(id=f"tiny:{variant}"))
    plan, _ = _plan(tiny_config(variant))
    on_disk = sum(p.stat().st_size for p in source.path.glob("*.safetensors"))
    assert abs(plan.bf16_bytes - on_disk) / on_disk < 0.01


# Sizes of real full-size exports measured with llmcompressor RTN on an H100
# (shared/notes/gemma4-quantization-findings.md): E2B W4A16 g128 7.48 GB, W8A16 8.38 GB (group 128).
@pytest.mark.parametrize("scheme, group_size, measured_gb", [("W4A16", 128, 7.48), ("W8A16", 128, 8.38)])
def test_full_size_e2b_estimate_matches_measured_export(scheme, group_size, measured_gb):
    plan, _ = _plan(full_config("e2b"), scheme=scheme, group_size=group_size)
    assert abs(plan.export_bytes / 1e9 - measured_gb) / measured_gb < 0.01


@pytest.mark.parametrize("variant, decoder_linears", [("e2b", 205), ("e4b", 258), ("31b", 410), ("26b-a4b", 205)])
def test_full_size_counts(variant, decoder_linears):
    plan, _ = _plan(full_config(variant), group_size=64)
    assert sum(m.component == "text_decoder" for m in plan.modules) == decoder_linears


def test_component_rules_on_text_only_names():
    assert component_of("model.layers.3.self_attn.q_proj") == "text_decoder"
    assert component_of("model.embed_tokens") == "embedding"
    assert component_of("lm_head") == "lm_head"


def test_plan_round_trips_through_json(tmp_path):
    plan, _ = _plan(tiny_config("e4b"))
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again == plan and again.ignore == plan.ignore
