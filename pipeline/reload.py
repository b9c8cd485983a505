"""Reload check: the export, loaded the way users load it, against the unquantized model.

One forward pass over a few probe sequences. The full quality report (KL over held-out text,
perplexity, generations) is the validation stage; this check only proves the folder loads
with every weight accounted for and computes what the in-memory quantized model computed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel

from pipeline.formats import COMPRESSED_TENSORS, FORMATS, ExportFormat

PROBE_SEQUENCES = 2
PROBE_TOKENS = 64
RELOAD_KL_LIMIT = 0.05  # nats per token, reloaded vs in-memory quantized model


class LogitComparison(BaseModel):
    kl_mean: float  # mean per-token KL(reference || candidate), nats
    top1_agreement: float
    max_abs_diff: float


class ReloadReport(BaseModel):
    missing_keys: list[str]
    unexpected_keys: list[str]
    mismatched_keys: list[str]
    vs_unquantized: LogitComparison
    vs_in_memory: LogitComparison

    @property
    def problems(self) -> list[str]:
        found = []
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            if keys := getattr(self, kind):
                found.append(f"{len(keys)} {kind.replace('_', ' ')} on reload, e.g. {keys[:3]}")
        # The reloaded model must compute what the in-memory quantized model computed. Judged by KL:
        # the loaders' kernels may compute in another precision or order than the in-memory model,
        # which flips near-tied top-1 tokens of random tiny models (dense: KL ~4e-4; MoE, whose
        # reloaded experts sum in another order and flip router ties: up to ~0.02); a weight loaded
        # wrong costs far more (random experts, wrong integers: KL of order 1).
        if self.vs_in_memory.kl_mean > RELOAD_KL_LIMIT:
            found.append(f"reloaded logits differ from the in-memory quantized model "
                         f"(KL {self.vs_in_memory.kl_mean:.4f} > {RELOAD_KL_LIMIT} nats, "
                         f"top-1 agreement {self.vs_in_memory.top1_agreement:.3f})")
        return found


def probe_input_ids(tokenizer) -> torch.Tensor:
    """Fixed probe text from the built-in held-out corpus, the same for every run of a model."""
    from pipeline.corpus import builtin_texts, token_windows

    return token_windows(tokenizer, builtin_texts("eval"), PROBE_SEQUENCES, PROBE_TOKENS)


@torch.no_grad()
def logits(model, input_ids) -> torch.Tensor:
    """The model's logits on the probe: its input ids, or for a drafter its target's states on them."""
    if not isinstance(input_ids, torch.Tensor):
        return input_ids.logits(model)  # pipeline/drafter.py's TargetStates
    device = next(model.parameters()).device
    return model(input_ids=input_ids.to(device)).logits.float().cpu()


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> LogitComparison:
    ref_logp = torch.log_softmax(reference, dim=-1)
    cand_logp = torch.log_softmax(candidate, dim=-1)
    kl = (ref_logp.exp() * (ref_logp - cand_logp)).sum(-1)
    return LogitComparison(
        kl_mean=kl.mean().item(),
        top1_agreement=(reference.argmax(-1) == candidate.argmax(-1)).float().mean().item(),
        max_abs_diff=(reference - candidate).abs().max().item(),
    )


def load_quantized(model_cls, folder: Path, fmt: ExportFormat, dtype: torch.dtype = torch.bfloat16):
    """The export loaded as users load its format, computing in `dtype`; with transformers' load report,
    less the keys it derives itself (pipeline/tables.py)."""
    from pipeline.tables import derived_on_load, loading_packed_tables
    from pipeline.tensors import StoredTensors

    with loading_packed_tables():
        model, info = model_cls.from_pretrained(folder, dtype=dtype, output_loading_info=True, **fmt.load_kwargs())
    stored = set(StoredTensors(folder).headers)
    info["missing_keys"] = [k for k in info.get("missing_keys", []) if not derived_on_load(k, stored)]
    return model, info


def reload_check(folder: Path, model_cls, input_ids, reference: torch.Tensor, in_memory: torch.Tensor,
                 fmt: ExportFormat = FORMATS[COMPRESSED_TENSORS], dtype: torch.dtype = torch.bfloat16) -> ReloadReport:
    """`reference` and `in_memory` are the probe's logits computed in `dtype`, as the reloaded model's are."""
    model, info = load_quantized(model_cls, folder, fmt, dtype)
    reloaded = logits(model, input_ids)
    return ReloadReport(
        missing_keys=sorted(info.get("missing_keys", [])),
        unexpected_keys=sorted(k for k in info.get("unexpected_keys", []) if not fmt.tolerated_unexpected(k)),
        mismatched_keys=sorted(str(k) for k in info.get("mismatched_keys", [])),
        vs_unquantized=compare(reference, reloaded),
        vs_in_memory=compare(in_memory, reloaded),
    )
