"""QAT repack: weights already on a 4-bit grid come back as exactly those integers and scales."""

import json
import shutil

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from transformers import AutoModelForImageTextToText, AutoTokenizer

from pipeline import reload as reloading
from pipeline.model import ModelSpec, build_meta_model, load_config, resolve, sidecar_files
from pipeline.plan import build_plan
from pipeline.quantize.qat_repack import OffGrid, fit_grid
from pipeline.recipe import parse_recipe
from pipeline.run import quantize_run

from conftest import read_tensors

GROUP = 32


def ggml_q4_0(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGML's q4_0, written out here: per group of 32, d = (value of largest magnitude, signed) / -8,
    q = round(w / d) clamped to [-8, 7]; the BF16 weight on the grid is q * d."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // GROUP, GROUP)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))
    d = (extreme / -8).bfloat16().float()
    q = torch.clamp(torch.round(groups / d), -8, 7)
    return (q.reshape(out_features, in_features).to(torch.int8), d.squeeze(-1).bfloat16(),
            (q * d).bfloat16().reshape(out_features, in_features))


def grid_source(variant: str, folder, nudge: str | None = None) -> dict:
    """A tiny Gemma 4 whose planned linears the test put on the q4_0 grid, saved as a local checkpoint.
    `nudge`: one weight of that module moved 0.3 of a step off its grid point."""
    source = resolve(ModelSpec(id=f"tiny:{variant}"))
    config = load_config(source)
    recipe = parse_recipe({"name": "grid", "model": f"tiny:{variant}", "scheme": "W4A16", "algorithm": "qat-repack"})
    plan = build_plan(build_meta_model(config), config, recipe)
    model = AutoModelForImageTextToText.from_pretrained(source.path, dtype=torch.bfloat16)
    grids = {}
    with torch.no_grad():
        for m in plan.quantized:
            module = model.get_submodule(m.name)
            ints, d, on_grid = ggml_q4_0(module.weight)
            if m.name == nudge:
                on_grid[3, 5] = on_grid[3, 5] + 0.3 * d[3, 0].abs()
            module.weight.copy_(on_grid)
            grids[m.name] = (ints, d)
    model.save_pretrained(folder)
    for path in sidecar_files(source):
        if not (folder / path.name).exists():
            shutil.copy2(path, folder / path.name)
    return grids


def _repack(tmp_path, source, validate: bool = False) -> tuple[dict, object]:
    recipe = tmp_path / "repack.yaml"
    recipe.write_text(f"model: {source}\nscheme: W4A16\nalgorithm: qat-repack\noutput_dir: {tmp_path / 'run'}\n"
                      f"eval: {{samples: 2, seq_len: 64, max_new_tokens: 4}}\n")
    return quantize_run(recipe, validate=validate, card=validate), tmp_path / "run" / "export"


@pytest.mark.parametrize("variant", ["e2b", "26b-a4b", "12b"])
def test_repack_recovers_the_integers_and_scales_exactly(tmp_path, variant, monkeypatch):
    # Exactness is in the stored dtype: the grid model holds BF16(q·d), and float32 would dequantize the
    # export to q·d itself. So the run measures in BF16, as on a CPU with bf16 instructions.
    monkeypatch.setattr("pipeline.compute.cpu_computes_bf16", lambda: True)
    source = tmp_path / "grid-source"
    grids = grid_source(variant, source)
    manifest, export = _repack(tmp_path, source, validate=variant == "e2b")

    qconfig = json.loads((export / "config.json").read_text())["quantization_config"]
    weights = qconfig["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, GROUP, True)

    stored = read_tensors(export)
    for name, (ints, d) in grids.items():
        shape = torch.Size(stored[f"{name}.weight_shape"].tolist())
        assert torch.equal(unpack_from_int32(stored[f"{name}.weight_packed"], 4, shape), ints), name
        assert torch.equal(stored[f"{name}.weight_scale"], d), name

    report = manifest.quantize_report.qat_repack.model_dump()
    assert report["tensors"] == len(grids) and report["off_grid_groups"] == 0
    assert report["identical_share"] == 1.0 and report["worst_relative_error"] == 0.0
    # q4_0 puts each group's extreme at -8: groups whose extreme is positive need a negative scale.
    assert 0.3 < report["negative_scale_groups"] / report["groups"] < 0.7

    # The reloaded export computes exactly what the grid model computes.
    probe = reloading.probe_input_ids(AutoTokenizer.from_pretrained(source))
    grid_logits = reloading.logits(AutoModelForImageTextToText.from_pretrained(source, dtype=torch.bfloat16), probe)
    reloaded = reloading.logits(AutoModelForImageTextToText.from_pretrained(export, dtype=torch.bfloat16), probe)
    assert torch.equal(grid_logits, reloaded)
    assert manifest.reload.vs_unquantized.max_abs_diff == 0.0
    if variant == "e2b":
        assert manifest.validation.passed
        assert json.loads((tmp_path / "run" / "eval.json").read_text())["quality"]["kl_mean"] == 0.0
        card = (export / "README.md").read_text()
        assert "QAT repack (the source's own 4-bit grid, recovered exactly)" in card


def test_a_weight_nudged_off_the_grid_fails_the_repack_by_name(tmp_path):
    victim = "model.language_model.layers.2.mlp.up_proj"
    source = tmp_path / "grid-source"
    grid_source("e2b", source, nudge=victim)
    with pytest.raises(OffGrid, match=rf"^1 tensors do not lie on a 4-bit grid with groups of 32, so qat-repack would "
                                      rf"not be lossless: {victim}: 1 of \d+ groups off the grid, worst at row 3 "
                                      rf"group 0: 0\.03\d+ of the group's largest magnitude"):
        _repack(tmp_path, source)
    assert not (tmp_path / "run" / "export").exists()


def test_fit_reports_bf16_rounding_apart_from_off_grid_values():
    """A grid whose scale has more precision than BF16 (d in float32, q * d rounded once to BF16)
    has no BF16 scale that reproduces every value: on the grid, not bit-identical, error within rounding."""
    torch.manual_seed(0)
    q = torch.randint(-8, 8, (16, 64)).float()
    q[:, 0] = -8
    q[:, GROUP] = -8
    d = torch.rand(16, 1) * 0.02 + 0.001
    weight = (q * d.repeat_interleave(64, 1)).bfloat16()
    fit = fit_grid("w", weight, 4, GROUP)
    assert fit.off_grid_groups == 0 and torch.equal(fit.ints, q.to(torch.int8))
    assert fit.identical_values < fit.values and 0 < fit.worst_relative_error <= 2 ** -7


def test_qat_repack_recipe_defaults_to_gemma_qat_groups_and_needs_no_data():
    recipe = parse_recipe({"name": "r", "model": "tiny:e2b", "scheme": "W4A16", "algorithm": "qat-repack"})
    assert recipe.group_size == GROUP and not recipe.calibrated and recipe.runs_on == "gemma-quant"
    assert parse_recipe({"name": "r", "model": "tiny:e2b", "scheme": "W4A16", "algorithm": "qat-repack",
                         "group_size": 64}).group_size == 64
