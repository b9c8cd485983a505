"""Validation: the export, reloaded the way users load it, against the unquantized source.

Quality on held-out text (per-token KL, top-1 agreement, perplexity), sizes on disk, greedy
generations side by side, structural checks on the stored tensors, and the recipe's gates.
The two models are never resident together: the reference logits are computed first and
kept on disk, one window at a time.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline import text_only
from pipeline.compute import computing_in, torch_dtype
from pipeline.drafter import FIRST_POSITION, TargetStates, is_drafter, target_states
from pipeline.corpus import (conversation_windows, load_conversations, load_texts, require_chat_template,
                             token_windows)
from pipeline.export import (config_problems, file_checksums, sidecar_problems, tensor_digest,
                             written_quantization_config)
from pipeline.formats import ExportFormat, expert_slice, export_format, fused_source
from pipeline.memory import MemoryPlan, load_within
from pipeline.model import SIDECAR_PATTERNS, Source, load_config, model_class, resolve, sidecar_files
from pipeline.reload import load_quantized
from pipeline.plan import Plan
from pipeline.recipe import Gates, HeldOutSpec
from pipeline.records import (DraftAcceptance, EvalReport, Floor, GateResult, GGUFResult, Generation, HeldOutQuality,
                             MeasuredSizes, ProjectorResult, Quality, Serving, Structure)
from pipeline.rundir import (DIGESTS, EVAL_JSON, EVAL_MD, EXPORT, MEMORY_PLAN, PLAN, RUNTIME_REFERENCE, Manifest,
                             Projector, ValidationRecord, library_versions, write_json_atomically)
from pipeline.runlock import holds_run_lock
from pipeline.runtimes.base import Target
from pipeline.runtimes.check import Reference, serve_check
from pipeline.runtimes.scores import Scores, scores_from_logits
from pipeline.tensors import StoredTensors, why_unreadable
from pipeline.tables import table_problems

KV_SCALES = ("k_scale", "v_scale")  # static FP8 KV-cache scales on attention modules (recipe kv_cache: fp8)


_EXPERT_OWNER = re.compile(r"^(.+\.experts)\.\d+\.(gate|up|down)_proj$")  # an export that stores experts unfused


class ValidationFailed(RuntimeError):
    pass


# ---------------------------------------------------------------- quality


@torch.no_grad()
def _window_logits(model, window: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=window.to(device)).logits.cpu()  # the model's own dtype: stored losslessly


class LoadProblems(RuntimeError):
    """The export does not load cleanly: measuring it would measure random weights."""


def load_export(cls, export: Path, fmt: ExportFormat, dtype: torch.dtype = torch.bfloat16):
    model, info = load_quantized(cls, export, fmt, dtype)
    info["unexpected_keys"] = [k for k in info.get("unexpected_keys", []) if not fmt.tolerated_unexpected(k)]
    problems = [f"{len(keys)} {kind.replace('_', ' ')} when transformers loads the export, e.g. {sorted(map(str, keys))[:3]}"
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if (keys := info.get(kind))]
    if problems:
        raise LoadProblems("; ".join(problems))
    return model.eval()


@dataclass(frozen=True)
class HeldOut:
    """Held-out token windows and the positions scored on them (bool, shaped like the windows): a position counts
    when its next token does, every position of plain text, of a conversation those before an assistant's token."""

    windows: torch.Tensor
    scored: torch.Tensor

    @classmethod
    def text(cls, windows: torch.Tensor) -> HeldOut:
        return cls(windows, torch.ones_like(windows, dtype=torch.bool))

    def split(self):
        """(window, its scored positions), one window at a time."""
        return zip(self.windows.split(1), self.scored.split(1))


def held_out_set(spec: HeldOutSpec, tokenizer) -> HeldOut:
    """A held-out set's windows: plain text packed end to end, or one conversation per window."""
    if spec.format == "text":
        texts = load_texts(spec.source, "eval", text_field=spec.text_field, hub_config=spec.config,
                           hub_split=spec.split)
        return HeldOut.text(token_windows(tokenizer, texts, spec.samples, spec.seq_len))
    require_chat_template(tokenizer, spec.source)
    conversations = load_conversations(spec.source, "eval", field=spec.text_field, hub_config=spec.config,
                                       hub_split=spec.split)
    return HeldOut(*conversation_windows(tokenizer, conversations, spec.samples, spec.seq_len))


class _Comparison:
    """Per-token KL(reference ‖ other), top-1 agreement and both negative log-likelihoods, window by window, at
    the positions scored."""

    def __init__(self):
        self.kls, self.agree, self.nll_ref, self.nll_other = [], [], [], []

    def add(self, ref: torch.Tensor, other: torch.Tensor, window: torch.Tensor, scored: torch.Tensor | None = None) -> None:
        """`scored`: the positions that count (None: all of them); the likelihoods are of each one's next token."""
        scored = torch.ones_like(window, dtype=torch.bool) if scored is None else scored
        ref, other = torch.log_softmax(ref.float(), -1), torch.log_softmax(other.float(), -1)
        self.kls.append((ref.exp() * (ref - other)).sum(-1)[scored])
        self.agree.append((ref.argmax(-1) == other.argmax(-1))[scored])
        targets, predicting = window[:, 1:].unsqueeze(-1), scored[:, :-1]
        self.nll_ref.append(-ref[:, :-1].gather(-1, targets).squeeze(-1)[predicting])
        self.nll_other.append(-other[:, :-1].gather(-1, targets).squeeze(-1)[predicting])

    def _figures(self) -> dict:
        kl = torch.cat(self.kls)
        ppl_reference, ppl_other = (torch.cat(n).mean().exp().item() for n in (self.nll_ref, self.nll_other))
        return dict(kl_mean=kl.mean().item(), kl_p99=torch.quantile(kl, 0.99).item(),
                    top1_agreement=torch.cat(self.agree).float().mean().item(), ppl_ratio=ppl_other / ppl_reference,
                    tokens=kl.numel(), ppl_reference=ppl_reference, ppl_quantized=ppl_other)

    def quality(self, dtype: torch.dtype, windows: torch.Tensor) -> Quality:
        return Quality(dtype=_name(dtype), samples=windows.shape[0], seq_len=windows.shape[1], **self._figures())

    def floor(self) -> Floor:
        return Floor(**{key: value for key, value in self._figures().items() if key in Floor.model_fields})


