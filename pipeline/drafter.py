"""Gemma 4's speculative-decoding drafters (`gemma4_assistant`, `-it-assistant` on the Hub), and the target
states every drafter forward is fed.

A drafter cannot run on text alone: at each step it reads its target's last hidden state and the target's keys
and values (every drafter layer is KV-shared). Measured here as transformers' assisted generation runs it
(`Gemma4AssistantCandidateGenerator` in transformers/generation/candidate_generator.py): at position t, the
target's input embedding of token t beside its hidden state at t - 1, with its KV cache of tokens 0..t-1,
predicting token t + 1. No library scores a drafter on its own, so `TargetStates` teacher-forces that step
at every position of a window, from one target forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DRAFTER_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")
FIRST_POSITION = 1  # the drafter needs the target's hidden state at t - 1


def is_drafter(config) -> bool:
    return getattr(config, "model_type", None) in DRAFTER_TYPES


def recipe_problems(recipe, config, recipe_path) -> list[tuple[str, str]]:
    """(recipe key, problem) for a recipe of a drafter, or a `target:` given to a model that is not one. A
    drafter's forward needs its target's states, which the calibrated passes (fed text) cannot give: it is
    quantized by RTN, and exported for vLLM (compressed-tensors), which runs it as `method: mtp`."""
    from pipeline.model import source_and_config

    if not is_drafter(config):
        return [("target", f"{recipe.model.id} is not a drafter ({config.model_type}); `target:` is for "
                           f"{' and '.join(DRAFTER_TYPES)} models")] if recipe.target else []
    if recipe.target is None:
        return [("target", f"{recipe.model.id} is a drafter ({config.model_type}): give the model it drafts for, "
                           "e.g. target: google/gemma-4-E2B-it")]
    problems = []
    if recipe.algorithm != "rtn":
        problems.append(("algorithm", f"a drafter is quantized by rtn; {recipe.algorithm} calibrates on text "
                                      "forwards, and a drafter's forward needs its target's states"))
    if recipe.export != "compressed-tensors":
        problems.append(("export", "a drafter is exported as compressed-tensors, for vLLM's speculative decoding; "
                                   "a GGUF drafter (llama.cpp's converter has one, GEMMA4_ASSISTANT) could only be "
                                   f"scored through llama.cpp's speculative path beside its target; got {recipe.export}"))
    if recipe.kv_cache:
        problems.append(("kv_cache", "a drafter has no KV cache of its own: it reads its target's"))
    _, target_config = source_and_config(recipe.target, recipe_path)
    return problems + target_problems(config, target_config)


def target_problems(config, target_config) -> list[tuple[str, str]]:
    """(recipe key, problem) where `target_config` is not a model this drafter can draft for."""
    text = target_config.get_text_config()
    problems = []
    if config.backbone_hidden_size != text.hidden_size:
        problems.append(("target", f"the drafter reads hidden states {config.backbone_hidden_size} wide; the "
                                   f"target's are {text.hidden_size}: not this drafter's target"))
    if config.get_text_config().vocab_size != text.vocab_size:
        problems.append(("target", f"the drafter's vocabulary has {config.get_text_config().vocab_size:,} tokens; "
                                   f"the target's {text.vocab_size:,}"))
    return problems


@dataclass
class TargetStates:
    """One target forward over token windows: what each teacher-forced drafter step reads."""

    input_ids: torch.Tensor  # [B, L]
    embeds: torch.Tensor  # [B, L, backbone]: the target's (scaled) input embeddings
    hidden: torch.Tensor  # [B, L, backbone]: the target's last hidden states
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]]  # per layer type: the keys and values the drafter reads
    target_next: torch.Tensor  # [B, L]: the target's own greedy next token at each position

    @classmethod
    @torch.no_grad()
    def of(cls, target, input_ids: torch.Tensor) -> TargetStates:
        out = target(input_ids=input_ids, output_hidden_states=True, return_shared_kv_states=True)
        return cls(input_ids=input_ids, embeds=target.get_input_embeddings()(input_ids).float(),
                   hidden=out.hidden_states[-1].float(),
                   kv={kind: (k.float(), v.float()) for kind, (k, v) in out.shared_kv_states.items()},
                   target_next=out.logits.argmax(-1))

    @torch.no_grad()
    def logits(self, drafter) -> torch.Tensor:
        """The drafter's next-token logits at positions FIRST_POSITION..L-1, [B, L-1, vocab], float32. Position
        t predicts token t + 1, so `logits[:, i]` lines up with `input_ids[:, FIRST_POSITION + i]` as a causal
        LM's logits line up with its input."""
        dtype = next(drafter.parameters()).dtype
        batch, length = self.input_ids.shape
        steps = []
        for t in range(FIRST_POSITION, length):
            inputs = torch.cat([self.embeds[:, t:t + 1], self.hidden[:, t - 1:t]], dim=-1).to(dtype)
            kv = {kind: (k[:, :, :t].to(dtype), v[:, :, :t].to(dtype)) for kind, (k, v) in self.kv.items()}
            out = drafter(inputs_embeds=inputs, position_ids=torch.full((batch, 1), t),
                          attention_mask=torch.ones(batch, t, dtype=torch.long), shared_kv_states=kv)
            steps.append(out.logits.float())
        return torch.cat(steps, dim=1)

    def target_agreement(self, drafter_logits: torch.Tensor) -> float:
        """How often the drafter's top-1 is the target's own next token: the share of drafted tokens a greedy
        target accepts, one step ahead."""
        return (drafter_logits.argmax(-1) == self.target_next[:, FIRST_POSITION:]).float().mean().item()


def target_states(target_source, target_config, input_ids: torch.Tensor, dtype: torch.dtype) -> TargetStates:
    """Load the target (BF16, computing in `dtype`), take its states on `input_ids`, let it go."""
    from pipeline.compute import computing_in
    from pipeline.model import load_model

    target = load_model(target_source, target_config).eval()
    with computing_in(target, dtype):
        return TargetStates.of(target, input_ids)
