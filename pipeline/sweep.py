"""Bit-width sweep: one recipe's model and algorithm under several mixed-precision policies, compared.

Each policy is the recipe with another default scheme and `overrides:` rules, built by the stages of
`quantize` (run.build_candidate: staging, manifest, export and reload checks); per policy the sweep
measures the export's size on disk, the relative weight reconstruction error ||W - Q(W)|| / ||W|| per
layer type, and KL / top-1 against the unquantized model on the recipe's held-out text (validate.py's
measurement). GGUF types join the same table and plot: one `export: gguf` build of the recipe writes a file per
type (with llama.cpp's own rounding beside any file holding our integers), each scored in llama.cpp on the same
windows.

runs/<recipe>/sweep/{sweep.md, sweep.json, sweep.png}
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from pipeline import text_only
from pipeline.recipe import Recipe, Setting, default_run_dir, load_recipe, parse_recipe, resolve_recipe_path

log = logging.getLogger(__name__)

SWEEP = "sweep"
ALL_DECODER = ".*"  # a regex rule over every decoder linear (PLE linears only when named)


@dataclass(frozen=True)
class Policy:
    name: str
    description: str
    scheme: str  # the default for modules no rule selects
    overrides: list[dict] = field(default_factory=list)


def uniform(bits: int) -> Policy:
    """Every decoder linear at `bits`: int8 per output channel, narrower widths per group."""
    if bits == 8:
        return Policy("uniform-8", "int8 per-channel everywhere", "W8A16", [])
    if bits == 4:
        return Policy("uniform-4", "int4 everywhere", "W4A16", [])
    return Policy(f"uniform-{bits}", f"int{bits} everywhere", "W4A16", [{"regex": ALL_DECODER, "bits": bits}])


INT8_CHANNEL = {"bits": 8, "group_size": None}
POLICIES: dict[str, Policy] = {p.name: p for p in [
    uniform(8), uniform(4), uniform(3), uniform(2),
    Policy("sliding3-full4", "int3 on sliding-window layers, int4 on full-attention layers", "W4A16",
           [{"layer_type": "sliding_attention", "bits": 3}]),
    Policy("sliding4-full8", "int4 on sliding-window layers, int8 on full-attention layers", "W4A16",
           [{"layer_type": "full_attention", **INT8_CHANNEL}]),
    Policy("mlp4-attn8", "int4 MLP, int8 attention projections", "W4A16", [{"submodule": "attention", **INT8_CHANNEL}]),
    Policy("mlp3-attn4", "int3 MLP, int4 attention projections", "W4A16", [{"submodule": "mlp", "bits": 3}]),
    Policy("mlp3-attn8", "int3 MLP, int8 attention projections", "W4A16",
           [{"submodule": "mlp", "bits": 3}, {"submodule": "attention", **INT8_CHANNEL}]),
    Policy("attn8-full8", "int8 attention and full-attention layers, int4 sliding-window MLP", "W4A16",
           [{"submodule": "attention", **INT8_CHANNEL}, {"layer_type": "full_attention", **INT8_CHANNEL}]),
]}
DEFAULT_POLICIES = ("uniform-8", "uniform-4", "uniform-3", "sliding3-full4", "sliding4-full8", "mlp4-attn8",
                    "mlp3-attn4")


class PolicyResult(BaseModel):
    policy: str
    description: str
    mix: dict[str, int]  # scheme label → modules
    weights_bytes: int  # the export's safetensors on disk
    source_bytes: int  # the plan's BF16 estimate of the same model
    bits_per_quantized_param: float  # weights, scales and zero points of the quantized modules, on disk (GGUF: the file per weight)
    weight_error: dict[str, float]  # layer type (and "all") → ||W - Q(W)|| / ||W|| over its decoder linears (GGUF: none)
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    ppl_ratio: float
    seconds: float


def policy_recipe(recipe: Recipe, policy: Policy, run_dir: Path) -> Recipe:
    """The recipe with the policy's default scheme and rules in place of its own."""
    data = recipe.model_dump(mode="json", exclude={"overrides", "group_size", "scheme", "gates", "output_dir"})
    group = recipe.group_size if recipe.scheme == "W4A16" else 128
    data.update(name=f"{recipe.name}-{policy.name}", scheme=policy.scheme, output_dir=str(run_dir),
                group_size=None if policy.scheme == "W8A16" else group, overrides=policy.overrides)
    return parse_recipe(data, source=f"sweep policy {policy.name}")


def resolve_policies(names: list[str] | None, bits: list[int] | None, recipe: Recipe) -> list[Policy]:
    """Named policies (`recipe`: the recipe as written, with its own rules) and uniform ones per bit width."""
    from pipeline.recipe import OVERRIDE_BITS, RecipeError

    known = {**POLICIES, "recipe": Policy("recipe", "the recipe as written", recipe.scheme,
                                          [rule.model_dump(exclude_unset=True) for rule in recipe.overrides])}
    chosen = [uniform(b) for b in bits or []]
    for name in names or ([] if bits else DEFAULT_POLICIES):
        if name not in known:
            raise RecipeError("sweep", "policies", f"unknown policy {name!r}; known: {', '.join(known)}")
        chosen.append(known[name])
    for b in bits or []:
        if b not in OVERRIDE_BITS:
            raise RecipeError("sweep", "bits", f"got {b}; allowed: {', '.join(map(str, OVERRIDE_BITS))}")
    return list({p.name: p for p in chosen}.values())