@dataclass
class Figures:
    """One held-out set's figures."""
    quality: dict[torch.dtype, Quality]  # by the dtype both models computed in
    bf16_floor: Floor | None  # where both bf16 and float32 were measured


@dataclass
class Compared:
    figures: list[Figures]  # one per held-out set, in the order given
    generations: list[Generation]


def compare_models(reference_fn, quantized_fn, held_out: list[HeldOut], scratch: Path, tokenizer,
                   prompts: list[str], max_new_tokens: int, dtypes: tuple[torch.dtype, ...],
                   generate_in: torch.dtype, on_quantized: Callable | None = None) -> Compared:
    """The quantized model against the reference on each held-out set, both computing in each of `dtypes` (loaded
    in their stored dtype, widened for float32: pipeline/compute.py): per-token KL(reference ‖ quantized), top-1
    agreement and both perplexities; with bf16 and float32, also bf16's own floor (the reference in bf16
    against itself in float32); greedy generations computing in `generate_in`. One model resident at a
    time: the quantized one first (so an export that does not load cleanly fails before any work), its
    logits kept on disk while the reference runs, each file removed once compared. `on_quantized(dtype,
    window, logits)` sees each of the quantized model's windows of the first set."""
    def passes(model, what: str):
        # One short forward in the stored dtype first: a reloaded export's compressed-tensors modules set up
        # their weights at the first forward, in the dtype it runs in, and a float32 one would mix dtypes.
        _window_logits(model, held_out[0].windows[:1, :8])
        for dtype in dtypes:
            with computing_in(model, dtype):
                for k, part in enumerate(held_out):
                    for i, (window, scored) in enumerate(tqdm(list(part.split()), leave=False,
                                                              desc=f"{what} logits, {_name(dtype)}, set {k + 1}")):
                        yield dtype, k, i, window, scored, _window_logits(model, window)

    model = quantized_fn()
    for dtype, k, i, window, _, logits in passes(model, "quantized"):
        torch.save(logits, scratch / f"quantized-{_name(dtype)}-{k}-{i}.pt")
        if on_quantized is not None and k == 0:
            on_quantized(dtype, window, logits)
    with computing_in(model, generate_in):
        quantized_text = greedy(model, tokenizer, prompts, max_new_tokens)
    del model
    model = reference_fn()
    compared = [{dtype: _Comparison() for dtype in dtypes} for _ in held_out]
    floors = [_Comparison() if set(dtypes) == {torch.bfloat16, torch.float32} else None for _ in held_out]
    for dtype, k, i, window, scored, logits in passes(model, "reference"):
        stored = scratch / f"quantized-{_name(dtype)}-{k}-{i}.pt"
        compared[k][dtype].add(logits, torch.load(stored), window, scored)
        stored.unlink()
        if floors[k] is not None and dtype == torch.bfloat16:
            torch.save(logits, scratch / f"reference-bfloat16-{k}-{i}.pt")
        elif floors[k] is not None:
            floors[k].add(logits, torch.load(bf16 := scratch / f"reference-bfloat16-{k}-{i}.pt"), window, scored)
            bf16.unlink()
    with computing_in(model, generate_in):
        reference_text = greedy(model, tokenizer, prompts, max_new_tokens)
    del model
    figures = [Figures({dtype: comparison.quality(dtype, part.windows) for dtype, comparison in by_dtype.items()},
                       floor.floor() if floor else None)
               for part, by_dtype, floor in zip(held_out, compared, floors)]
    generations = [Generation(prompt=p, reference=r, quantized=q)
                   for p, r, q in zip(prompts, reference_text, quantized_text)]
    return Compared(figures, generations)


def compare_drafters(reference_fn, quantized_fn, states: TargetStates, dtypes: tuple[torch.dtype, ...]
                     ) -> tuple[Compared, DraftAcceptance]:
    """compare_models for a drafter (pipeline/drafter.py): both drafters fed the target's states, teacher-forced
    at every position of the windows; the same KL / top-1 / perplexity of the next token, and how often each
    drafter's top-1 is the target's own. No generations: a drafter does not generate alone."""
    windows = states.input_ids[:, FIRST_POSITION:]  # what the drafter logits line up with
    drafted: dict[torch.dtype, torch.Tensor] = {}
    model = quantized_fn()
    for dtype in dtypes:
        with computing_in(model, dtype):
            drafted[dtype] = states.logits(model)
    del model
    model = reference_fn()
    compared, references, acceptance = {}, {}, None
    for dtype in dtypes:
        with computing_in(model, dtype):
            references[dtype] = states.logits(model)
        compared[dtype] = _Comparison()
        compared[dtype].add(references[dtype], drafted[dtype], windows)
        if acceptance is None or dtype == torch.float32:
            acceptance = DraftAcceptance(positions=windows.numel(), reference=states.target_agreement(references[dtype]),
                                         quantized=states.target_agreement(drafted[dtype]))
    del model
    floor = None
    if set(dtypes) == {torch.bfloat16, torch.float32}:
        floor = _Comparison()
        floor.add(references[torch.float32], references[torch.bfloat16], windows)
    quality = {dtype: c.quality(dtype, windows) for dtype, c in compared.items()}
    return Compared([Figures(quality, floor.floor() if floor else None)], []), acceptance


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        outputs.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return outputs


