"""The calibration stage: sources, mixtures, chat rendering, determinism, cache, errors."""

import json

import pytest
from transformers import AutoTokenizer

from pipeline import calibration
from pipeline.corpus import CorpusError
from pipeline.model import ModelSpec, resolve
from pipeline.recipe import CALIBRATION_DIR, CalibrationSpec, calibration_mixtures


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve(ModelSpec(id="tiny:e2b")).path)


def _spec(**fields) -> CalibrationSpec:
    return CalibrationSpec.model_validate({"samples": 6, "seq_len": 32, **fields})


def test_allocation_sums_exactly_and_follows_weights():
    assert calibration.allocate(10, [1, 1, 1]) == [4, 3, 3]
    assert calibration.allocate(128, [3, 1]) == [96, 32]
    assert sum(calibration.allocate(7, [0.2, 0.5, 0.3])) == 7


def test_mixture_of_sources(tokenizer, tmp_path):
    (tmp_path / "notes.txt").write_text("\n\n".join(f"note {i}: the quick brown fox jumps over the lazy dog" * 3
                                                  for i in range(40)))
    spec = _spec(samples=8, sources=[{"source": "builtin", "weight": 3}, {"source": str(tmp_path / "notes.txt")}])
    tokens, per_source = calibration.build(spec, tokenizer)
    assert tokens.shape == (8, 32) and (tokens[:, 0] == tokenizer.bos_token_id).all()
    assert per_source == {"builtin": 6, str(tmp_path / "notes.txt"): 2}
    fox = tokenizer(" brown fox jumps", add_special_tokens=False)["input_ids"]

    def holds(row: list[int]) -> bool:
        return any(row[i:i + len(fox)] == fox for i in range(len(row) - len(fox) + 1))

    assert sum(holds(row.tolist()) for row in tokens) == 2  # exactly the file's windows


def test_builtin_calibration_never_uses_the_held_out_half():
    from pipeline.corpus import builtin_texts

    texts = calibration.source_rows(_spec().sources[0])
    assert texts == builtin_texts("calibration") and not set(texts) & set(builtin_texts("eval"))


def test_chat_sources_are_rendered_with_the_chat_template(tokenizer, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"question {i}?"},
                          {"role": "assistant", "content": f"answer {i}."}]} for i in range(200)]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    source = {"source": str(tmp_path / "chats.jsonl"), "format": "messages", "field": "messages"}
    rendered = calibration.render(_spec(sources=[source]).sources[0], tokenizer, [rows[0]["messages"]])
    assert rendered == ["<bos><|turn>user\nquestion 0?<turn|>\n<|turn>model\nanswer 0.<turn|>\n"]
    tokens, _ = calibration.build(_spec(sources=[source]), tokenizer)
    turn = tokenizer.convert_tokens_to_ids("<|turn>")
    assert all(turn in row.tolist() for row in tokens)


def test_same_recipe_same_tokens_and_cache_reuse(tokenizer, tmp_path):
    spec = _spec(seed=3)
    first, info = calibration.load_or_build(spec, tokenizer, tmp_path, "tiny:e2b")
    again, cached = calibration.load_or_build(spec, tokenizer, tmp_path, "tiny:e2b")
    assert not info.cached and cached.cached and cached.sha256 == info.sha256 and (first == again).all()
    fresh, _ = calibration.load_or_build(spec, tokenizer, tmp_path / "elsewhere", "tiny:e2b")
    assert (fresh == first).all()  # deterministic, not only cached
    other, changed = calibration.load_or_build(_spec(seed=4), tokenizer, tmp_path, "tiny:e2b")
    assert not changed.cached and changed.sha256 != info.sha256


def test_errors(tokenizer, tmp_path):
    with pytest.raises(CorpusError, match="fewer than its share of 2000 samples × 4096 tokens"):
        calibration.build(_spec(samples=2000, seq_len=4096), tokenizer)
    (tmp_path / "rows.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match="has no field 'text'; fields: body"):
        calibration.build(_spec(sources=[{"source": str(tmp_path / "rows.jsonl")}]), tokenizer)
    with pytest.raises(CorpusError, match="Hub dataset 'nobody/none' could not be loaded.*Offline"):
        calibration.build(_spec(sources=[{"source": "hf:nobody/none", "format": "messages"}]), tokenizer)
    with pytest.raises(CorpusError, match="no such file"):
        calibration.build(_spec(sources=[{"source": str(tmp_path / "missing.txt")}]), tokenizer)


@pytest.mark.parametrize("name", calibration_mixtures())
def test_every_shipped_mixture_is_a_valid_calibration_block(name):
    import yaml

    raw = yaml.safe_load((CALIBRATION_DIR / f"{name}.yaml").read_text())
    assert raw["description"].strip()  # what the README's table and a user read
    spec = CalibrationSpec.model_validate({"mixture": name})
    assert spec.mixture == name and [s.source for s in spec.sources] == [s["source"] for s in raw["sources"]]
    assert (spec.samples, spec.seq_len) == (raw["samples"], raw["seq_len"])


def test_a_recipe_names_a_mixture_and_its_own_keys_win(write_recipe):
    from pipeline.recipe import RecipeError, load_recipe

    default = load_recipe(write_recipe(model="tiny:e2b", scheme="W4A16")).calibration
    assert default.mixture == "default" and [s.source for s in default.sources] == ["builtin"]
    chat = load_recipe(write_recipe(model="tiny:e2b", scheme="W4A16", calibration={"mixture": "chat", "samples": 16})).calibration
    assert chat.samples == 16 and chat.seq_len == 2048
    assert [(s.source, s.format, s.weight) for s in chat.sources] == [
        ("hf:HuggingFaceH4/ultrachat_200k", "messages", 3.0), ("hf:Salesforce/wikitext", "text", 1.0)]
    own = load_recipe(write_recipe(model="tiny:e2b", scheme="W4A16", calibration={"sources": [{"source": "a.txt"}]})).calibration
    assert own.mixture is None and [s.source for s in own.sources] == ["a.txt"]
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(model="tiny:e2b", scheme="W4A16", calibration={"mixture": "ultrachat"}))
    assert err.value.key == "calibration" and "no calibration mixture 'ultrachat'" in str(err.value)
    assert "available: chat, default" in str(err.value)


