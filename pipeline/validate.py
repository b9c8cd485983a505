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
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline import text_only
from pipeline.compute import torch_dtype
from pipeline.corpus import load_texts, token_windows
from pipeline.export import (config_problems, file_checksums, sidecar_problems, tensor_digest,
                             written_quantization_config)
from pipeline.formats import ExportFormat, expert_slice, export_format, fused_source
from pipeline.memory import MemoryPlan, load_within
from pipeline.model import Source, load_config, model_class, resolve, sidecar_files
from pipeline.reload import load_quantized
from pipeline.plan import Plan
from pipeline.recipe import Gates
from pipeline.records import EvalReport, GateResult, Generation, MeasuredSizes, Quality, Serving, Structure
from pipeline.rundir import (DIGESTS, EVAL_JSON, EVAL_MD, EXPORT, MEMORY_PLAN, PLAN, Manifest,
                             ValidationRecord, library_versions, write_json_atomically)
from pipeline.runlock import holds_run_lock
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


def compare_models(reference_fn, quantized_fn, windows: torch.Tensor, scratch: Path, tokenizer,
                   prompts: list[str], max_new_tokens: int) -> tuple[Quality, list[Generation]]:
    """KL(reference || quantized) per token, top-1 agreement, both perplexities and greedy
    generations. `reference_fn` and `quantized_fn` load the two models, both in the same dtype. One model
    resident at a time: the quantized one first (so an export that does not load cleanly fails before any
    work), its logits kept on disk while the reference runs."""
    model = quantized_fn()
    for i, window in enumerate(tqdm(windows.split(1), desc="quantized logits", leave=False)):
        torch.save(_window_logits(model, window), scratch / f"quantized-{i}.pt")
    quantized_text = greedy(model, tokenizer, prompts, max_new_tokens)
    del model
    model = reference_fn()
    dtype = next(model.parameters()).dtype
    kls, agree, nll_ref, nll_q = [], [], [], []
    for i, window in enumerate(tqdm(windows.split(1), desc="reference logits", leave=False)):
        ref = torch.log_softmax(_window_logits(model, window).float(), -1)
        got = torch.log_softmax(torch.load(scratch / f"quantized-{i}.pt").float(), -1)
        kls.append((ref.exp() * (ref - got)).sum(-1).flatten())
        agree.append((ref.argmax(-1) == got.argmax(-1)).flatten())
        targets = window[:, 1:].unsqueeze(-1)
        nll_ref.append(-ref[:, :-1].gather(-1, targets).flatten())
        nll_q.append(-got[:, :-1].gather(-1, targets).flatten())
    reference_text = greedy(model, tokenizer, prompts, max_new_tokens)
    del model
    kl = torch.cat(kls)
    ppl_ref, ppl_q = torch.cat(nll_ref).mean().exp().item(), torch.cat(nll_q).mean().exp().item()
    quality = Quality(
        dtype=str(dtype).removeprefix("torch."), samples=windows.shape[0], seq_len=windows.shape[1], tokens=kl.numel(),
        kl_mean=kl.mean().item(), kl_p99=torch.quantile(kl, 0.99).item(),
        top1_agreement=torch.cat(agree).float().mean().item(),
        ppl_reference=ppl_ref, ppl_quantized=ppl_q, ppl_ratio=ppl_q / ppl_ref,
    )
    generations = [Generation(prompt=p, reference=r, quantized=q)
                   for p, r, q in zip(prompts, reference_text, quantized_text)]
    return quality, generations


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