# ---------------------------------------------------------------- serving


class ReferenceRecorder:
    """transformers' log-probs of the export, window by window as compare_models computes them: what the
    serve check compares a runtime with (pipeline/runtimes/check.py)."""

    def __init__(self, windows: torch.Tensor):
        self.windows, self.parts = windows, defaultdict(list)

    def __call__(self, dtype: torch.dtype, window: torch.Tensor, logits: torch.Tensor) -> None:
        self.parts[_name(dtype)].append(scores_from_logits(logits, window))

    def reference(self) -> Reference:
        return Reference(self.windows, {dtype: Scores.cat(parts) for dtype, parts in self.parts.items()})


def served(run_dir: Path, plan: Plan, recipe, logs_dir: Path, serve: bool = True) -> Serving:
    """The serve check of `run_dir`'s export against validation's reference (pipeline/runtimes/check.py)."""
    if not serve:
        return Serving(status="not_run", reason="turned off for this validation (--no-serve)")
    if recipe.target is not None:
        return Serving(status="not_run", reason="a drafter is served only beside its target (vLLM's "
                       "--speculative-config, method mtp); the serve check starts one model")
    path = run_dir / RUNTIME_REFERENCE
    if not path.is_file():
        return Serving(status="not_run", reason="validation has no transformers log-probs of this export to compare "
                       "with (it did not load cleanly)")
    return serve_check(serving_target(run_dir, plan, recipe), Reference.load(path), recipe.serve, run_dir, logs_dir,
                       recipe.eval.max_new_tokens)


def serving_target(run_dir: Path, plan: Plan, recipe) -> Target:
    config = json.loads((run_dir / EXPORT / "config.json").read_text())
    return Target(export=run_dir / EXPORT, plan=plan, config=config, kv_cache=recipe.kv_cache)


# ---------------------------------------------------------------- structure


def check_structure(export: Path, source_dir: Path, plan: Plan, fmt: ExportFormat,
                    digests: dict[str, str] | None = None,
                    source_rename: Callable[[str], str | None] | None = None, kv_scales: bool = False) -> Structure:
    """Every source tensor outside the quantized modules is stored bit-identically; every quantized
    module is stored packed (not as a 16-bit weight); nothing else appears; no tensor changed since
    export (when its digests are known)."""
    src, out = StoredTensors(source_dir, source_rename, skip_unreadable=True), StoredTensors(export, skip_unreadable=True)
    by_name = {m.name: m for m in plan.modules}
    quantized = {m.name for m in plan.quantized}
    # The token tables and an untied head are checked against their source table (pipeline/tables.py).
    tables = {m.name for m in plan.tables} | ({plan.head.name} if plan.untied else set())
    problems, identical, stored_packed = [], 0, 0

    def where(name: str) -> str:
        m = by_name.get(name)
        return f"{name} ({m.component})" if m else name

    packed_dtypes = {}
    fused = {}  # the source's fused expert tensors, read once each, for an export that stores them per expert
    # One pass over the export, each tensor read once: changed since export, identical to the source.
    for key in out.files:
        owner, _, leaf = key.rpartition(".")
        stored = out.get(key)
        if digests is not None and key in digests and tensor_digest(stored) != digests[key]:
            problems.append(f"{where(owner)}: tensor {key} changed since the export was written")
        if owner in tables:
            continue
        if owner in quantized and leaf in fmt.module_tensors:
            packed_dtypes[owner] = stored.dtype if leaf == fmt.packed_weight else packed_dtypes.get(owner)
        elif kv_scales and leaf in KV_SCALES and f"{owner}.k_proj.weight" in src.files:
            continue
        elif key not in src.files and (part := fused_source(key)) and part[0] in src.files:
            fused_key, index, proj = part
            if fused_key not in fused:
                fused = {fused_key: src.get(fused_key)}
            if torch.equal(expert_slice(fused[fused_key], index, proj).to(stored.dtype), stored):
                identical += 1
            else:
                problems.append(f"{where(owner)}: {key} differs from expert {index} of the source's {fused_key}")
        elif key not in src.files:
            problems.append(f"{where(owner)}: unexpected tensor {key} in the export")
        elif owner not in quantized:
            source = src.get(key)
            if source.shape != stored.shape or not torch.equal(source.to(stored.dtype), stored):
                delta = ((source.float() - stored.float()).abs().max().item() if source.shape == stored.shape
                         else float("nan"))
                problems.append(f"{where(owner)}: {key} differs from the source (max |Δ| {delta:.3g})")
            else:
                identical += 1
    unfused = {f"{match[1]}.{fused_key}" for key in out.files if (match := _EXPERT_OWNER.match(key.rpartition(".")[0]))
               for fused_key in ("gate_up_proj", "down_proj")}
    problems += [f"{where(key.rpartition('.')[0])}: tensor {key} is missing from the export"
                 for key in src.files if key not in out.files and key.rpartition(".")[0] not in quantized | tables
                 and key not in unfused]
    if table_wrong := table_problems(out, src, plan):
        problems += table_wrong
    else:
        stored_packed += len(plan.tables)
    for name in sorted(quantized):
        keys = {k.rpartition(".")[2] for k in out.files if k.rpartition(".")[0] == name}
        if "weight" in keys or fmt.packed_weight not in keys or not keys & {"weight_scale", "scales"}:
            problems.append(f"{where(name)}: planned quantized but stored as {sorted(keys) or 'nothing'}")
        elif packed_dtypes[name] != torch.int32:
            problems.append(f"{where(name)}: {fmt.packed_weight} is not int32")
        else:
            stored_packed += 1
    if kv_scales:  # every attention that computes K/V has both scales (KV-shared ones have no k_proj)
        attentions = {k.removesuffix(".k_proj.weight") for k in src.files if k.endswith(".k_proj.weight")}
        problems += [f"{where(a)}: {a}.{leaf} is missing from the export"
                     for a in sorted(attentions) for leaf in KV_SCALES if f"{a}.{leaf}" not in out.files]
    return Structure(tensors_checked=len(src.files), kept_identical=identical,
                     quantized_stored=stored_packed, problems=problems)


