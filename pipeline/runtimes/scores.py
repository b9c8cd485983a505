"""What a runtime says about held-out text, token by token, and how far two runtimes agree.

A runtime behind an HTTP API (vLLM's OpenAI server) returns, per prompt position, its top-k tokens'
log-probs and the actual next token's; it never returns the whole vocabulary. `Scores` holds that much
for any runtime, transformers included, so one `agreement` compares any two of them: top-1 agreement,
the mean absolute log-prob difference of the actual tokens, and a KL estimate over the other runtime's
top-k tokens plus one bucket for the rest of the vocabulary (coarsening a distribution never raises KL,
so the estimate is a lower bound of the full KL, up to the reference's own top-k cut, below).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.records import Agreement

REFERENCE_TOP_K = 64  # tokens kept per position from transformers' full distribution
RUNTIME_TOP_K = 20  # asked of a runtime per position (vLLM's default --max-logprobs)


@dataclass
class Scores:
    """Per scored position (a window's positions 0..L-2, each predicting the next token): the top-k
    token ids by log-prob, their log-probs (descending) and the actual next token's log-prob."""

    top_ids: torch.Tensor  # [positions, k] int64
    top_logprobs: torch.Tensor  # [positions, k] float32
    token_logprobs: torch.Tensor  # [positions] float32

    @classmethod
    def cat(cls, parts: list[Scores]) -> Scores:
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("top_ids", "top_logprobs", "token_logprobs")))

    def top(self, k: int) -> Scores:
        return Scores(self.top_ids[:, :k], self.top_logprobs[:, :k], self.token_logprobs)


def scores_from_logits(logits: torch.Tensor, window: torch.Tensor, k: int = REFERENCE_TOP_K) -> Scores:
    """A transformers forward's logits [1, L, vocab] on `window` [1, L] as Scores (L - 1 positions)."""
    logprobs = torch.log_softmax(logits[0, :-1].float(), -1)
    top = logprobs.topk(k, -1)
    return Scores(top.indices, top.values, logprobs.gather(-1, window[0, 1:, None].to(logprobs.device))[:, 0])


def agreement(reference: Scores, other: Scores) -> Agreement:
    """How far `other` (a runtime's top-k) agrees with `reference` (a wider top-k, transformers').

    The KL is KL(reference ‖ other) over other's top-k tokens and one bucket for the rest. Where one of
    other's top-k tokens is outside the reference's top-k (rare: the reference keeps more), the
    reference's last kept log-prob stands in for it, an upper bound on its probability."""
    if reference.top_ids.shape[0] != other.top_ids.shape[0]:
        raise ValueError(f"{other.top_ids.shape[0]} positions scored against {reference.top_ids.shape[0]}")
    match = other.top_ids[:, :, None] == reference.top_ids[:, None, :]  # [P, k, K]
    found = match.any(-1)
    at = torch.where(match, reference.top_logprobs[:, None, :], torch.zeros(())).sum(-1)
    ref_lp = torch.where(found, at, reference.top_logprobs[:, -1:].expand_as(at))
    eps = torch.tensor(1e-12)
    ref_rest = (1 - ref_lp.exp().sum(-1)).clamp_min(eps)
    other_rest = (1 - other.top_logprobs.exp().sum(-1)).clamp_min(eps)
    kl = (ref_lp.exp() * (ref_lp - other.top_logprobs)).sum(-1) + ref_rest * (ref_rest.log() - other_rest.log())
    return Agreement(positions=reference.top_ids.shape[0],
                     top1_agreement=(reference.top_ids[:, 0] == other.top_ids[:, 0]).float().mean().item(),
                     mean_abs_logprob_diff=(reference.token_logprobs - other.token_logprobs).abs().mean().item(),
                     kl_topk=kl.clamp_min(0).mean().item())
