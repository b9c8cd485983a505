"""Settings given on the command line (`--model X`, `KEY=VALUE`): validated as the same keys in the recipe
file would be, named by their errors, recorded with the run, and naming its run directory."""

import json
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.recipe import (RECIPES_DIR, RecipeError, Setting, default_run_dir, load_recipe, parse_recipe,
                             read_recipe_file)


def _settings(*texts: str) -> tuple[Setting, ...]:
    return tuple(Setting.parse(text) for text in texts)


@pytest.mark.parametrize("texts, line", [
    (["group_size=abc"], "e2b-w4a16.yaml + command line `group_size=abc`: group_size: Input should be a valid integer"),
    (["group_sise=64"], "e2b-w4a16.yaml + command line `group_sise=64`: group_sise: unknown key; allowed keys here: "),
    (["calibration.mixture=nope"], "e2b-w4a16.yaml + command line `calibration.mixture=nope`: calibration: "
                                   "no calibration mixture 'nope'"),
    (["calibration.samples=0"], "+ command line `calibration.samples=0`: calibration.samples: Input should be "
                                "greater than or equal to 1"),
    (["scheme.bits=4"], "+ command line `scheme.bits=4`: scheme: holds 'W4A16', not a mapping of keys"),
    (["hub.repo_id=not a repo"], "+ command line `hub.repo_id=not a repo`: hub.repo_id: got 'not a repo'"),
])
def test_a_wrong_setting_fails_as_the_same_key_in_the_file_would_naming_the_setting(texts, line):
    with pytest.raises(RecipeError) as caught:
        load_recipe("e2b-w4a16", _settings(*texts))
    assert line in " ".join(str(caught.value).split())


def test_the_same_problem_in_the_file_names_the_file_alone(tmp_path):
    data = read_recipe_file(RECIPES_DIR / "e2b-w4a16.yaml")
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump({**data, "group_size": "abc"}))
    with pytest.raises(RecipeError) as from_file:
        load_recipe(path)
    with pytest.raises(RecipeError) as from_setting:
        load_recipe("e2b-w4a16", _settings("group_size=abc"))
    # the same problem, the same message; only the source differs
    assert str(from_file.value).split(": ", 1)[1] == str(from_setting.value).split(": ", 1)[1]
    assert from_file.value.problems == from_setting.value.problems
    assert str(from_file.value).startswith(f"{path}: group_size") and "command line" not in str(from_file.value)


def test_a_problem_found_against_the_models_config_names_the_setting(capsys):
    assert main(["plan", "tiny-e2b-w4a16", "group_size=1024"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "tiny-e2b-w4a16.yaml + command line `group_size=1024`: group_size: 1024 does not divide" in out


def test_malformed_settings_are_refused():
    with pytest.raises(RecipeError, match="not a setting: write KEY=VALUE"):
        Setting.parse("group_size")
    with pytest.raises(RecipeError, match="not a setting"):
        Setting.parse(".x=1")
    with pytest.raises(RecipeError, match="the value is not valid YAML"):
        Setting.parse("skip=[a,")


def test_settings_apply_to_the_files_data_as_yaml_values():
    base = read_recipe_file(RECIPES_DIR / "e2b-w4a16.yaml")
    assert base["model"] == "google/gemma-4-E2B-it"  # the string form of model:
    recipe = load_recipe("e2b-w4a16", (*_settings("group_size=128", "calibration.samples=256", "hub.repo_id=me/x",
                                                  "skip=[re:.*vision.*]", "model.revision=abc"),
                                       Setting.model("./my-e2b-finetune")))
    expected = parse_recipe({**base, "name": "e2b-w4a16", "group_size": 128, "skip": ["re:.*vision.*"],
                             "model": {"id": "./my-e2b-finetune", "revision": "abc"},
                             "calibration": {**base["calibration"], "samples": 256}, "hub": {"repo_id": "me/x"}})
    assert recipe == expected
    assert (recipe.group_size, recipe.calibration.samples, recipe.calibration.seq_len) == (128, 256, 512)
    assert load_recipe("e2b-w4a16", _settings("model=tiny:e2b")).model.id == "tiny:e2b"
    assert load_recipe("e2b-w4a16", _settings("gates.kl_mean_max=null")).gates.kl_mean_max is None


def test_the_default_run_directory_is_named_after_the_settings_that_change_the_build():
    def run_dir(*settings):
        return default_run_dir(load_recipe("e2b-w4a16", settings), settings).as_posix()

    assert run_dir() == "runs/e2b-w4a16"
    assert run_dir(Setting.model("./my-e2b-finetune/")) == "runs/e2b-w4a16--my-e2b-finetune"
    assert run_dir(Setting.model("me/gemma-4-E2B-it-ft")) == "runs/e2b-w4a16--gemma-4-E2B-it-ft"
    assert run_dir(*_settings("group_size=128")) == "runs/e2b-w4a16--group_size-128"
    assert run_dir(*_settings("skip=[re:.*vision.*]", "group_size=null")) == \
        "runs/e2b-w4a16--skip-re-.-vision--group_size-null"
    # where it is published, and the memory it is built within, do not change the build
    assert run_dir(*_settings("hub.repo_id=me/x", "memory.max_cpu_memory=20GiB")) == "runs/e2b-w4a16"
    assert run_dir(*_settings("output_dir=/tmp/mine"), Setting.model("./x")) == "/tmp/mine"
    assert run_dir(*_settings("name=mine", "group_size=64")) == "runs/mine--group_size-64"
    long = run_dir(*_settings(*(f"description=x{i}" for i in range(3)), "skip=[" + ",".join(["a" * 50] * 6) + "]"))
    assert len(Path(long).name) <= 120 and long.startswith("runs/e2b-w4a16--skip-")


def test_a_run_directory_given_settings_is_refused_and_a_recipe_with_settings_finds_its_run(tmp_path, capsys):
    assert main(["card", str(tmp_path), "group_size=64"]) == 2
    assert "is a run directory; settings (group_size=64) apply to a recipe" in " ".join(capsys.readouterr().out.split())


def test_cli_settings_may_follow_options(capsys, tmp_path):
    assert main(["plan", "tiny-e2b-w4a16", "--run-dir", str(tmp_path / "run"), "group_size=64"]) == 0
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["group_size"] == 64
    capsys.readouterr()
    assert main(["plan", "tiny-e2b-w4a16", "--run-dir", str(tmp_path / "run"), "stray"]) == 2
    assert "command line: stray: not a setting: write KEY=VALUE" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):  # an option argparse does not know stays an error
        main(["plan", "tiny-e2b-w4a16", "--run-dir", str(tmp_path / "run"), "group_size=64", "--nope"])


@pytest.fixture
def finetune(tmp_path):
    """A local fine-tune folder of the tiny E2B with its own chat template and generation config."""
    from pipeline.tiny import build_tiny_source

    folder = build_tiny_source("e2b", tmp_path / "my-e2b-finetune", seed=3)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}<my-turn>{{ m['content'] }}{% endfor %}")
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "top_k": 7}))
    return folder


