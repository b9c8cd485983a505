"""Validation's runtime check: the export run by a serving runtime, its log-probs on the held-out windows
against transformers' on the same export.

Validation keeps transformers' side (`Reference`: the windows and, per dtype transformers computed in,
each position's top tokens and the actual token's log-prob) in the run directory, so a check run later
(`gemma-quant serve-check`) compares the runtime with the export as validation judged it: an export
edited since then disagrees with it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.records import GateResult, Serving
from pipeline.recipe import ServeSpec
from pipeline.runtimes import RUNTIMES
from pipeline.runtimes.base import Machine, RuntimeFailed, Target, this_machine
from pipeline.runtimes.scores import RUNTIME_TOP_K, Scores, agreement

log = logging.getLogger(__name__)

CHAT_MESSAGE = "Write a haiku about the sea."
SERVE_SCRATCH = ".serve-"  # prefix of the check's scratch folder in the run directory


@dataclass
class Reference:
    """transformers' log-probs of the export on validation's windows, by the dtype it computed in."""

    windows: torch.Tensor  # [samples, seq_len] token ids
    scores: dict[str, Scores]  # "bfloat16" / "float32"

    def save(self, path: Path) -> None:
        tensors = {"windows": self.windows.contiguous()}
        for dtype, s in self.scores.items():
            tensors |= {f"{dtype}.top_ids": s.top_ids.contiguous(), f"{dtype}.top_logprobs": s.top_logprobs.contiguous(),
                        f"{dtype}.token_logprobs": s.token_logprobs.contiguous()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Reference:
        tensors = load_file(path)
        dtypes = {key.partition(".")[0] for key in tensors if key != "windows"}
        return cls(tensors["windows"], {d: Scores(tensors[f"{d}.top_ids"], tensors[f"{d}.top_logprobs"],
                                                  tensors[f"{d}.token_logprobs"]) for d in sorted(dtypes)})


def serve_check(target: Target, reference: Reference, spec: ServeSpec, run_dir: Path, logs_dir: Path,
                max_new_tokens: int, engine: str = "vllm", machine: Machine | None = None) -> Serving:
    """Serve `target` with `engine` and compare; or say why not, before starting anything."""
    runtime = RUNTIMES[engine]
    machine = machine or this_machine()
    reason = runtime.why_not(target, machine)
    if reason is None and not spec.vllm:
        reason = "turned off by the recipe (serve: {vllm: false})"
    if reason is not None:
        return Serving(engine=engine, status="not_run", reason=reason)
    record = Serving(engine=engine, status="failed", device=runtime.device(machine))
    reference_dtype = "bfloat16" if "bfloat16" in reference.scores else "float32"
    workdir = Path(tempfile.mkdtemp(prefix=SERVE_SCRATCH, dir=run_dir))
    log_path = logs_dir / f"{engine}-serve-{time.strftime('%Y%m%dT%H%M%S')}.log"
    try:
        record.version = runtime.version()
        log.info("serving the export with %s for the serve check (log: %s)", record.version, log_path)
        with runtime.running(target, workdir, log_path, spec.startup_timeout_s) as session:
            record.command, record.served, record.load_seconds = session.command, session.served, session.load_seconds
            measured = agreement(reference.scores[reference_dtype], session.score(reference.windows, RUNTIME_TOP_K))
            record.chat_reply = session.chat(CHAT_MESSAGE, max_new_tokens) if target.chat_template else None
    except RuntimeFailed as err:
        record.reason = str(err)
        return record
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    floor = None
    if {"bfloat16", "float32"} <= reference.scores.keys():
        floor = agreement(reference.scores["float32"], reference.scores["bfloat16"].top(RUNTIME_TOP_K))
    record = record.model_copy(update=measured.model_dump() | {"reference_dtype": reference_dtype, "floor": floor})
    record.gates = serve_gates(spec, record)
    record.status = "passed" if all(g.passed for g in record.gates) else "failed"
    return record


_METRICS = {"top1_agreement": "top-1 agreement", "kl_topk": "top-k KL", "mean_abs_logprob_diff": "mean |Δ log-prob|"}


def serve_gates(spec: ServeSpec, served: Serving) -> list[GateResult]:
    """The recipe's serve gates on the measured agreement; the floor-relative ones where the floor was measured."""
    limits = [("top1_min", "top1_agreement", spec.top1_min, ""),
              ("kl_topk_max", "kl_topk", spec.kl_topk_max, ""),
              ("logprob_diff_max", "mean_abs_logprob_diff", spec.logprob_diff_max, "")]
    if spec.floor_ratio_max is not None and served.floor is not None:
        limits += [(f"floor_ratio_max:{metric}", metric, spec.floor_ratio_max * getattr(served.floor, metric),
                    f" ({spec.floor_ratio_max:g} × the floor {getattr(served.floor, metric):.3g})")
                   for metric in ("kl_topk", "mean_abs_logprob_diff")]
    results = []
    for gate, metric, limit, how in limits:
        if limit is None:
            continue
        value = getattr(served, metric)
        passed = value >= limit if gate == "top1_min" else value <= limit
        message = (f"serve gate {gate} {'passed' if passed else 'failed'}: {served.engine}'s {_METRICS[metric]} with "
                   f"transformers {value:.4g} {'>=' if gate == 'top1_min' else '<='} {limit:.4g}{how} required over "
                   f"{served.positions:,} positions")
        results.append(GateResult(gate=gate, limit=limit, value=value, passed=passed, message=message))
    return results