def gguf_recipe(recipe: Recipe, types: list[str], run_dir: Path) -> Recipe:
    """The recipe as a GGUF build of `types`, with llama.cpp's own rounding beside each file holding our integers."""
    data = recipe.model_dump(mode="json", exclude={"gates", "output_dir", "export", "gguf"})
    data.update(name=f"{recipe.name}-gguf", output_dir=str(run_dir), export="gguf",
                gguf={**recipe.gguf.model_dump(mode="json"), "types": types, "baselines": True})
    return parse_recipe(data, source="sweep --gguf")


def gguf_rows(recipe: Recipe, recipe_path: Path, types: list[str], reference, held_out, measuring, out_dir: Path,
              when) -> list[PolicyResult]:
    """One GGUF build of the recipe (quantize's stages), each file scored in llama.cpp against `reference`."""
    import time
    from collections import Counter

    from pipeline.gguf_export import parameters, read_gguf
    from pipeline.plan import Plan
    from pipeline.rundir import EXPORT, PLAN
    from pipeline.run import build_candidate
    from pipeline.validate import save_reference_logits, score_gguf

    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=".gguf-", dir=out_dir))
    try:
        variant = gguf_recipe(recipe, types, work)
        manifest = build_candidate(variant, recipe_path, out_dir, work, when)
        plan = Plan.load(work / PLAN)
        save_reference_logits(reference, [held_out], measuring, work)
        built = time.perf_counter() - start
        rows = []
        for entry in manifest.export.gguf:
            began = time.perf_counter()
            path = work / EXPORT / entry.name
            [quality], _, _ = score_gguf(path, plan, [held_out], measuring, work, entry.label)
            kinds = Counter(t.tensor_type.name for t in read_gguf(path).tensors if len(t.shape) > 1)
            rows.append(PolicyResult(
                policy=f"gguf {entry.label}",
                description=f"our {recipe.algorithm} integers in {entry.type}" if entry.calibrated
                else f"llama.cpp's {entry.type} with the run's importance matrix",
                mix=dict(kinds.most_common()), weights_bytes=path.stat().st_size, source_bytes=plan.bf16_bytes,
                bits_per_quantized_param=8 * path.stat().st_size / parameters(path), weight_error={},
                kl_mean=quality.kl_mean, kl_p99=quality.kl_p99, top1_agreement=quality.top1_agreement,
                ppl_ratio=quality.ppl_ratio, seconds=round(built / len(manifest.export.gguf) + time.perf_counter() - began, 1)))
            log.info("gguf %s: KL %.4f, top-1 %.3f, %.1f MB", entry.label, quality.kl_mean, quality.top1_agreement,
                     path.stat().st_size / 1e6)
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_sweep(recipe_ref: str | Path, policies: list[Policy], out_dir: Path | None = None,
              eval_samples: int | None = None, eval_seq_len: int | None = None,
              gguf_types: list[str] | None = None, settings: tuple[Setting, ...] = ()) -> list[PolicyResult]:
    """Quantize the recipe's model under each policy, measure, and write the table, JSON and plot. Each
    policy is built by quantize's own stages (run.build_candidate: plan, memory plan, load, calibration,
    pass, export with its checks, reload check, manifest) in a folder of its own, removed once measured;
    the calibration windows are built once, in `out_dir`. `gguf_types` add a row per GGUF file (gguf_rows).
    `settings`: given on the command line, applied to the recipe file's keys."""
    import time
    from datetime import datetime, timezone

    from transformers import AutoTokenizer

    from pipeline.compute import host_compute_dtype, torch_dtype
    from pipeline.formats import export_format
    from pipeline.model import load_model, model_class
    from pipeline.plan import Plan
    from pipeline.run import build_candidate, check_owned, claim_run_dir, make_plan
    from pipeline.rundir import EXPORT, PLAN
    from pipeline.validate import compare_models, held_out_set, load_export, measure_sizes

    recipe_path = resolve_recipe_path(recipe_ref)
    recipe = load_recipe(recipe_path, settings)
    out_dir = out_dir or default_run_dir(recipe, settings) / SWEEP
    check_owned(out_dir, recipe_path)
    claim_run_dir(out_dir)
    spec = recipe.eval.model_copy(update={k: v for k, v in (("samples", eval_samples), ("seq_len", eval_seq_len))
                                          if v is not None})
    source, config, _ = make_plan(recipe, recipe_path, settings)
    tokenizer = AutoTokenizer.from_pretrained(source.ref, revision=recipe.model.revision)
    held_out = held_out_set(spec, tokenizer)  # the recipe's eval set (its conversations are validation's)
    reference = (text_only.load_text_model(source, config) if text_only.wanted(recipe) else load_model(source, config)).eval()
    measuring = torch_dtype(host_compute_dtype())  # the measurements only; every policy quantizes BF16 weights
    results = []
    for policy in policies:
        start = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=f".{policy.name}-", dir=out_dir))
        try:
            variant = policy_recipe(recipe, policy, work)
            manifest = build_candidate(variant, recipe_path, out_dir, work, datetime.now(timezone.utc),
                                       reference_model=reference)
            plan, export, fmt = Plan.load(work / PLAN), work / EXPORT, export_format(variant.export)
            quality = compare_models(lambda: reference, lambda: load_export(model_class(config), export, fmt),
                                     [held_out], work, tokenizer, [], 1, (measuring,), measuring
                                     ).figures[0].quality[measuring]
            results.append(PolicyResult(
                policy=policy.name, description=policy.description,
                mix={scheme.label: len(names) for scheme, names in plan.schemes().items()},
                weights_bytes=manifest.sizes.export_weights_bytes, source_bytes=plan.bf16_bytes,
                bits_per_quantized_param=measure_sizes(export, None, plan, fmt).bits_per_quantized_param,
                weight_error=manifest.quantize_report.weight_error,
                kl_mean=quality.kl_mean, kl_p99=quality.kl_p99, top1_agreement=quality.top1_agreement,
                ppl_ratio=quality.ppl_ratio, seconds=round(time.perf_counter() - start, 1),
            ))
            log.info("policy %s: KL %.4f, top-1 %.3f, %.1f MB, %.1f s", policy.name, results[-1].kl_mean,
                     results[-1].top1_agreement, results[-1].weights_bytes / 1e6, results[-1].seconds)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if gguf_types:
        results += gguf_rows(recipe, recipe_path, gguf_types, reference, held_out, measuring, out_dir,
                             datetime.now(timezone.utc))
    write_results(out_dir, recipe, spec, results)
    return results