# ---------------------------------------------------------------- sizes and gates


def measure_sizes(export: Path, source_dir: Path | None, plan: Plan, fmt: ExportFormat) -> MeasuredSizes:
    out = StoredTensors(export, skip_unreadable=True)
    quantized = {m.name for m in plan.quantized + plan.tables}
    per_module = defaultdict(int)
    for key in out.files:
        owner, _, leaf = key.rpartition(".")
        if owner in quantized and leaf in fmt.module_tensors:
            per_module[owner] += out.nbytes(key)
    quantized_params = sum(m.params for m in plan.quantized + plan.tables)
    quantized_bytes = sum(per_module.values())
    source_bytes = sum(p.stat().st_size for p in source_dir.glob("*.safetensors")) if source_dir else 0
    export_weights = sum(p.stat().st_size for p in export.glob("*.safetensors"))
    source_measured = source_bytes > 0
    source_bytes = source_bytes or plan.bf16_bytes
    return MeasuredSizes(
        source_weights_bytes=source_bytes, source_measured=source_measured,
        export_weights_bytes=export_weights,
        export_total_bytes=sum(p.stat().st_size for p in export.iterdir() if p.is_file()),
        export_vs_source=export_weights / source_bytes,
        quantized_params=quantized_params, quantized_bytes=quantized_bytes,
        bits_per_quantized_param=8 * quantized_bytes / quantized_params if quantized_params else 0.0,
    )


_GATES = {  # gate → (metric, direction): max gates fail above the limit, min gates below it
    "kl_mean_max": ("kl_mean", "max"),
    "kl_p99_max": ("kl_p99", "max"),
    "top1_min": ("top1_agreement", "min"),
    "ppl_ratio_max": ("ppl_ratio", "max"),
}


def check_gates(gates: Gates, quality: Quality) -> list[GateResult]:
    results = []
    for gate, limit in gates.model_dump().items():
        if limit is None:
            continue
        metric, direction = _GATES[gate]
        value = getattr(quality, metric)
        passed = value <= limit if direction == "max" else value >= limit
        miss = abs(value - limit)
        message = (f"gate {gate} {'passed' if passed else 'failed'}: {metric} {value:.5g} "
                   f"{'<=' if direction == 'max' else '>='} {limit:g} required"
                   + ("" if passed else f", missed by {miss:.3g} ({miss / limit:.1%})"))
        results.append(GateResult(gate=gate, limit=limit, value=value, passed=passed, message=message))
    return results


# ---------------------------------------------------------------- the stage


def source_weights_dir(source: Source) -> Path | None:
    """Local folder with the source's safetensors: the model folder, or the Hub cache after download."""
    if source.path is not None:
        return source.path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.spec.id, revision=source.spec.revision,
                                      allow_patterns=["*.safetensors", *SIDECAR_PATTERNS]))
    except Exception:
        return None


def record_problems(run_dir: Path, manifest: Manifest) -> list[str]:
    """The export against what the run recorded when it wrote it (the manifest's file list and the tensor
    digests' checksum), not against an earlier validation: every file the pipeline wrote is there and
    unchanged, nothing was added (the card, written after, is the card's own check)."""
    from pipeline.card import CARD

    written = manifest.export.files
    current = file_checksums(run_dir / EXPORT)
    problems = []
    for name in sorted((written.keys() | current.keys()) - {CARD}):
        if name not in current:
            problems.append(f"{EXPORT}/{name} was written at export but is missing")
        elif name not in written:
            problems.append(f"{EXPORT}/{name} is in the export but the pipeline did not write it")
        elif current[name].sha256 != written[name].sha256:
            problems.append(f"{EXPORT}/{name} changed since export")
    digests = run_dir / DIGESTS
    if not digests.is_file():
        problems.append(f"{DIGESTS} is missing: the export's tensors cannot be checked against what was written")
    elif hashlib.sha256(digests.read_bytes()).hexdigest() != manifest.export.tensor_digests_sha256:
        problems.append(f"{DIGESTS} changed since export")
    return problems


def unreadable_tensor_files(export: Path) -> list[str]:
    return [f"{EXPORT}/{path.name} cannot be read: {why}" for path in sorted(export.glob("*.safetensors"))
            if (why := why_unreadable(path))]


