"""Tiny Gemma 4 checkpoints built from the real configs, for offline runs and tests.

Each tiny config is the bundled full-size config shrunk in width and depth while keeping
every architectural feature that quantization has to get right: the sliding/full layer mix
(ending on a full layer), per-layer head dims with partial RoPE, PLE, KV sharing, the
double-wide MLP, `attention_k_eq_v`, MoE experts and router, and the vision and audio towers.
Dimensions that the real model's group size does not divide (26B-A4B's 2112-wide MLP and
704-wide experts) stay indivisible so the plan's shape rules are exercised.

A tiny *source* is a complete checkpoint folder like one downloaded from the Hub: config,
seeded random weights, tokenizer, chat template, processor and generation config.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

VARIANTS = {"e2b": "gemma-4-E2B", "e4b": "gemma-4-E4B", "31b": "gemma-4-31B", "26b-a4b": "gemma-4-26B-A4B", "12b": "gemma-4-12B",
            "e2b-assistant": "gemma-4-E2B-it-assistant"}
# A drafter (`gemma4_assistant`) reads its target's KV and hidden states: its tiny copy is shaped to the tiny target.
ASSISTANT_TARGETS = {"e2b-assistant": "e2b"}
ASSISTANT_HIDDEN = 128
ASSISTANT_CENTROIDS = 64  # divides TINY_VOCAB; 16 tokens per centroid

TINY_VOCAB = 1024
TEXT_HIDDEN = 256
SLIDING_HEAD_DIM = 64
GLOBAL_HEAD_DIM = 128
PLE_DIM = 64
SLIDING_WINDOW = 32

# Per variant: decoder depth and how many trailing layers share KV (same proportions as the real ones).
DEPTH = {"e2b": (10, 5), "e4b": (12, 6), "31b": (6, 0), "26b-a4b": (6, 0), "12b": (6, 0)}

# Special tokens, in id order after the ordinary vocabulary's reserved ids 0-3.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>",
                  "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>", "<|video|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n{{ message['content'] | trim }}<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)
# Bumped whenever what build_tiny_source writes changes, so cached tiny sources are rebuilt.
TINY_VERSION = 3


def full_config(variant: str) -> dict:
    """The bundled full-size config of a Gemma 4 variant (e2b, e4b, 31b, 26b-a4b)."""
    name = VARIANTS[variant]
    text = resources.files("pipeline.model_configs").joinpath(f"{name}.json").read_text()
    return json.loads(text)


def _shrunk_layer_types(full_types: list[str], depth: int) -> list[str]:
    """The real layers' repeating sliding/full pattern, cut to `depth` and ending on full attention."""
    period = full_types.index("full_attention") + 1
    types = [full_types[i % period] for i in range(depth)]
    types[-1] = "full_attention"
    return types


def tiny_config(variant: str, text_hidden: int = TEXT_HIDDEN) -> dict:
    """A tiny config of `variant` (a drafter's is shaped to its tiny target)."""
    return _tiny_assistant_config(variant) if variant in ASSISTANT_TARGETS else _tiny_model_config(variant, text_hidden)


def _tiny_assistant_config(variant: str) -> dict:
    """The real drafter's config shrunk like its target: the target's KV geometry (the drafter attends to the
    target's keys and values), its hidden size as the backbone width, the real layer pattern and centroids."""
    cfg = copy.deepcopy(full_config(variant))
    target = _tiny_model_config(ASSISTANT_TARGETS[variant], TEXT_HIDDEN)["text_config"]
    text = cfg["text_config"]
    ratio = ASSISTANT_HIDDEN / text["hidden_size"]
    text.update(
        vocab_size=TINY_VOCAB, hidden_size=ASSISTANT_HIDDEN,
        intermediate_size=int(round(text["intermediate_size"] * ratio / 64)) * 64,
        num_attention_heads=4, num_key_value_heads=target["num_key_value_heads"],
        head_dim=target["head_dim"], global_head_dim=target["global_head_dim"],
        sliding_window=target["sliding_window"], max_position_embeddings=target["max_position_embeddings"],
        initializer_range=0.1,
    )
    cfg.update(backbone_hidden_size=target["hidden_size"], num_centroids=ASSISTANT_CENTROIDS,
               centroid_intermediate_top_k=8)
    return _with_tiny_token_ids(cfg)


