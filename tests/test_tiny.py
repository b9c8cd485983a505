"""The tiny models keep every architectural feature of the real configs they are shrunk from."""

import pytest
from transformers import AutoConfig

from pipeline.tiny import VARIANTS, full_config, tiny_config


def _features(cfg: dict) -> dict:
    text = cfg["text_config"]
    types = text["layer_types"]
    return {
        "sliding_and_full": {"sliding_attention", "full_attention"} <= set(types),
        "ends_full": types[-1] == "full_attention",
        "ple": bool(text.get("hidden_size_per_layer_input")),
        "kv_sharing": bool(text.get("num_kv_shared_layers")),
        "double_wide_mlp": bool(text.get("use_double_wide_mlp")),
        "k_eq_v": bool(text.get("attention_k_eq_v")),
        "moe": bool(text.get("enable_moe_block")),
        "wider_global_heads": text["global_head_dim"] > text["head_dim"],
        "partial_rope": text["rope_parameters"]["full_attention"].get("partial_rotary_factor"),
        "vision": cfg.get("vision_config") is not None,
        "audio": cfg.get("audio_config") is not None,
        "tied": cfg.get("tie_word_embeddings"),
        "mlp_width_multiple_of_128": text["intermediate_size"] % 128 == 0,
    }


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_config_keeps_every_feature(variant):
    full, tiny = full_config(variant), tiny_config(variant)
    assert _features(tiny) == _features(full)
    assert tiny["text_config"]["hidden_size"] < full["text_config"]["hidden_size"]
    # The shrunk layer pattern is the real one's, cut short.
    period = full["text_config"]["layer_types"].index("full_attention") + 1
    assert tiny["text_config"]["layer_types"][:period] == full["text_config"]["layer_types"][:period]


@pytest.mark.parametrize("variant", ["e2b", "e4b"])
def test_kv_shared_layers_cover_both_layer_types(variant):
    text = tiny_config(variant)["text_config"]
    shared = text["layer_types"][-text["num_kv_shared_layers"]:]
    owners = text["layer_types"][:-text["num_kv_shared_layers"]]
    assert set(shared) == set(owners) == {"sliding_attention", "full_attention"}


def test_tiny_configs_load_as_gemma4():
    for variant in VARIANTS:
        config = AutoConfig.for_model(**tiny_config(variant))
        assert type(config).__name__ == {"12b": "Gemma4UnifiedConfig", "e2b-assistant": "Gemma4AssistantConfig"}.get(
            variant, "Gemma4Config")
        assert config.text_config.num_hidden_layers == len(config.text_config.layer_types)