def layer_types(results: list[PolicyResult]) -> list[str]:
    measured = [r for r in results if r.weight_error]
    return [k for k in measured[0].weight_error if k != "all"] if measured else []


def render_table(recipe: Recipe, spec, results: list[PolicyResult]) -> str:
    types = layer_types(results)
    head = ["policy", "mix (scheme × modules)", "weights on disk", "vs BF16", "bits / quantized param",
            *[f"rel. weight error, {t}" for t in types], "KL mean", "KL p99", "top-1", "PPL ratio"]
    lines = [
        f"# Bit-width sweep: {recipe.model.id}, {recipe.algorithm}", "",
        f"Held-out text: {spec.source}, {spec.samples} windows × {spec.seq_len} tokens, against the unquantized "
        "model. Relative weight error: ||W − Q(W)|| / ||W|| over the decoder linears of each layer type "
        "(kept ones count as exact). Sizes: the exports' safetensors on disk; a `gguf` row is one GGUF file scored "
        "in llama.cpp (its mix: the file's tensor types, its bits per weight over every tensor).", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
    ]
    for r in results:
        mix = ", ".join(f"{label} × {n}" for label, n in r.mix.items())
        cells = [f"`{r.policy}`", mix, f"{r.weights_bytes / 1e6:,.1f} MB", f"{r.weights_bytes / r.source_bytes:.1%}",
                 f"{r.bits_per_quantized_param:.2f}", *[f"{r.weight_error[t]:.3f}" if t in r.weight_error else "—" for t in types],
                 f"{r.kl_mean:.4f}", f"{r.kl_p99:.3f}", f"{r.top1_agreement:.3f}", f"{r.ppl_ratio:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[PolicyResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    types = layer_types(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for r in results:
        left.scatter(r.weights_bytes / 1e6, r.kl_mean)
        left.annotate(r.policy, (r.weights_bytes / 1e6, r.kl_mean), textcoords="offset points", xytext=(4, 4),
                      fontsize=8)
    left.set(xlabel="weights on disk (MB)", ylabel="KL mean vs unquantized (nats/token)", yscale="log",
             title="size against quality")
    measured = [r for r in results if r.weight_error]  # GGUF rows: llama.cpp's rounding, no weight error of ours
    width = 0.8 / max(len(types), 1)
    for i, t in enumerate(types):
        left_edges = [j + i * width for j in range(len(measured))]
        right.bar(left_edges, [r.weight_error[t] for r in measured], width, label=t)
    right.set_xticks([j + width * (len(types) - 1) / 2 for j in range(len(measured))],
                     [r.policy for r in measured], rotation=30, ha="right", fontsize=8)
    right.set(ylabel="||W − Q(W)|| / ||W||", title="relative weight error by layer type")
    if types:
        right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out_dir: Path, recipe: Recipe, spec, results: list[PolicyResult]) -> None:
    (out_dir / "sweep.json").write_text(json.dumps({"recipe": recipe.name, "model": recipe.model.id,
                                                    "algorithm": recipe.algorithm, "eval": spec.model_dump(mode="json"),
                                                    "results": [r.model_dump() for r in results]}, indent=1) + "\n")
    (out_dir / "sweep.md").write_text(render_table(recipe, spec, results))
    plot(results, out_dir / "sweep.png", f"{recipe.model.id}: {recipe.algorithm}, {spec.samples}×{spec.seq_len} tokens")
