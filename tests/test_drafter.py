"""Drafters (`gemma4_assistant`): the tiny E2B drafter quantized beside its tiny target, reloaded, validated on the
target's states, drafting in transformers' assisted generation; the recipe checks that need the config."""

import json

import pytest
import torch
import yaml

from pipeline.drafter import target_problems
from pipeline.plan import Plan
from pipeline.recipe import RECIPES_DIR, RecipeError, load_recipe
from pipeline.run import make_plan, quantize_run
from pipeline.rundir import EVAL_JSON, PLAN
from pipeline.tiny import full_config, tiny_config



def _recipe(tmp_path, **changes) -> object:
    recipe = yaml.safe_load((RECIPES_DIR / "tiny-e2b-assistant-w4a16.yaml").read_text())
    recipe.update(output_dir=str(tmp_path / "run"), eval={"samples": 2, "seq_len": 48}, **changes)
    path = tmp_path / "drafter.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_quantized_tiny_drafter_validates_on_its_targets_states_and_drafts_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from pipeline.model import resolve
    from pipeline.recipe import ModelSpec

    manifest = quantize_run(_recipe(tmp_path))
    run = tmp_path / "run"
    assert manifest.reload.vs_in_memory.kl_mean < 1e-3 and not manifest.reload.problems
    plan = Plan.load(run / PLAN)
    kept = {m.name for m in plan.modules if not m.quantize}
    assert {"pre_projection", "post_projection", "masked_embedding.centroids", "model.embed_tokens"} <= kept
    assert all(m.quantize for m in plan.modules if m.component == "text_decoder")

    report = json.loads((run / EVAL_JSON).read_text())
    assert report["quality"]["tokens"] == 2 * 47  # every position with a hidden state before it
    assert 0 < report["quality"]["kl_mean"] < 5 and report["generations"] == []
    acceptance = report["draft_acceptance"]
    assert acceptance["positions"] == 2 * 47 and 0 <= acceptance["quantized"] <= 1
    assert report["serving"]["status"] == "not_run" and "beside its target" in report["serving"]["reason"]

    card = (run / "export" / "README.md").read_text()
    command = next(line for line in card.splitlines() if line.startswith("vllm serve"))
    spec = json.loads(command.split("--speculative-config ")[1].strip("'"))
    assert spec["method"] == "mtp" and command.startswith("vllm serve tiny:e2b ")
    assert "Draft acceptance, one step ahead" in card

    # Speculative decoding keeps the target's greedy output: the quantized drafter drafts, the target decides
    target_dir = resolve(ModelSpec(id="tiny:e2b")).path
    target = AutoModelForImageTextToText.from_pretrained(target_dir, dtype=torch.float32).eval()
    drafter = AutoModelForCausalLM.from_pretrained(run / "export", dtype=torch.float32).eval()
    inputs = AutoTokenizer.from_pretrained(target_dir)("The Python language reference", return_tensors="pt")
    with torch.no_grad():
        alone = target.generate(**inputs, max_new_tokens=10, do_sample=False)
        drafted = target.generate(**inputs, max_new_tokens=10, do_sample=False, assistant_model=drafter)
    assert torch.equal(alone, drafted)


@pytest.mark.parametrize("changes, key, says", [
    ({"target": None}, "target", "is a drafter (gemma4_assistant): give the model it drafts for"),
    ({"algorithm": "gptq"}, "algorithm", "a drafter is quantized by rtn"),
    ({"export": "gptq"}, "export", "a drafter is exported as compressed-tensors"),
    ({"model": "tiny:e2b"}, "target", "tiny:e2b is not a drafter (gemma4"),
])
def test_drafter_recipes_are_checked_against_the_config(tmp_path, changes, key, says):
    path = _recipe(tmp_path, **changes)
    with pytest.raises(RecipeError) as err:
        make_plan(load_recipe(path), path)
    assert any(k == key and says in message for k, message in err.value.problems), err.value.problems


def test_a_drafter_refuses_a_target_of_another_width():
    from transformers import AutoConfig

    drafter = AutoConfig.for_model(**tiny_config("e2b-assistant"))
    assert target_problems(drafter, AutoConfig.for_model(**tiny_config("e2b"))) == []
    problems = target_problems(drafter, AutoConfig.for_model(**full_config("e4b")))
    assert [k for k, _ in problems] == ["target", "target"] and "2560" in problems[0][1]


def test_the_real_drafter_recipe_plans_offline_from_the_bundled_configs():
    recipe = load_recipe(RECIPES_DIR / "e2b-it-assistant-w8a16.yaml")
    _, config, plan = make_plan(recipe, RECIPES_DIR / "e2b-it-assistant-w8a16.yaml")
    assert config.model_type == "gemma4_assistant" and plan.total_params == 77_993_476
    assert plan.counts()["quantized"] == 20
    # vLLM names the drafter's modules `draft_model.*`: every kept Linear also has a pattern that matches there
    from pipeline.names import first_match

    for m in plan.modules:
        if m.kind == "linear" and not m.quantize and m.name != "lm_head":
            assert first_match("draft_model." + m.name.removeprefix("model."), plan.ignore), m.name


def test_a_targets_card_shows_vllms_speculative_command_with_its_drafter(tmp_path):
    recipe = tmp_path / "target.yaml"
    recipe.write_text(f"model: tiny:e2b\nscheme: W4A16\noutput_dir: {tmp_path / 'run'}\n"
                      "assistant: {model: google/gemma-4-E2B-it-assistant, num_speculative_tokens: 3}\n")
    quantize_run(recipe, validate=False)
    card = (tmp_path / "run" / "export" / "README.md").read_text()
    commands = [line for line in card.splitlines() if line.startswith("vllm serve") and "--speculative-config" in line]
    assert len(commands) == 1
    spec = json.loads(commands[0].split("--speculative-config ")[1].strip("'"))
    assert spec == {"method": "mtp", "model": "google/gemma-4-E2B-it-assistant", "num_speculative_tokens": 3}
    assert "speed-up and acceptance rate of speculative decoding were not measured" in card