def test_quantize_a_local_finetune_with_a_shipped_recipe(finetune, tmp_path, monkeypatch, capsys):
    """`gemma-quant quantize tiny-e2b-w4a16 --model <folder> ...`: that folder, its own chat template and
    generation config in the export, the recipe as run in the manifest and card, in a run directory of its own;
    `card` given the same recipe and settings finds that run."""
    monkeypatch.chdir(tmp_path)
    settings = ["--model", str(finetune), "eval.samples=2", "eval.seq_len=64", "eval.max_new_tokens=4"]
    assert main(["quantize", "tiny-e2b-w4a16", *settings]) == 0
    run = tmp_path / "runs" / "tiny-e2b-w4a16--my-e2b-finetune--eval.samples-2--eval.seq_len-64--eval.max_new_tokens-4"
    export = run / "export"
    assert (export / "chat_template.jinja").read_text() == (finetune / "chat_template.jinja").read_text()
    assert json.loads((export / "generation_config.json").read_text())["top_k"] == 7
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["settings"] == [f"--model {finetune}", "eval.samples=2", "eval.seq_len=64", "eval.max_new_tokens=4"]
    assert manifest["source"]["path"] == str(finetune)
    base = read_recipe_file(RECIPES_DIR / "tiny-e2b-w4a16.yaml")
    as_run = parse_recipe({**base, "name": "tiny-e2b-w4a16", "model": {"id": str(finetune)},
                           "eval": {"samples": 2, "seq_len": 64, "max_new_tokens": 4}})
    assert parse_recipe(manifest["recipe"]) == as_run
    card = (export / "README.md").read_text()
    assert (f"run with these settings given on the command line: `--model {finetune}`, `eval.samples=2`, "
            "`eval.seq_len=64`, `eval.max_new_tokens=4`") in card
    assert (f"gemma-quant quantize tiny-e2b-w4a16 --model {finetune} eval.samples=2 eval.seq_len=64 "
            "eval.max_new_tokens=4") in card
    assert not (tmp_path / "runs" / "tiny-e2b-w4a16").exists()  # the base model's run is left alone
    capsys.readouterr()
    assert main(["card", "tiny-e2b-w4a16", *settings]) == 0
    assert capsys.readouterr().out.startswith(f"{run.relative_to(tmp_path)}/export/README.md front matter")
    assert main(["validate", "tiny-e2b-w4a16", *settings, "--no-serve"]) == 0
    assert f"report: {run.relative_to(tmp_path)}/eval.md" in capsys.readouterr().out.replace("\n", "")
