"""A run writes only into a folder that does not exist, is empty, or holds a gemma-quant run: anything else
is refused before anything is written, naming the folder and what is in it."""

import json

import pytest

from pipeline.cli import main
from pipeline.recipe import RecipeError
from pipeline.run import plan_run, quantize_run
from pipeline.rundir import RUN_MARK


def _listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture
def foreign(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a run")
    return folder


@pytest.mark.parametrize("verb", ["plan", "quantize"])
def test_a_folder_holding_something_else_is_refused_and_left_as_it_was(verb, foreign, write_recipe, capsys):
    path = write_recipe("owned", model="tiny:e2b", scheme="W4A16", output_dir=str(foreign))
    assert main([verb, str(path)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert f"output_dir: {foreign} holds notes.txt, and no gemma-quant run: a run writes only into a folder" in out
    assert _listing(foreign) == ["notes.txt"]
    # --run-dir too, and the library call
    assert main([verb, "tiny-e2b-w4a16", "--run-dir", str(foreign)]) == 2
    with pytest.raises(RecipeError, match="holds notes.txt, and no gemma-quant run"):
        (plan_run if verb == "plan" else quantize_run)("tiny-e2b-w4a16", foreign)
    assert _listing(foreign) == ["notes.txt"]


def test_the_refusal_names_a_few_entries(tmp_path):
    for i in range(8):
        (tmp_path / f"file{i}").write_text("")
    with pytest.raises(RecipeError, match="holds file0, file1, file2, file3, file4 and 3 more, and no gemma-quant"):
        plan_run("tiny-e2b-w4a16", tmp_path)
    with pytest.raises(RecipeError, match="is a file; give a folder"):
        plan_run("tiny-e2b-w4a16", tmp_path / "file0")


def test_an_empty_folder_is_taken_and_a_second_run_there_is_accepted(tmp_path, write_recipe):
    run = tmp_path / "empty"
    run.mkdir()
    plan_run("tiny-e2b-w4a16", run)
    assert json.loads((run / RUN_MARK).read_text())["tool"] == "gemma-quant"
    plan_run("tiny-e2b-w4a16", run)  # a plan beside a plan
    path = write_recipe("second", model="tiny:e2b", scheme="W4A16", output_dir=str(run),
                        eval={"samples": 2, "seq_len": 64, "max_new_tokens": 4})
    quantize_run(path, validate=False, card=False)
    quantize_run(path, validate=False, card=False)  # and a quantize after a quantize
    assert (run / "manifest.json").is_file() and (run / "export").is_dir()


def test_runs_made_before_the_mark_are_still_ours(tmp_path):
    run = tmp_path / "old"
    plan_run("tiny-e2b-w4a16", run)
    (run / RUN_MARK).unlink()
    plan_run("tiny-e2b-w4a16", run)  # recognised by its plan.json
    (run / RUN_MARK).unlink()
    (run / "plan.json").write_text("{}")
    with pytest.raises(RecipeError, match="holds plan.json, and no gemma-quant run"):
        plan_run("tiny-e2b-w4a16", run)


@pytest.mark.parametrize("verb", ["validate", "serve-check", "card"])
def test_verbs_that_update_a_run_write_nothing_where_there_is_none(verb, foreign, capsys):
    (foreign / "manifest.json").write_text(json.dumps({"tool": {"name": "other"}}))
    assert main([verb, str(foreign)]) == 1
    assert f"no run in {foreign} (no manifest.json of a gemma-quant run)" in " ".join(capsys.readouterr().out.split())
    assert _listing(foreign) == ["manifest.json", "notes.txt"]  # not even the run lock