def test_the_default_mixture_builds_offline(tokenizer):
    tokens, per_source = calibration.build(CalibrationSpec.model_validate({"samples": 4, "seq_len": 64}), tokenizer)
    assert tokens.shape == (4, 64) and per_source == {"builtin": 4}


def test_a_fallback_mixture_is_written_by_name_and_resolved_with_the_recipes_own_keys():
    spec = _spec(mixture="chat", fallback=["default"])
    [default] = spec.fallback
    assert (spec.mixture, [s.source for s in spec.sources]) == ("chat", ["hf:HuggingFaceH4/ultrachat_200k",
                                                                         "hf:Salesforce/wikitext"])
    assert (default.mixture, [s.source for s in default.sources], default.samples, default.seq_len) == \
        ("default", ["builtin"], 6, 32)
    dumped = spec.model_dump(mode="json")
    assert dumped["fallback"] == ["default"] and CalibrationSpec.model_validate(dumped) == spec
    assert "fallback" not in _spec().model_dump(mode="json")  # recipes without one record what they did before
    with pytest.raises(ValueError, match="no calibration mixture 'nope'"):
        _spec(mixture="chat", fallback=["nope"])
    with pytest.raises(ValueError, match="a fallback mixture has no fallback of its own"):
        _spec(mixture="chat", fallback=[{"mixture": "default", "fallback": ["chat"]}])


def test_offline_the_chat_mixture_falls_back_to_the_builtin_one_logged(tokenizer, tmp_path, caplog):
    """The tests run with HF_HUB_OFFLINE=1: the chat mixture's Hub datasets cannot load."""
    tokens, info = calibration.load_or_build(_spec(mixture="chat", fallback=["default"]), tokenizer, tmp_path, "t")
    assert tokens.shape == (6, 32) and info.mixture == "default" and info.per_source == {"builtin": 6}
    assert list(info.fell_back_from) == ["chat"] and "Hub dataset" in info.fell_back_from["chat"]
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("calibration: mixture chat could not be loaded (Hub dataset ") and \
        warning.endswith("falling back to mixture default")
    same, _ = calibration.load_or_build(_spec(mixture="default"), tokenizer, tmp_path / "plain", "t")
    assert (same == tokens).all()  # the fallback is the default mixture with the recipe's own keys
    with pytest.raises(CorpusError, match="Hub dataset"):  # without a fallback, the error as before
        calibration.load_or_build(_spec(mixture="chat"), tokenizer, tmp_path, "t")


def test_the_it_recipes_calibrate_on_chat_and_fall_back_to_the_builtin_corpus():
    from pipeline.recipe import RECIPES_DIR, load_recipe

    for path in RECIPES_DIR.glob("*.yaml"):
        recipe = load_recipe(path)
        if recipe.model.id.startswith("google/") and recipe.calibration.mixture == "chat":
            assert [f.mixture for f in recipe.calibration.fallback] == ["default"], path.name
    assert load_recipe("e2b-w4a16").calibration.mixture == "chat"


def test_a_run_that_fell_back_says_which_mixture_ran_in_its_manifest_and_card(tmp_path):
    from pipeline.cli import main

    run = tmp_path / "run"
    assert main(["quantize", "tiny-e2b-w4a16-gptq", "calibration.mixture=chat", "calibration.fallback=[default]",
                 "eval.samples=2", "eval.seq_len=64", "--run-dir", str(run)]) == 0
    recorded = json.loads((run / "manifest.json").read_text())
    assert recorded["calibration"]["mixture"] == "default" and list(recorded["calibration"]["fell_back_from"]) == ["chat"]
    assert recorded["recipe"]["calibration"]["mixture"] == "chat"  # the recipe as written; the data as it ran
    card = " ".join((run / "export" / "README.md").read_text().split())
    assert "8 × 128 tokens from builtin (8) (mixture `default`, its fallback: `chat` could not be loaded: Hub dataset" \
        in card