def serving_record(plan: Plan) -> Serving:
    """Why this validation did not serve the export with vLLM (../shared/notes/gemma4-quantization-findings.md,
    "vLLM on these CPU machines")."""
    if plan.tables:
        return Serving(status="not_run", reason="its quantized token tables are dequantized by a Triton kernel in "
                       "vLLM, which vLLM's CPU build, the only one this validation can run, lacks")
    return Serving(status="not_run", reason="this version of gemma-quant has no vLLM serve check: vLLM's CPU build "
                   "lacks its W4A16 kernel on AVX2-only CPUs, one of the machine kinds it is tested on")


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
                                      allow_patterns=["*.safetensors", "*.json"]))
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
def validate_run(run_dir: Path) -> EvalReport:
    """Validate `run_dir/export`; write eval.json, eval.md and the manifest's verdict.
    Raises ValidationFailed (after writing everything) when a structural check or gate fails."""
    from transformers import AutoTokenizer

    manifest = Manifest.load(run_dir)
    recipe = manifest.recipe
    plan = Plan.load(run_dir / PLAN)
    export = run_dir / EXPORT
    source = resolve(recipe.model)
    config = load_config(source)
    if text_only.wanted(recipe):
        config = text_only.text_only_config(config)
    cls = model_class(config)
    fmt = export_format(recipe.export)
    qconfig, qconfig_wrong = written_quantization_config(export)
    if qconfig is not None:
        qconfig_wrong = config_problems(qconfig, plan, recipe.export)
    sidecars_wrong = sidecar_problems(export, text_only.export_sidecars(recipe, sidecar_files(source)))
    tokenizer = AutoTokenizer.from_pretrained(source.ref, revision=recipe.model.revision)
    spec = recipe.eval
    texts = load_texts(spec.source, "eval", text_field=spec.text_field, hub_config=spec.config, hub_split=spec.split)
    windows = token_windows(tokenizer, texts, spec.samples, spec.seq_len)

    memory = MemoryPlan.model_validate_json((run_dir / MEMORY_PLAN).read_text())
    dtype = torch_dtype(memory.compute_dtype)

    def reference():
        if text_only.wanted(recipe):
            return text_only.load_text_model(source, config, dtype).eval()
        return load_within(memory, source, config, scratch / "offload", dtype).eval()  # disk-offloaded if it was

    recorded = record_problems(run_dir, manifest)
    unreadable = unreadable_tensor_files(export)
    for stale in run_dir.glob(".eval-*"):  # a killed validation's logits: this process holds the run's lock
        shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=".eval-", dir=run_dir))
    quality, generations, load_problems = None, [], unreadable
    try:
        if unreadable:
            raise LoadProblems("; ".join(unreadable))
        if qconfig_wrong:
            raise LoadProblems("not loaded: the export's quantization_config does not say what the plan says, "
                               "so a loader would read its integers wrongly (see the structure problems)")
        quality, generations = compare_models(reference, lambda: load_export(cls, export, fmt, dtype), windows, scratch,
                                              tokenizer, spec.prompts, spec.max_new_tokens)
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
    report = EvalReport(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model_id=recipe.model.id, scheme=recipe.scheme, eval=spec, quality=quality,
        sizes=measure_sizes(export, weights_dir, plan, fmt),
        generations=generations,
        structure=structure, gates=check_gates(recipe.gates, quality) if quality else [], serving=serving_record(plan),
        load_problems=load_problems, versions=library_versions(),
    )
    write_json_atomically(run_dir / EVAL_JSON, report.model_dump(mode="json") | {"passed": report.passed})
    (run_dir / EVAL_MD).write_text(render_markdown(report))
    manifest.status = "validated" if report.passed else "failed_validation"
    manifest.validation = ValidationRecord(passed=report.passed, failures=report.failures,
                                           quality=quality,
                                           export_files=file_checksums(export))
    manifest.save(run_dir)
    if not report.passed:
        raise ValidationFailed("validation failed: " + "; ".join(report.failures))
    return report


def render_markdown(report: EvalReport) -> str:
    q, s = report.quality, report.sizes
    quality_rows = [
        f"Held-out text: {report.eval.source}, {q.samples} windows × {q.seq_len} tokens ({q.tokens:,} scored).", "",
        "| metric | value |", "|---|---|",
        f"| KL mean (unquantized ‖ quantized) | {q.kl_mean:.5f} |",
        f"| KL p99 | {q.kl_p99:.5f} |",
        f"| top-1 agreement | {q.top1_agreement:.4f} |",
        f"| perplexity, unquantized | {q.ppl_reference:.3f} |",
        f"| perplexity, quantized | {q.ppl_quantized:.3f} |",
        f"| perplexity ratio | {q.ppl_ratio:.4f} |",
    ] if q else [f"Quality not measured: {'; '.join(report.load_problems)}", "", "| metric | value |", "|---|---|"]
    lines = [
        f"# Validation: {report.model_id}, {report.scheme}", "",
        *quality_rows,
        f"| weights on disk | {s.export_weights_bytes / 1e6:,.1f} MB vs {s.source_weights_bytes / 1e6:,.1f} MB BF16"
        f"{'' if s.source_measured else ' (estimated)'} ({s.export_vs_source:.1%}) |",
        f"| bits per quantized parameter | {s.bits_per_quantized_param:.3f} |", "",
        "## Gates", "",
        *([f"- {g.message}" for g in report.gates] or ["- none set in the recipe"]), "",
        "## Structure", "",
        f"{report.structure.kept_identical} kept tensors bit-identical to the source, "
        f"{report.structure.quantized_stored} quantized modules stored packed.",
        *[f"- PROBLEM: {p}" for p in report.structure.problems], "",
        "## Served by vLLM", "", f"Not run: {report.serving.reason}.", "",
        "## Greedy generations", "",
    ]
    for g in report.generations:
        lines += [f"**{g.prompt}**", "", f"- unquantized: {g.reference!r}", f"- quantized: {g.quantized!r}", ""]
    return "\n".join(lines)