def read_digests(run_dir: Path) -> dict[str, str] | None:
    """The export-time tensor digests; None when missing or unreadable (record_problems says which)."""
    try:
        digests = json.loads((run_dir / DIGESTS).read_text())
    except (OSError, ValueError):
        return None
    return digests if isinstance(digests, dict) else None


@holds_run_lock
def validate_run(run_dir: Path, serve: bool = True, logs_dir: Path | None = None) -> EvalReport:
    """Validate `run_dir/export`; write eval.json, eval.md and the manifest's verdict. `serve`: also the serve
    check, where a runtime can run the export here (its log in `logs_dir`, default run_dir/logs).
    Raises ValidationFailed (after writing everything) when a structural check, gate or serve check fails."""
    from transformers import AutoTokenizer

    manifest = Manifest.load(run_dir)
    recipe = manifest.recipe
    plan = Plan.load(run_dir / PLAN)
    export = run_dir / EXPORT
    source = resolve(recipe.model)
    config = load_config(source)
    if text_only.wanted(recipe):
        config = text_only.text_only_config(config)
    spec = recipe.eval
    drafter = is_drafter(config)
    tokens_of = resolve(recipe.target) if drafter else source  # a drafter reads its target's tokens
    tokenizer = AutoTokenizer.from_pretrained(tokens_of.ref, revision=tokens_of.spec.revision)
    held_out = [held_out_set(held, tokenizer) for held in spec.held_out]
    memory = MemoryPlan.model_validate_json((run_dir / MEMORY_PLAN).read_text())
    for stale in run_dir.glob(".eval-*"):  # a killed validation's logits: this process holds the run's lock
        shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=".eval-", dir=run_dir))

    def reference():
        if text_only.wanted(recipe):
            return text_only.load_text_model(source, config, torch.bfloat16).eval()
        return load_within(memory, source, config, scratch / "offload", torch.bfloat16).eval()  # disk-offloaded if it was

    if recipe.export == "gguf":
        try:
            report = validate_gguf(run_dir, manifest, plan, source, held_out, reference,
                                   torch.float32 if memory.float32_fits else torch.bfloat16, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        _write_verdict(run_dir, manifest, report, file_checksums(export))
        return report
    cls = model_class(config)
    fmt = export_format(recipe.export)
    qconfig, qconfig_wrong = written_quantization_config(export)
    if qconfig is not None:
        qconfig_wrong = config_problems(qconfig, plan, recipe.export)
    sidecars_wrong = sidecar_problems(export, text_only.export_sidecars(recipe, sidecar_files(source)))
    # Both models load in their stored dtype, BF16, and are widened for the float32 figures.
    if not memory.float32_fits:
        dtypes = (torch.bfloat16,)
    else:
        dtypes = (torch.bfloat16, torch.float32) if spec.served else (torch.float32,)

    recorded = record_problems(run_dir, manifest)
    unreadable = unreadable_tensor_files(export)
    compared, load_problems, acceptance = None, unreadable, None
    recorder = ReferenceRecorder(held_out[0].windows)  # the serve check runs the eval set
    (run_dir / RUNTIME_REFERENCE).unlink(missing_ok=True)  # an earlier validation's: not this export's
    try:
        if unreadable:
            raise LoadProblems("; ".join(unreadable))
        if qconfig_wrong:
            raise LoadProblems("not loaded: the export's quantization_config does not say what the plan says, "
                               "so a loader would read its integers wrongly (see the structure problems)")
        if drafter:
            states = target_states(tokens_of, load_config(tokens_of), held_out[0].windows, torch.float32)
            compared, acceptance = compare_drafters(reference, lambda: load_export(cls, export, fmt), states, dtypes)
        else:
            compared = compare_models(reference, lambda: load_export(cls, export, fmt), held_out, scratch, tokenizer,
                                      spec.prompts, spec.max_new_tokens, dtypes, torch_dtype(memory.compute_dtype),
                                      on_quantized=recorder)
            recorder.reference().save(run_dir / RUNTIME_REFERENCE)
    except LoadProblems as err:
        load_problems = unreadable or [str(err)]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    weights_dir = source_weights_dir(source)
    digests = read_digests(run_dir)
    rename = text_only.source_key if text_only.wanted(recipe) else None
    structure = (check_structure(export, weights_dir, plan, fmt, digests, rename,
                                  kv_scales=(qconfig or {}).get("kv_cache_scheme") is not None)
                 if weights_dir and not unreadable else
                 Structure(tensors_checked=0, kept_identical=0, quantized_stored=0,
                           problems=[] if unreadable else ["the source's weights are not available locally to compare with"]))
    structure.problems = recorded + qconfig_wrong + sidecars_wrong + structure.problems
    figures = compared.figures if compared else []
    main = reported(figures[0] if figures else None)
    quality = main["quality"]
    report = EvalReport(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model_id=recipe.model.id, scheme=recipe.scheme, eval=spec, **main,
        conversations=HeldOutQuality(**reported(figures[1])) if len(figures) > 1 else None,
        sizes=measure_sizes(export, weights_dir, plan, fmt),
        generations=compared.generations if compared else [],
        structure=structure, gates=check_gates(recipe.gates, quality) if quality else [],
        serving=served(run_dir, plan, recipe, logs_dir or run_dir / "logs", serve),
        load_problems=load_problems, versions=library_versions(), draft_acceptance=acceptance,
    )
    _write_verdict(run_dir, manifest, report, file_checksums(export))
    return report


def reported(figures: Figures | None) -> dict:
    """A set's figures as the report holds them: the quantization error (both in float32, else bf16), the quality
    as served (both in bf16, where float32 was measured too) and bf16's own floor."""
    by_dtype = figures.quality if figures else {}
    return dict(quality=by_dtype.get(torch.float32) or by_dtype.get(torch.bfloat16),
                served=by_dtype.get(torch.bfloat16) if torch.float32 in by_dtype else None,
                bf16_floor=figures.bf16_floor if figures else None)


def validate_gguf(run_dir: Path, manifest: Manifest, plan: Plan, source: Source, held_out: list[HeldOut],
                  reference_fn: Callable, dtype: torch.dtype, scratch: Path) -> EvalReport:
    """`export: gguf`: every file loaded by llama.cpp and scored on the held-out sets against the unquantized
    model in transformers (computing in `dtype`), the same KL / top-1 / perplexity as the other formats'; one
    chat reply through the file's own chat template; each file's tensors against the digests written at export."""
    from pipeline.gguf_export import gguf_tensor_digests, parameters
    from pipeline.runtimes.base import RuntimeFailed

    recipe, export = manifest.recipe, run_dir / EXPORT
    problems = record_problems(run_dir, manifest)
    written = read_digests(run_dir) or {}
    now = gguf_tensor_digests(export)
    problems += [f"{EXPORT}/{key.replace(':', ': tensor ', 1)} changed since export" for key in sorted(written)
                 if key in now and now[key] != written[key]]
    save_reference_logits(reference_fn(), held_out, dtype, scratch)
    results = []
    for entry in manifest.export.gguf:
        path = export / entry.name
        result = dict(type=entry.type, label=entry.label, file=entry.name, calibrated=entry.calibrated,
                      bytes=path.stat().st_size if path.is_file() else 0, quality=None)
        result["bits_per_weight"] = 8 * result["bytes"] / max(parameters(path), 1) if path.is_file() else 0.0
        try:
            qualities, result["load_seconds"], result["chat_reply"] = score_gguf(
                path, plan, held_out, dtype, scratch, entry.label, recipe.eval.max_new_tokens)
            result["quality"], *conversations = qualities
            result["conversations"] = conversations[0] if conversations else None
        except RuntimeFailed as err:
            result["problem"] = str(err)
        results.append(GGUFResult(**result))
    projector = check_projector(export, manifest.export.projector, results, plan, scratch)
    gates = [gate.model_copy(update={"gate": f"{r.label}: {gate.gate}", "message": f"{r.label}: {gate.message}"})
             for r in results if r.quality for gate in check_gates(recipe.gates, r.quality)]
    return EvalReport(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), model_id=recipe.model.id,
        scheme=recipe.scheme, eval=recipe.eval, quality=None, served=None, bf16_floor=None,
        sizes=gguf_sizes(export, source_weights_dir(source), plan), generations=[],
        structure=Structure(tensors_checked=len(now), kept_identical=0, quantized_stored=0, problems=problems),
        gates=gates, serving=Serving(status="not_run", reason="a GGUF build is checked in llama.cpp (above), not vLLM"),
        versions=library_versions(), load_problems=[], gguf=results, projector=projector)


