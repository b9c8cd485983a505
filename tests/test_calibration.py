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
