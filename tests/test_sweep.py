"""`gemma-quant sweep`: policies on one tiny model, compared in a table, a JSON file and a plot."""

import json

import pytest

from pipeline.cli import main
from pipeline.recipe import RecipeError, parse_recipe
from pipeline.rundir import RUN_MARK
from pipeline.sweep import resolve_policies


def test_sweep_writes_one_row_per_policy_with_sizes_ordered_by_bits(write_recipe, tmp_path, capsys):
    path = write_recipe("sweep-tiny", model="tiny:31b", scheme="W4A16", group_size=64)
    assert main(["sweep", str(path), "--bits", "8,4,3", "--policies", "sliding3-full4,mlp4-attn8",
                 "--eval-samples", "2", "--eval-seq-len", "32"]) == 0
    out_dir = tmp_path / "runs" / "sweep-tiny" / "sweep"
    results = {r["policy"]: r for r in json.loads((out_dir / "sweep.json").read_text())["results"]}
    order = ["uniform-8", "uniform-4", "uniform-3", "sliding3-full4", "mlp4-attn8"]
    assert list(results) == order
    rows = [line for line in (out_dir / "sweep.md").read_text().splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == order
    png = (out_dir / "sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    # the policies' exports are removed once measured; the mark of a gemma-quant run stays
    assert [p.name for p in out_dir.glob(".*")] == [RUN_MARK]
    size = {name: r["weights_bytes"] for name, r in results.items()}
    error = {name: r["weight_error"] for name, r in results.items()}
    assert size["uniform-8"] > size["uniform-4"] > size["sliding3-full4"] > size["uniform-3"]
    assert error["uniform-8"]["all"] < error["uniform-4"]["all"] < error["uniform-3"]["all"]
    # The same RTN grid on the same weights: the mixed policy's error per layer type is the uniform one's.
    assert error["sliding3-full4"]["sliding_attention"] == pytest.approx(error["uniform-3"]["sliding_attention"])
    assert error["sliding3-full4"]["full_attention"] == pytest.approx(error["uniform-4"]["full_attention"])
    assert results["mlp4-attn8"]["mix"] == {"int8 per-channel": 23, "int4 g64": 18}  # 6 layers × 3 MLP; q,k,o + v on sliding
    assert all(0 <= r["top1_agreement"] <= 1 and r["kl_mean"] >= 0 for r in results.values())
    assert results["uniform-8"]["kl_mean"] < results["uniform-3"]["kl_mean"]
    assert "uniform-8" in capsys.readouterr().out


def test_sweep_policy_names_are_checked(capsys):
    recipe = parse_recipe({"name": "x", "model": "tiny:e2b", "scheme": "W4A16",
                           "overrides": [{"layer_type": "full_attention", "bits": 8, "group_size": None}]})
    with pytest.raises(RecipeError, match="unknown policy 'uniform-5'; known: uniform-8"):
        resolve_policies(["uniform-5"], None, recipe)
    with pytest.raises(RecipeError, match="bits: got 5; allowed: 2, 3, 4, 8"):
        resolve_policies(None, [5], recipe)
    with pytest.raises(SystemExit):
        main(["sweep", "x.yaml", "--gguf", "Q4_0,Q3_X"])
    own = resolve_policies(["recipe"], None, recipe)[0]
    assert own.overrides == [{"layer_type": ["full_attention"], "bits": 8, "group_size": None}]
    assert "unknown GGUF type 'Q3_X'; known: BF16" in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_mixed_policy_beats_uniform_int4_on_real_weights(tmp_path):
    """The real Gemma 3 270M: the shipped attn8-full8 mix against uniform int4 RTN (about 1 minute idle)."""
    from pipeline.recipe import RECIPES_DIR, load_recipe
    from pipeline.sweep import run_sweep

    recipe = load_recipe(RECIPES_DIR / "gemma3-270m-mixed-attn8-full8.yaml")
    results = run_sweep(RECIPES_DIR / "gemma3-270m-mixed-attn8-full8.yaml",
                        resolve_policies(["uniform-4", "recipe"], None, recipe), tmp_path, 2, 128)
    uniform, mixed = results
    assert mixed.kl_mean < 0.6 * uniform.kl_mean and mixed.top1_agreement > uniform.top1_agreement
    assert uniform.weights_bytes < mixed.weights_bytes < 1.1 * uniform.weights_bytes
    assert mixed.weight_error["full_attention"] < 0.02 < uniform.weight_error["full_attention"]