def check_projector(export: Path, written: Projector | None, files: list[GGUFResult], plan: Plan,
                    scratch: Path) -> ProjectorResult | None:
    """The projector file loaded by llama.cpp's mtmd beside the first text file llama.cpp scored."""
    from pipeline.runtimes import RUNTIMES
    from pipeline.runtimes.base import RuntimeFailed

    if written is None:
        return None
    if written.name is None:
        return ProjectorResult(file=None, why_not=written.why_not)
    path = export / written.name
    result = ProjectorResult(file=written.name, bytes=path.stat().st_size if path.is_file() else 0)
    loaded = next((f for f in files if f.quality), None)
    if loaded is None:
        return result.model_copy(update={"problem": "no text file loaded in llama.cpp to load it beside"})
    target = Target(export=export / loaded.file, plan=plan, config={"max_position_embeddings": 64}, kv_cache=None)
    try:
        with RUNTIMES["llama.cpp"].running(target, scratch, scratch / "llama.log", 600) as session:
            vision, audio = session.projector(path)
    except RuntimeFailed as err:
        return result.model_copy(update={"problem": str(err)})
    towers = {m.component for m in plan.modules}
    missing = [tower for tower, encodes in (("vision", vision), ("audio", audio)) if tower in towers and not encodes]
    return result.model_copy(update={"vision": vision, "audio": audio, "problem": (
        f"llama.cpp's mtmd loaded it without the {' and '.join(missing)} encoder the model has" if missing else None)})


def save_reference_logits(model, held_out: list[HeldOut], dtype: torch.dtype, scratch: Path) -> None:
    """The unquantized model's logits per window of each set, computing in `dtype`, into `scratch` for score_gguf."""
    with computing_in(model, dtype):
        for k, part in enumerate(held_out):
            for i, window in enumerate(tqdm(part.windows.split(1), desc=f"reference logits, {_name(dtype)}, "
                                            f"set {k + 1}", leave=False)):
                torch.save(_window_logits(model, window).float(), scratch / f"reference-{k}-{i}.pt")


