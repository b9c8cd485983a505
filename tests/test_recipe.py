"""Recipes: every shipped one is valid and plans offline; bad ones fail with file, key and fix."""

import pytest

from pipeline.recipe import RECIPES_DIR, RecipeError, load_recipe, parse_recipe
from pipeline.run import make_plan

SHIPPED = sorted(RECIPES_DIR.glob("*.yaml"))
REQUIRED = {"e2b-w8a16", "e2b-w4a16", "e4b-w8a16", "e4b-w4a16", "31b-w4a16", "26b-a4b-w4a16"}


def test_required_recipes_ship():
    names = {p.stem for p in SHIPPED}
    assert REQUIRED <= names
    assert any(n.startswith("tiny-") for n in names)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_validates_and_plans(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    if not recipe.model.id.startswith(("tiny:", "gguf:")):
        # instruction-tuned: the -it checkpoints, Google's QAT weights of them, or their drafters
        assert recipe.model.id.startswith("google/gemma-4-")
        assert recipe.model.id.removesuffix("-qat-q4_0-unquantized").removesuffix("-assistant").endswith("-it")
    # Planning needs only the config: the bundled copy when offline, for the real checkpoints.
    _, _, plan = make_plan(recipe, path)
    assert plan.quantized and plan.export_bytes < plan.bf16_bytes


def test_defaults():
    w4 = parse_recipe({"name": "x", "model": "tiny:e2b", "scheme": "W4A16"})
    assert (w4.group_size, w4.symmetric, w4.algorithm, w4.export) == (128, True, "rtn", "compressed-tensors")
    w8 = parse_recipe({"name": "x", "model": "tiny:e2b", "scheme": "W8A16"})
    assert w8.group_size is None  # per-channel
    assert w8.run_dir.as_posix() == "runs/x"


@pytest.mark.parametrize("fields, key, fragment", [
    ({"scheme": "W4A16", "group_sise": 64}, "group_sise", "unknown key; allowed keys here: algorithm, assistant, autoround, calibration"),
    ({"scheme": "W3A16"}, "scheme", "allowed: 'W4A16' or 'W8A16'"),
    ({"scheme": "W4A16", "group_size": 100}, "group_size", "allowed: 32, 64, 128, 256, 512, 1024, or null"),
    ({"scheme": "W4A16", "group_size": "big"}, "group_size", "valid integer"),
    ({"scheme": "W4A16", "export": "onnx"}, "export", "allowed: 'compressed-tensors', 'gptq', 'auto-round' or 'gguf'"),
    ({"scheme": "W4A16", "algorithm": "awq"}, "algorithm", "allowed: 'rtn', 'autoround', 'gptq', 'opt-rtn' or 'qat-repack'"),
    ({"scheme": "W4A16", "autoround": {"iters": 0}}, "autoround.iters", "greater than or equal to 1"),
    ({"scheme": "W4A16", "calibration": {"sources": []}}, "calibration.sources", "at least 1 item"),
    ({"scheme": "W4A16", "skip": ["re:(unclosed"]}, "skip", "not a valid regular expression"),
    ({"scheme": "W4A16", "model": {"id": "tiny:e9b"}}, "model.id", "allowed: tiny:e2b, tiny:e4b, tiny:31b, tiny:26b-a4b"),
    ({"scheme": "W4A16", "model": {"id": "tiny:e2b", "revison": "main"}}, "model.revison", "allowed keys here: id, revision, seed"),
    ({"model": "tiny:e2b"}, "scheme", "required key is missing"),
])
def test_bad_recipe_names_file_key_and_fix(write_recipe, fields, key, fragment):
    fields = {"model": "tiny:e2b", **fields}
    path = write_recipe("bad", **fields)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.key == key
    message = str(err.value)
    assert message.startswith(f"{path}: {key}: ")
    assert fragment in message


def test_group_size_must_divide_the_model(write_recipe):
    path = write_recipe("wide-groups", model="tiny:e2b", scheme="W4A16", group_size=512)
    recipe = load_recipe(path)  # the schema allows 512 ...
    with pytest.raises(RecipeError) as err:  # ... the tiny model's hidden size 256 does not
        make_plan(recipe, path)
    assert str(err.value) == (f"{path}: group_size: 512 does not divide the text hidden size 256 of tiny:e2b; "
                              "allowed for this model: 32, 64, 128, 256")


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(RecipeError) as err:
        load_recipe("e2b-w2a16")
    assert "known recipes:" in str(err.value) and "e2b-w4a16" in str(err.value)


def test_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- scheme: W4A16\n")
    with pytest.raises(RecipeError, match="must hold a mapping"):
        load_recipe(path)


def test_a_recipe_written_to_the_manifest_reads_back_with_the_same_rules():
    """The manifest stores `model_dump(mode="json")`; validate and card read it back. A rule keeps the keys
    it was given (an unset group_size read back as a given null would mean one scale per channel)."""
    from pipeline.recipe import Recipe, parse_recipe

    recipe = parse_recipe({"name": "t", "model": "tiny:e2b", "scheme": "W4A16", "overrides": [
        {"layer_type": "full_attention", "bits": 8, "group_size": None}, {"layers": "0-1", "bits": 8}]})
    dumped = recipe.model_dump(mode="json")
    assert dumped["overrides"] == [{"layer_type": ["full_attention"], "bits": 8, "group_size": None},
                                   {"layers": [0, 1], "bits": 8}]
    again = Recipe.model_validate(dumped)
    assert [rule.sets for rule in again.overrides] == [{"bits", "group_size"}, {"bits"}]
    assert again.model_dump(mode="json") == dumped