def _tiny_model_config(variant: str, text_hidden: int) -> dict:
    """A tiny config with the same architectural features as the real variant (`text_hidden` widens the
    decoder, MLP in proportion, for memory measurements that must stand above the libraries' own)."""
    cfg = copy.deepcopy(full_config(variant))
    text = cfg["text_config"]
    depth, shared = DEPTH[variant]
    ratio = text_hidden / text["hidden_size"]
    kv_heads = min(text["num_key_value_heads"], 2)
    text.update(
        vocab_size=TINY_VOCAB,
        hidden_size=text_hidden,
        # 26B-A4B's 2112 (not a multiple of 128) stays a non-multiple of 128: 192.
        intermediate_size=int(round(text["intermediate_size"] * ratio / 64)) * 64,
        num_hidden_layers=depth,
        layer_types=_shrunk_layer_types(text["layer_types"], depth),
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=SLIDING_HEAD_DIM,
        global_head_dim=GLOBAL_HEAD_DIM,
        sliding_window=SLIDING_WINDOW,
        num_kv_shared_layers=shared,
        max_position_embeddings=4096,
        # Random weights at the usual 0.02 give near-uniform next-token distributions, where
        # any perturbation flips the argmax; 0.1 gives peaked ones, like a trained model's.
        initializer_range=0.1,
    )
    if text.get("num_global_key_value_heads"):
        text["num_global_key_value_heads"] = 1
    if text.get("hidden_size_per_layer_input"):
        text["hidden_size_per_layer_input"] = PLE_DIM
        text["vocab_size_per_layer_input"] = TINY_VOCAB
    else:
        text["vocab_size_per_layer_input"] = TINY_VOCAB
    if text.get("enable_moe_block"):
        text.update(num_experts=8, top_k_experts=2,
                    moe_intermediate_size=int(round(text["moe_intermediate_size"] * ratio / 32)) * 32)
    if cfg["model_type"] == "gemma4_unified":  # the 12B: small embedders (patch_dense, projections), no towers
        cfg["vision_config"].update(patch_size=4, mm_embed_dim=text_hidden, mm_posemb_size=64,
                                    output_proj_dims=text_hidden, num_soft_tokens=16)
        for key in ("model_patch_size", "hidden_size", "intermediate_size"):  # derived or unused by the embedders
            cfg["vision_config"].pop(key, None)
        cfg["audio_config"].update(audio_embed_dim=64)
        for key in ("hidden_size", "output_proj_dims", "audio_samples_per_token"):  # properties of audio_embed_dim
            cfg["audio_config"].pop(key, None)
    else:
        cfg["vision_config"] = {
            **cfg["vision_config"],
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32, "global_head_dim": 32,
            "position_embedding_size": 256, "use_clipped_linears": True,
        }
        if cfg.get("audio_config"):
            cfg["audio_config"].update(
                hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                subsampling_conv_channels=[16, 8], output_proj_dims=128,
            )
    if "vision_soft_tokens_per_image" in cfg:
        cfg["vision_soft_tokens_per_image"] = 16
    return _with_tiny_token_ids(cfg)


def _with_tiny_token_ids(cfg: dict) -> dict:
    """The special-token ids of the tiny tokenizer (real configs carry the 262k vocabulary's)."""
    ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    cfg.update(
        image_token_id=ids["<|image|>"], boi_token_id=ids["<|image>"], eoi_token_id=ids["<image|>"],
        audio_token_id=ids["<|audio|>"], boa_token_id=ids["<|audio>"], eoa_token_id=ids["<audio|>"],
        video_token_id=ids["<|video|>"], eos_token_id=[ids["<eos>"], ids["<turn|>"]],
    )
    return cfg


def _train_tokenizer():
    """A BPE tokenizer shaped like Gemma 4's (spaces as "▁", byte fallback to `<0xNN>` tokens, the same decoder,
    so llama.cpp's converter reads it as it reads Gemma's) with Gemma 4's special tokens, trained on stdlib text."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    # Trained with the byte tokens reserved right after the special ones, then rebuilt so that only the special
    # tokens are special: byte fallback reads `<0xNN>` as ordinary vocabulary, as in Gemma's tokenizer.
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=SPECIAL_TOKENS + byte_tokens, show_progress=False)
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Replace(" ", "▁")
    trained.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # words start with ▁, as in Gemma's
    trained.train_from_iterator((topics[k] for k in sorted(topics)), trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    tok = Tokenizer(models.BPE(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], unk_token="<unk>",
                               byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        pad_token="<pad>", mask_token="<mask>", chat_template=CHAT_TEMPLATE, add_bos_token=True,
        extra_special_tokens={
            "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
            "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
            "sot_token": "<|turn>", "eot_token": "<turn|>",
        },
    )


def build_tiny_source(variant: str, dest: Path, seed: int = 0, text_hidden: int = TEXT_HIDDEN) -> Path:
    """Write a complete tiny checkpoint folder for `variant` into `dest` (deterministic for a seed)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose one of {sorted(VARIANTS)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(variant, text_hidden)
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    if variant in ASSISTANT_TARGETS:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        # the trained drafter's vocabulary order (token_ordering): random init leaves it all zeros
        model.masked_embedding.token_ordering.copy_(torch.randperm(TINY_VOCAB, generator=torch.Generator().manual_seed(seed)))
    else:
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    _widen_norm_weights(model, seed)
    model.save_pretrained(dest)
    GenerationConfig(bos_token_id=2, eos_token_id=cfg["eos_token_id"], pad_token_id=0,
                     do_sample=True, top_k=64, top_p=0.95).save_pretrained(dest)
    _train_tokenizer().save_pretrained(dest)
    return dest


def _widen_norm_weights(model, seed: int) -> None:
    """Random init leaves every RMSNorm weight at one value; perturb them so that a wrong
    norm-to-layer mapping in any later stage changes the logits."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.ndim == 1:
                param.add_(torch.randn(param.shape, generator=gen).to(param.dtype) * 0.1)