def score_gguf(path: Path, plan: Plan, held_out: list[HeldOut], dtype: torch.dtype, scratch: Path, label: str,
               chat_tokens: int = 0) -> tuple[list[Quality], float, str | None]:
    """One GGUF file loaded by llama.cpp and scored on each held-out set against the reference logits in `scratch`
    (save_reference_logits): its quality on each, load seconds, and with `chat_tokens` a greedy reply through the
    file's own chat template. Raises RuntimeFailed with llama.cpp's reason."""
    from pipeline.gguf_export import has_chat_template
    from pipeline.runtimes import RUNTIMES
    from pipeline.runtimes.base import RuntimeFailed, this_machine
    from pipeline.runtimes.check import CHAT_MESSAGE

    runtime = RUNTIMES["llama.cpp"]
    longest = max(part.windows.shape[1] for part in held_out)
    target = Target(export=path, plan=plan, config={"max_position_embeddings": longest}, kv_cache=None)
    if reason := runtime.why_not(target, this_machine()):
        raise RuntimeFailed(reason)
    with runtime.running(target, scratch, scratch / "llama.log", 600) as session:
        qualities = []
        for k, part in enumerate(held_out):
            comparison = _Comparison()
            for i, (window, scored) in enumerate(tqdm(list(part.split()), desc=f"llama.cpp logits, {label}, "
                                                      f"set {k + 1}", leave=False)):
                reference_logits = torch.load(scratch / f"reference-{k}-{i}.pt")
                logits = session.logits(window)
                vocab = logits.shape[-1]  # the converter drops table rows past the tokenizer's vocabulary
                comparison.add(reference_logits[..., :vocab], logits, window, scored)
            qualities.append(comparison.quality(dtype, part.windows))
        reply = session.chat(CHAT_MESSAGE, chat_tokens) if chat_tokens and has_chat_template(path) else None
        return qualities, session.load_seconds, reply


def gguf_sizes(export: Path, source_dir: Path | None, plan: Plan) -> MeasuredSizes:
    source_bytes = sum(p.stat().st_size for p in source_dir.glob("*.safetensors")) if source_dir else 0
    from pipeline.gguf_export import IMATRIX

    files = sorted(p for p in export.glob("*.gguf") if p.name != IMATRIX)
    largest = max((p.stat().st_size for p in files), default=0)
    return MeasuredSizes(source_weights_bytes=source_bytes or plan.bf16_bytes, source_measured=source_bytes > 0,
                         export_weights_bytes=largest, export_total_bytes=sum(p.stat().st_size for p in files),
                         export_vs_source=largest / (source_bytes or plan.bf16_bytes), quantized_params=0,
                         quantized_bytes=0, bits_per_quantized_param=0.0)


@holds_run_lock
def serve_check_run(run_dir: Path, logs_dir: Path | None = None) -> EvalReport:
    """The serve check alone, on a validated run (`gemma-quant serve-check`): against the transformers
    log-probs validation recorded, so an export changed since disagrees. Updates eval.json, eval.md and
    the manifest's verdict; raises ValidationFailed when the check fails."""
    manifest = Manifest.load(run_dir)
    if manifest.validation is None or not (run_dir / EVAL_JSON).is_file():
        raise ValidationFailed(f"{run_dir} was not validated: run `gemma-quant validate {run_dir}` first")
    report = EvalReport.model_validate_json((run_dir / EVAL_JSON).read_text())
    report.serving = served(run_dir, Plan.load(run_dir / PLAN), manifest.recipe, logs_dir or run_dir / "logs")
    _write_verdict(run_dir, manifest, report)
    return report


def _write_verdict(run_dir: Path, manifest: Manifest, report: EvalReport, export_files=None) -> None:
    write_json_atomically(run_dir / EVAL_JSON, report.model_dump(mode="json") | {"passed": report.passed})
    (run_dir / EVAL_MD).write_text(render_markdown(report))
    manifest.status = "validated" if report.passed else "failed_validation"
    manifest.validation = ValidationRecord(passed=report.passed, failures=report.failures, quality=report.quality,
                                           conversations=report.conversations and report.conversations.quality,
                                           serving=report.serving,
                                           export_files=export_files or manifest.validation.export_files)
    manifest.save(run_dir)
    if not report.passed:
        raise ValidationFailed("validation failed: " + "; ".join(report.failures))


_QUALITY_ROWS = {"kl_mean": ("KL mean (unquantized ‖ quantized)", 5), "kl_p99": ("KL p99", 5),
                 "top1_agreement": ("top-1 agreement", 4), "ppl_reference": ("perplexity, unquantized", 3),
                 "ppl_quantized": ("perplexity, quantized", 3), "ppl_ratio": ("perplexity ratio", 4)}


def quality_table(quality: Quality, served: Quality | None, floor: Floor | None) -> list[str]:
    """One column per measured figure: the quantization error (float32), as served (bf16) and bf16's own
    floor; or the one figure measured where float32 did not fit."""
    if served is None:
        columns = {f"both in {quality.dtype}": quality}
    else:
        columns = {"quantization error (both in float32)": quality, "as served (both in bf16)": served,
                   "bf16's own floor (source in bf16 vs float32)": floor}
    rows = [f"| metric | {' | '.join(columns)} |", "|---|" + "---:|" * len(columns)]
    for key, (label, digits) in _QUALITY_ROWS.items():
        values = [getattr(figures, key, None) for figures in columns.values()]
        rows.append(f"| {label} | " + " | ".join("" if v is None else f"{v:.{digits}f}" for v in values) + " |")
    return rows


