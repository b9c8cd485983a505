"""The one name matcher (pipeline/names.py) reads entries as the loaders do: compressed-tensors'
`match_name` for `ignore`/`targets`, vLLM's first-match `re.match` for GPTQ `dynamic` keys."""

import pytest
from compressed_tensors.utils.match import match_name

from pipeline.names import first_dynamic_rule, first_match, matches

NAMES = ["model.language_model.layers.1.self_attn.q_proj", "model.language_model.layers.10.self_attn.q_proj",
         "model.language_model.layers.1.self_attn.q_proj_extra", "language_model.model.layers.1.mlp.down_proj",
         "model.vision_tower.encoder.layers.0.mlp.fc1", "lm_head"]
ENTRIES = ["model.language_model.layers.1.self_attn.q_proj", r"re:.*layers\.1\.", r"re:.*layers\.1\..*q_proj$",
           "re:.*vision_tower.*", "re:lm_head", "re:head", "lm_head", "re:.*q_proj"]


@pytest.mark.parametrize("entry", ENTRIES)
def test_entries_match_as_compressed_tensors_reads_them(entry):
    assert [n for n in NAMES if matches(n, entry)] == [n for n in NAMES if match_name(n, entry)]


def test_a_regex_is_anchored_at_the_start_of_the_name_only():
    name = "model.language_model.layers.1.self_attn.q_proj"
    assert matches(name, "re:model.language_model.layers.1")  # a prefix is enough: add `$` to end it
    assert matches("model.language_model.layers.12.mlp.up_proj", "re:model.language_model.layers.1")
    assert not matches(name, "re:language_model")  # not found in the middle: that needs `.*`
    assert first_match(name, ["lm_head", r"re:.*self_attn\.", name]) == r"re:.*self_attn\."


def test_the_first_dynamic_rule_wins_as_in_vllm():
    dynamic = [r"+:.*layers\.1\..*", r"-:.*self_attn.*", r"-:.*vision_tower.*"]
    assert first_dynamic_rule("model.language_model.layers.1.self_attn.q_proj", dynamic) == dynamic[0]
    assert first_dynamic_rule("model.language_model.layers.2.self_attn.q_proj", dynamic) == dynamic[1]
    assert first_dynamic_rule("model.language_model.layers.2.mlp.up_proj", dynamic) is None
