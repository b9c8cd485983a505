"""GPTQ and auto-round export folders, and RTN through auto-round, on tiny Gemma 4.

The packed formats must hold exactly the integers the compressed-tensors export of the same
quantization holds, load in transformers with every weight accounted for, and name every module
kept in BF16 so that serving stacks leave it alone.
"""

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

from conftest import gptq_integers, read_tensors
from pipeline.formats import FORMATS, kept_problems, scheme_problems
from pipeline.plan import Plan
from pipeline.recipe import RecipeError, parse_recipe
from pipeline.run import quantize_run


def ct_integers(stored: dict, name: str, bits: int) -> torch.Tensor:
    shape = stored[f"{name}.weight_shape"].tolist()
    return unpack_from_int32(stored[f"{name}.weight_packed"], bits, torch.Size(shape)).to(torch.int32)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    done = {}

    def quantize(variant: str, export: str, library: str | None = None, scheme: str = "W4A16"):
        key = (variant, export, library, scheme)
        if key not in done:
            root = tmp_path_factory.mktemp(f"{variant}-{export}")
            recipe = root / "recipe.yaml"
            lines = [f"model: tiny:{variant}", f"scheme: {scheme}", f"export: {export}", f"output_dir: {root / 'run'}",
                     "eval: {samples: 2, seq_len: 64, max_new_tokens: 4}"]
            if scheme == "W4A16":
                lines.append("group_size: 64")
            if library:
                lines.append(f"library: {library}")
            recipe.write_text("\n".join(lines) + "\n")
            done[key] = (quantize_run(recipe, card=False, validate=export != "compressed-tensors"), root / "run")
        return done[key]

    return quantize


@pytest.mark.parametrize("variant", ["e2b", "26b-a4b"])
@pytest.mark.parametrize("export", ["gptq", "auto-round"])
def test_packed_export_holds_the_compressed_tensors_integers(run, variant, export):
    _, ct_dir = run(variant, "compressed-tensors")
    manifest, run_dir = run(variant, export)
    plan = Plan.load(run_dir / "plan.json")
    packed, reference = read_tensors(run_dir / "export"), read_tensors(ct_dir / "export")
    for fate in plan.quantized:
        assert packed[f"{fate.name}.qweight"].dtype == torch.int32
        assert torch.equal(gptq_integers(packed, fate.name, 4), ct_integers(reference, fate.name, 4)), fate.name
        ct_scale = reference[f"{fate.name}.weight_scale"].float()
        assert torch.equal(packed[f"{fate.name}.scales"].float().t(), ct_scale), fate.name  # BF16 scales fit in FP16
        assert (f"{fate.name}.g_idx" in packed) == (export == "gptq")
    # Everything else is stored as in the source (validation compares every tensor) and the export
    # loads in transformers with nothing missing, computing what the in-memory model computed.
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["passed"] and report["structure"]["problems"] == [] and report["load_problems"] == []
    assert report["structure"]["quantized_stored"] == len(plan.quantized)
    # auto-round's kernels compute in their own precision and order (on CPUs without bf16 support
    # they differ the most: KL ~4e-4, a near-tied top-1 flipping); MoE: the reloaded experts run
    # unfused, summing in another order than the fused forward, which moves a few router ties.
    assert manifest.reload.vs_in_memory.kl_mean < (0.05 if variant == "26b-a4b" else 2e-3)
    assert manifest.reload.vs_in_memory.top1_agreement >= 0.95
    # The plan's size estimate for the packed layout holds within 1 %.
    assert manifest.sizes.export_weights_bytes == pytest.approx(manifest.sizes.export_weights_bytes_estimate, rel=0.01)


def test_gptq_config_names_every_kept_module_and_no_quantized_one(run):
    _, run_dir = run("e2b", "gptq")
    plan = Plan.load(run_dir / "plan.json")
    qconfig = json.loads((run_dir / "export" / "config.json").read_text())["quantization_config"]
    assert (qconfig["quant_method"], qconfig["bits"], qconfig["group_size"], qconfig["desc_act"], qconfig["sym"]) == \
        ("gptq", 4, 64, False, True)
    rules = [k[2:] for k in qconfig["dynamic"]]
    assert any("vision_tower" in r for r in rules) and any("audio_tower" in r for r in rules)
    assert kept_problems(qconfig, plan, FORMATS["gptq"]) == []
    # A rule dropped: the PLE projection it kept is named; a rule too wide: the quantized module it catches.
    ple = next(k for k in qconfig["dynamic"] if "per_layer_projection" in k)
    narrowed = {**qconfig, "dynamic": {k: v for k, v in qconfig["dynamic"].items() if k != ple}}
    assert any("per_layer_projection is kept in BF16 but no negative `dynamic` rule matches it" in p
               for p in kept_problems(narrowed, plan, FORMATS["gptq"]))
    widened = {**qconfig, "dynamic": {**qconfig["dynamic"], "-:.*self_attn.*": {}}}
    assert any("q_proj is quantized but the `dynamic` rule" in p for p in kept_problems(widened, plan, FORMATS["gptq"]))