def held_out_line(spec: HeldOutSpec, quality: Quality) -> str:
    """What a set's figures were measured on."""
    if spec.format == "messages":
        return (f"Held-out conversations: {spec.source}, {quality.samples} conversations in the chat template, each "
                f"cut at {quality.seq_len} tokens, scored on the assistant turns only ({quality.tokens:,} tokens).")
    return f"Held-out text: {spec.source}, {quality.samples} windows × {quality.seq_len} tokens ({quality.tokens:,} scored)."


def serving_lines(serving: Serving) -> list[str]:
    if serving.status == "not_run":
        return [f"Not run: {serving.reason}."]
    lines = [f"{serving.status.upper()}: {serving.version} on {serving.device}, started as `{serving.command}` "
             f"({serving.load_seconds} s to serve), given {serving.served}."]
    if serving.top1_agreement is None:
        return lines + ["", f"- {serving.reason}"]
    rows = {"top1_agreement": ("top-1 agreement", 4), "mean_abs_logprob_diff": ("mean |Δ log-prob|, actual token", 4),
            "kl_topk": ("KL over vLLM's top-20 and the rest", 5)}
    floor = serving.floor
    lines += ["", f"{serving.positions:,} held-out positions, vLLM against transformers computing in "
              f"{serving.reference_dtype} on the same export; the floor is transformers in bf16 against float32.", "",
              "| metric | vLLM vs transformers | floor |", "|---|---:|---:|"]
    for key, (label, digits) in rows.items():
        lines.append(f"| {label} | {getattr(serving, key):.{digits}f} | "
                     + (f"{getattr(floor, key):.{digits}f}" if floor else "not measured") + " |")
    lines += ["", *[f"- {g.message}" for g in serving.gates]]
    if serving.chat_reply is not None:
        lines += [f"- chat reply through the chat template: {serving.chat_reply!r}"]
    return lines


def gguf_table(report: EvalReport) -> list[str]:
    """Each GGUF file as llama.cpp scored it against the unquantized model in transformers."""
    scored = next((g for g in report.gguf if g.quality), None)
    conversations = report.eval.conversations
    lines = [f"GGUF files in llama.cpp against the unquantized model in transformers ({scored.quality.dtype}). "
             + held_out_line(report.eval, scored.quality) + (
                 f" {held_out_line(conversations, scored.conversations)}" if scored.conversations else "")
             if scored else "GGUF files in llama.cpp: none was scored.", "",
             "| file | type | bytes | bits per weight | KL mean | KL p99 | top-1 | PPL ratio | "
             + ("conversations: KL mean | conversations: top-1 | " if conversations else "") + "chat reply |",
             "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if conversations else "") + "---|"]
    for g in report.gguf:
        q, c = g.quality, g.conversations
        figures = (f"{q.kl_mean:.5f} | {q.kl_p99:.5f} | {q.top1_agreement:.4f} | {q.ppl_ratio:.4f}" if q
                   else f"not measured: {g.problem} | | |")
        if conversations:
            figures += f" | {c.kl_mean:.5f} | {c.top1_agreement:.4f}" if c else " | |"
        lines.append(f"| `{g.file}` | {g.label} | {g.bytes:,} | {g.bits_per_weight:.2f} | {figures} | "
                     f"{'' if g.chat_reply is None else repr(g.chat_reply)} |")
    if (projector := report.projector) is not None:
        lines += ["", f"Projector (mmproj): `{projector.file}`, {projector.bytes:,} bytes, " + (
            f"failed: {projector.problem}" if projector.problem else
            f"loaded by llama.cpp's mtmd: image encoder {projector.vision}, audio encoder {projector.audio}")
            if projector.file else f"Projector (mmproj): not written: {projector.why_not}"]
    return lines


def render_markdown(report: EvalReport) -> str:
    q, s, c = report.quality, report.sizes, report.conversations
    quality = ([held_out_line(report.eval, q), "", *quality_table(q, report.served, report.bf16_floor)] if q
               else gguf_table(report) if report.gguf else [f"Quality not measured: {'; '.join(report.load_problems)}"])
    if c:
        quality += ["", held_out_line(report.eval.conversations, c.quality), "",
                    *quality_table(c.quality, c.served, c.bf16_floor)]
    lines = [
        f"# Validation: {report.model_id}, {report.scheme}", "",
        *quality, "", "| size | value |", "|---|---|",
        f"| weights on disk | {s.export_weights_bytes / 1e6:,.1f} MB vs {s.source_weights_bytes / 1e6:,.1f} MB BF16"
        f"{'' if s.source_measured else ' (estimated)'} ({s.export_vs_source:.1%}) |",
        f"| bits per quantized parameter | {s.bits_per_quantized_param:.3f} |", "",
        "## Gates", "",
        *([f"- {g.message}" for g in report.gates] or ["- none set in the recipe"]), "",
        "## Structure", "",
        f"{report.structure.kept_identical} kept tensors bit-identical to the source, "
        f"{report.structure.quantized_stored} quantized modules stored packed.",
        *[f"- PROBLEM: {p}" for p in report.structure.problems], "",
        "## Served by vLLM", "", *serving_lines(report.serving), "",
    ]
    if d := report.draft_acceptance:
        lines += ["## Draft acceptance (a drafter, fed its target's states)", "",
                  f"Top-1 equal to the target's own next token at {d.quantized:.1%} of {d.positions:,} positions "
                  f"(unquantized drafter: {d.reference:.1%}).", ""]
    if report.generations:
        lines += ["## Greedy generations", ""]
    for g in report.generations:
        lines += [f"**{g.prompt}**", "", f"- unquantized: {g.reference!r}", f"- quantized: {g.quantized!r}", ""]
    return "\n".join(lines)
