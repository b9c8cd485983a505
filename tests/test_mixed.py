"""Mixed precision: `overrides:` rules resolve per module on every Gemma 4 shape, bad rules fail
with the file, the key and the fix, and a mixed export stores and reloads what the plan says."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

from pipeline.model import build_meta_model
from pipeline.plan import Plan, build_plan
from pipeline.recipe import RecipeError, load_recipe, parse_recipe
from pipeline.run import PLAN, make_plan, quantize_run
from pipeline.tiny import tiny_config

from conftest import VARIANTS

PREFIX = "model.language_model.layers"


def _plan(variant: str, overrides: list[dict], **fields) -> tuple[Plan, object]:
    config = AutoConfig.for_model(**tiny_config(variant))
    recipe = parse_recipe({"name": "t", "model": f"tiny:{variant}", "scheme": "W4A16", "group_size": 64,
                           "overrides": overrides, **fields})
    return build_plan(build_meta_model(config), config, recipe), config.get_text_config()


@pytest.mark.parametrize("variant", VARIANTS)
def test_overrides_resolve_per_module(variant):
    rules = [
        {"layer_type": "sliding_attention", "bits": 3},
        {"layer_type": "full_attention", "submodule": "mlp", "bits": 8, "group_size": None},
        {"layers": 0, "submodule": "o_proj", "skip": True},
        # q/k/v together: vLLM fuses them into one layer with one scheme (a split is refused)
        {"regex": rf"{PREFIX.replace('.', '[.]')}\.1\.self_attn\.[qkv]_proj", "symmetric": False},
    ]
    ple = variant in ("e2b", "e4b")
    if ple:
        rules.append({"submodule": "per_layer_projection", "layers": "1-2", "bits": 8, "group_size": None})
    plan, text = _plan(variant, rules)
    sliding, full = text.layer_types.index("sliding_attention"), text.layer_types.index("full_attention")
    assert sliding == 0 and full > 1
    by_name = {m.name: m for m in plan.modules}

    def scheme(name: str):
        m = by_name[name]
        return (m.bits, m.group_size, m.symmetric) if m.quantize else m.reason

    assert scheme(f"{PREFIX}.{sliding}.self_attn.q_proj") == (3, 64, True)
    assert scheme(f"{PREFIX}.{sliding}.mlp.down_proj") == (3, 64, True)
    assert scheme(f"{PREFIX}.0.self_attn.o_proj") == "recipe: overrides.2 skip"
    assert scheme(f"{PREFIX}.1.self_attn.q_proj") == (3, 64, False)  # later rule changes one field only
    assert scheme(f"{PREFIX}.1.self_attn.o_proj") == (3, 64, True)
    assert scheme(f"{PREFIX}.{full}.self_attn.q_proj") == (4, 64, True)  # no rule: the recipe's scheme
    assert scheme(f"{PREFIX}.{full}.mlp.gate_proj") == (8, None, True)
    assert scheme(f"{PREFIX}.{full}.mlp.down_proj") == (8, None, True)
    if ple:
        assert scheme(f"{PREFIX}.1.per_layer_projection") == (8, None, True)
        assert scheme(f"{PREFIX}.2.per_layer_projection") == (8, None, True)
        assert scheme(f"{PREFIX}.3.per_layer_projection") == "Per-Layer-Embedding"
        # A rule selecting by layer type alone does not pull the PLE companions into quantization.
        assert scheme(f"{PREFIX}.0.per_layer_input_gate") == "Per-Layer-Embedding"
    if variant == "26b-a4b":
        assert not by_name[f"{PREFIX}.0.experts"].quantize
    # Every decoder linear is accounted for: by layer type, MLP on full layers, the skip, the default.
    for m in plan.modules:
        if m.component == "text_decoder" and m.quantize:
            expected_bits = 3 if m.layer_type == "sliding_attention" else 8 if m.submodule.endswith(
                ("gate_proj", "up_proj", "down_proj")) else 4
            assert m.bits == expected_bits, m.name
    # The plan's groups: one per scheme, sizes per module from that module's scheme.
    groups = plan.schemes()
    assert sum(map(len, groups.values())) == len(plan.quantized) and len(groups) == 4
    assert plan.mixed and any("int3" in note for note in plan.serving_notes())
    assert {row["scheme"] for row in plan.summary() if row["fate"] == "quantize"} == {s.label for s in groups}
    q = by_name[f"{PREFIX}.{sliding}.self_attn.q_proj"]
    out_features, in_features = q.shape
    assert q.export_bytes == out_features * in_features * 3 // 8 + out_features * in_features // 64 * 2 + 16


def test_uniform_recipe_keeps_one_group_and_the_recipe_scheme():
    plan, _ = _plan("e2b", [])
    assert not plan.mixed and list(plan.schemes()) == [plan.default_scheme]
    assert all((m.bits, m.group_size, m.symmetric) == (4, 64, True) for m in plan.quantized)
    assert plan.serving_notes() == []


@pytest.mark.parametrize("variant, overrides, skip, key, fragment", [
    ("31b", [{"submodule": "k_proj", "bits": 8}], [], "overrides",
     "model.language_model.layers.0.self_attn: q_proj int4 g128, k_proj int8 g128, v_proj int4 g128; vLLM fuses "
     "q_proj/k_proj/v_proj into one qkv_proj layer"),
    ("e2b", [], ["re:.*layers\\.1\\.mlp\\.up_proj$"], "skip", "layers.1.mlp: gate_proj int4 g128, up_proj BF16"),
    ("12b", [], ["re:.*layers\\.5\\.self_attn\\.k_proj$"], "skip",
     "layers.5.self_attn: q_proj int4 g128, k_proj BF16; vLLM fuses q_proj/k_proj into one qkv_proj"),
])
def test_a_fused_projection_split_across_schemes_is_refused_naming_why(write_recipe, variant, overrides, skip, key,
                                                                       fragment):
    """vLLM fuses q/k/v (q/k on `k_eq_v` layers) and gate/up into one layer that takes one scheme."""
    path = write_recipe("split", model=f"tiny:{variant}", scheme="W4A16", overrides=overrides, skip=skip)
    with pytest.raises(RecipeError) as err:
        make_plan(load_recipe(path), path)
    assert err.value.key == key and fragment in str(err.value), str(err.value)
    if skip:  # llama.cpp does not fuse them (a GGUF takes no per-module bits, so only a kept shard)
        gguf = write_recipe("split-gguf", model=f"tiny:{variant}", scheme="W4A16", group_size=32, skip=skip,
                            export="gguf")
        make_plan(load_recipe(gguf), gguf)


def test_v_proj_on_a_k_eq_v_layer_is_refused_naming_why(write_recipe):
    path = write_recipe("v", model="tiny:12b", scheme="W4A16",
                        overrides=[{"layer_type": "full_attention", "submodule": "v_proj", "bits": 8}])
    with pytest.raises(RecipeError) as err:
        make_plan(load_recipe(path), path)
    assert err.value.key == "overrides.0" and "full_attention layers here have no v_proj: with attention_k_eq_v, " \
        "V reuses K's projection" in str(err.value)


@pytest.mark.parametrize("overrides, key, fragment", [
    ([{"bits": 3}], "overrides.0", "a rule needs at least one selection key: layer_type, submodule, layers, regex"),
    ([{"layers": "0-3", "skip": True, "bits": 3}], "overrides.0.bits", "conflicts with skip: true"),
    ([{"layers": "0-3"}], "overrides.0.bits", "the rule sets nothing"),
    ([{"layers": "7-3", "bits": 3}], "overrides.0.layers", 'expected layer indices or ranges like "0-7"'),
    ([{"layers": 1, "bits": 5}], "overrides.0.bits", "allowed: 2, 3, 4 or 8"),
    ([{"layer_type": "global", "bits": 4}], "overrides.0.layer_type.0", "'sliding_attention' or 'full_attention'"),
    ([{"submodule": "qkv", "bits": 4}], "overrides.0.submodule", "unknown sub-module; allowed: attention, mlp, ple"),
    ([{"submodule": "experts", "bits": 4}], "overrides.0.submodule", "MoE experts are quantized as a whole with `quantize_experts: true`"),
    ([{"regex": "(", "bits": 4}], "overrides.0.regex", "not a valid regular expression"),
    ([{"layers": 1, "bits": 8}, {"layers": 2, "bitz": 4}], "overrides.1.bitz", "unknown key; allowed keys here: bits, "),
])
def test_bad_overrides_fail_at_schema_time(write_recipe, overrides, key, fragment):
    path = write_recipe("bad", model="tiny:e2b", scheme="W4A16", overrides=overrides)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.key == key and str(err.value).startswith(f"{path}: {key}: ") and fragment in str(err.value)


@pytest.mark.parametrize("export", ["gptq", "auto-round"])
def test_packed_exports_cannot_express_per_module_bits(write_recipe, export):
    path = write_recipe("packed", model="tiny:e2b", scheme="W4A16", export=export,
                        overrides=[{"layer_type": "sliding_attention", "bits": 3}])
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.key == "export" and f"the {export} format holds one bit width" in str(err.value)


@pytest.mark.parametrize("overrides, key, fragment", [
    # Layer 0 is a sliding layer: both keys together select nothing.
    ([{"layer_type": "full_attention", "layers": 0, "bits": 3}], "overrides.0",
     "selects no module of tiny:e2b (layer_type full_attention, layers 0); layer types here: full_attention, "
     "sliding_attention"),
    # KV-shared layers of E2B own no k_proj.
    ([{"submodule": "k_proj", "layers": "8-9", "bits": 3}], "overrides.0", "selects no module of tiny:e2b "
     "(submodule k_proj, layers 8-9); sub-modules here: down_proj, gate_proj, k_proj"),
    ([{"regex": "q_proj", "bits": 3}], "overrides.0", "the regex must match a whole name, e.g. model."),
    ([{"layers": "8-12", "bits": 3}], "overrides.0.layers", "tiny:e2b has 10 decoder layers (0-9); no layer 10-12"),
    # Conflicting rules: the second undoes everything the first sets.
    ([{"layer_type": "sliding_attention", "bits": 3}, {"layers": "0-9", "bits": 8}], "overrides.0",
     "has no effect: every module it selects (layer_type sliding_attention) gets its bits from later rules "
     "(overrides.1)"),
])
def test_rules_that_do_not_fit_the_model_fail_at_plan_time(write_recipe, overrides, key, fragment):
    path = write_recipe("misfit", model="tiny:e2b", scheme="W4A16", overrides=overrides)
    recipe = load_recipe(path)  # the schema accepts them ...
    with pytest.raises(RecipeError) as err:  # ... the model's module tree does not
        make_plan(recipe, path)
    assert err.value.key == key and str(err.value).startswith(f"{path}: {key}: ") and fragment in str(err.value)


def _stored(folder) -> dict[str, torch.Size]:
    shapes = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    return shapes


@pytest.mark.parametrize("variant", ["e2b", "26b-a4b"])
def test_mixed_export_reloads_and_stores_the_planned_bits(write_recipe, variant):
    overrides = [
        {"layer_type": "sliding_attention", "bits": 3},
        {"submodule": "attention", "layers": "0-1", "bits": 8, "group_size": None},
        {"submodule": "mlp", "layer_type": "full_attention", "bits": 2, "group_size": 32, "symmetric": False},
    ]
    if variant == "e2b":
        overrides.append({"submodule": "ple", "layers": "0-3", "bits": 8, "group_size": None})
    path = write_recipe(f"mixed-{variant}", model=f"tiny:{variant}", scheme="W4A16", group_size=64,
                        overrides=overrides, eval={"samples": 2, "seq_len": 64, "max_new_tokens": 2})
    manifest = quantize_run(path)
    run = load_recipe(path).run_dir
    # Reloaded with transformers: every key accounted for, logits equal to the in-memory quantized model's.
    assert manifest.status == "validated"
    assert manifest.reload.vs_in_memory.max_abs_diff == 0.0
    plan = Plan.load(run / PLAN)
    assert {s.bits for s in plan.schemes()} == {2, 3, 4, 8}
    config = json.loads((run / "export" / "config.json").read_text())["quantization_config"]
    # One config group per scheme, naming exactly the plan's modules of that scheme.
    stored_groups = {(g["weights"]["num_bits"], g["weights"]["group_size"], g["weights"]["symmetric"]):
                     sorted(g["targets"]) for g in config["config_groups"].values()}
    assert stored_groups == {(s.bits, s.group_size, s.symmetric): sorted(names) for s, names in plan.schemes().items()}
    # The tensors themselves: packed width from the bits, scale width from the group size, zero points
    # only where asymmetric.
    shapes = _stored(run / "export")
    for m in plan.quantized:
        out_features, in_features = m.shape
        assert shapes[f"{m.name}.weight_packed"] == [out_features, math.ceil(in_features * m.bits / 32)], m.name
        groups = in_features // m.group_size if m.group_size else 1
        assert shapes[f"{m.name}.weight_scale"] == [out_features, groups], m.name
        assert (f"{m.name}.weight_zero_point" in shapes) == (not m.symmetric), m.name
    eval_report = json.loads((run / "eval.json").read_text())
    expected_bits = sum(m.params * m.bits for m in plan.quantized) / sum(m.params for m in plan.quantized)
    # Measured bits per quantized parameter: the weights' own bits plus scales (and zero points).
    assert expected_bits < eval_report["sizes"]["bits_per_quantized_param"] < expected_bits + 1.2
    assert abs(manifest.sizes.export_weights_bytes - plan.export_bytes) / plan.export_bytes < 0.02
    # The model card says what is mixed and what vLLM cannot serve.
    card = (run / "export" / "README.md").read_text()
    assert "quantized to mixed 8/4/3/2-bit integers (W4A16 by default" in card
    assert f"| mixed precision | {', '.join(f'{s.label} × {len(n)}' for s, n in plan.schemes().items())} modules" in card
    assert "int2/int3 weights: vLLM's kernels serve int4 and int8 only" in card


@pytest.mark.parametrize(("algorithm", "library"), [("gptq", None), ("autoround", None), ("rtn", "auto-round")])
def test_each_pass_quantizes_each_module_on_its_planned_grid(write_recipe, algorithm, library):
    """Every pass reads each module's scheme from the plan, not the recipe's: the stored integers of a
    3-bit module span at most 8 levels, of a 8-bit per-channel module more than 16, and the export
    reloads exactly. (auto-round's RTN once took the recipe's 4 bits for every module.)"""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    more = {"library": library} if library else {}
    path = write_recipe(f"mixed-{algorithm}-{library or 'default'}", model="tiny:e2b", scheme="W4A16", group_size=64,
                        algorithm=algorithm, **more,
                        autoround={"iters": 2, "batch_size": 2}, calibration={"samples": 2, "seq_len": 32},
                        overrides=[{"layer_type": "sliding_attention", "bits": 3},
                                   {"layer_type": "full_attention", "submodule": "mlp", "bits": 8, "group_size": None}])
    manifest = quantize_run(path, validate=False, card=False)
    assert manifest.reload.vs_in_memory.max_abs_diff == 0.0
    run = load_recipe(path).run_dir
    plan = Plan.load(run / PLAN)
    with safe_open(run / "export" / "model.safetensors", "pt") as f:
        for m in plan.quantized:
            ints = unpack_from_int32(f.get_tensor(f"{m.name}.weight_packed"), m.bits, torch.Size(m.shape))
            assert -(2 ** (m.bits - 1)) <= ints.min() and ints.max() <= 2 ** (m.bits - 1) - 1, m.name
            levels = ints.unique().numel()
            assert levels <= 2 ** m.bits and (m.bits < 8 or levels > 16), (m.name, levels)


def test_a_plan_written_before_per_module_schemes_loads_with_the_plan_scheme(tmp_path):
    plan, _ = _plan("e2b", [])
    data = json.loads(plan.model_dump_json())
    for m in data["modules"]:
        del m["bits"], m["group_size"], m["symmetric"]
    (tmp_path / "plan.json").write_text(json.dumps(data))
    old = Plan.load(tmp_path / "plan.json")
    assert old == plan and not old.mixed