def test_packed_configs_give_each_module_the_plan_s_scheme_as_their_loaders_read_it(run):
    """GPTQ's `dynamic` rules (vLLM's first-match `re.match`) and auto-round's `extra_config` can give one
    module another scheme than the top level: each is read as its loader reads it and held to the plan."""
    for export in ("gptq", "auto-round"):
        _, run_dir = run("e2b", export)
        plan = Plan.load(run_dir / "plan.json")
        qconfig = json.loads((run_dir / "export" / "config.json").read_text())["quantization_config"]
        assert scheme_problems(qconfig, plan, FORMATS[export]) == []
        first = plan.quantized[0].name
        problems = scheme_problems({**qconfig, "group_size": 128}, plan, FORMATS[export])
        assert len(problems) == len(plan.quantized)
        assert f"{first} is planned int4 g64 but quantization_config says int4 g128" in problems
    gptq = json.loads((run("e2b", "gptq")[1] / "export" / "config.json").read_text())["quantization_config"]
    one_at_8 = {**gptq, "dynamic": {f"+:{first.replace('.', '[.]')}$": {"bits": 8}, **gptq["dynamic"]}}
    assert scheme_problems(one_at_8, plan, FORMATS["gptq"]) == [
        f"{first} is planned int4 g64 but quantization_config says int8 g64"]
    skipped = {**gptq, "dynamic": {f"-:{first.replace('.', '[.]')}$": {}, **gptq["dynamic"]}}
    assert scheme_problems(skipped, plan, FORMATS["gptq"]) == [
        f"{first} is planned int4 g64 but quantization_config gives it no scheme"]
    auto_round = json.loads((run_dir / "export" / "config.json").read_text())["quantization_config"]
    kept_at_16 = {**auto_round, "extra_config": {**auto_round["extra_config"], first: {"bits": 16}}}
    assert scheme_problems(kept_at_16, plan, FORMATS["auto-round"]) == [
        f"{first} is planned int4 g64 but quantization_config gives it no scheme"]
    unreadable = {k: v for k, v in auto_round.items() if k != "sym"}
    assert all("cannot be read (KeyError" in p for p in scheme_problems(unreadable, plan, FORMATS["auto-round"]))


def test_gptq_card_says_how_to_load_it(run):
    from pipeline.card import write_card

    _, run_dir = run("e2b", "gptq")
    write_card(run_dir)
    card = (run_dir / "export" / "README.md").read_text()
    assert "stored in the GPTQ layout" in card and "one FP16 scale per group of 64" in card
    assert "from transformers import AutoModelForImageTextToText, AutoTokenizer, AutoRoundConfig" in card
    assert "quantization_config=AutoRoundConfig())" in card and "pip install compressed-tensors" not in card


def test_auto_round_config_keeps_what_the_plan_keeps(run):
    _, run_dir = run("26b-a4b", "auto-round")
    plan = Plan.load(run_dir / "plan.json")
    qconfig = json.loads((run_dir / "export" / "config.json").read_text())["quantization_config"]
    assert (qconfig["quant_method"], qconfig["packing_format"], qconfig["block_name_to_quantize"]) == \
        ("auto-round", "auto_round:auto_gptq", ["model.language_model.layers"])
    kept = {m.name for m in plan.modules if not m.quantize and m.kind in ("linear", "experts")}
    assert {n for n, c in qconfig["extra_config"].items() if c["bits"] == 16} == kept
    assert any(name.endswith(".experts") for name in kept) and any(name.endswith("router.proj") for name in kept)


def test_rtn_through_auto_round_is_auto_rounds_grid(run):
    """auto-round's symmetric RTN is llama.cpp's full-range one: scale = ±absmax / 2^(b-1), signed so
    that the group's extreme lands on -2^(b-1); llmcompressor's is absmax / ((2^b - 1) / 2). Its run
    goes through the same export and reload checks as every backend."""
    manifest, run_dir = run("e2b", "compressed-tensors", library="auto-round")
    _, llmc_dir = run("e2b", "compressed-tensors")
    assert (manifest.algorithm, manifest.library) == ("rtn", "auto-round")
    assert manifest.reload.vs_in_memory.max_abs_diff == 0.0  # compressed-tensors reloads bit-exact
    plan = Plan.load(run_dir / "plan.json")
    stored, llmc = read_tensors(run_dir / "export"), read_tensors(llmc_dir / "export")
    from pipeline.model import ModelSpec, resolve

    source = read_tensors(resolve(ModelSpec(id="tiny:e2b")).path)
    for fate in plan.quantized[:8]:
        weight = source[f"{fate.name}.weight"].float()
        absmax = weight.reshape(weight.shape[0], -1, 64).abs().amax(-1)
        scale = stored[f"{fate.name}.weight_scale"].float()
        torch.testing.assert_close(scale.abs(), absmax / 8, rtol=2 ** -7, atol=0)
        groups = weight.reshape(weight.shape[0], -1, 64)
        clear = (groups.amax(-1) - groups.amin(-1).abs()).abs() > 0.01 * absmax  # no near-ties (BF16 rounding)
        assert torch.equal((scale < 0)[clear], (groups.amax(-1) > groups.amin(-1).abs())[clear])  # extreme -> -8
        torch.testing.assert_close(llmc[f"{fate.name}.weight_scale"].float(), absmax / 7.5, rtol=2 ** -7, atol=0)
        ints = ct_integers(stored, fate.name, 4)
        assert ints.min() >= -8 and ints.max() <= 7
    assert not (run_dir.parent / "ar_work_space").exists()


@pytest.mark.parametrize(("fields", "key", "message"), [
    ({"algorithm": "autoround", "library": "llmcompressor"}, "library", "autoround runs on auto-round, not llmcompressor"),
    ({"algorithm": "gptq", "library": "auto-round"}, "library", "gptq runs on llmcompressor, not auto-round"),
    ({"library": "torchao"}, "library", "allowed: 'llmcompressor' or 'auto-round'"),
])
def test_library_errors(fields, key, message):
    with pytest.raises(RecipeError) as err:
        parse_recipe({"name": "r", "model": "tiny:e2b", "scheme": "W4A16", **fields}, source="r.yaml")
    assert err.value.key == key and message in str(err.value)
