"""`gemma-quant`: the pipeline's verbs, thin over pipeline.run.

Every verb that takes a recipe (validate, serve-check, card and publish: for its run) also takes settings after
it, applied to the recipe file's keys before it is validated: `--model ./my-e2b-finetune` (shorthand for
model.id=...) and KEY=VALUE with a dotted key and a YAML value, e.g.
`gemma-quant quantize e2b-w4a16 --model ./my-e2b-finetune group_size=64 calibration.samples=256`.
They are recorded in the manifest and the card, and name the default run directory
(runs/e2b-w4a16--my-e2b-finetune--group_size-64--calibration.samples-256; hub.*, memory.*, description and name
settings do not), which later verbs given the same recipe and settings find.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from pipeline.recipe import RecipeError, Setting
from pipeline.runlock import RunDirBusy

console = Console(width=None if sys.stdout.isatty() else 140)


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def show_plan(plan) -> None:
    table = Table(title=f"{plan.model_id}: {plan.scheme}, group {plan.group_size or 'per-channel'}", show_lines=False)
    for col in ("component", "layer type", "module", "n", "params", "fate", "BF16", "export", "why kept"):
        table.add_column(col, justify="right" if col in ("n", "params", "BF16", "export") else "left")
    for row in plan.summary():
        fate = row["scheme"] if plan.mixed and row["scheme"] else row["fate"]
        table.add_row(row["component"], row["layer_type"], row["submodule"], str(row["count"]), f"{row['params']:,}",
                      fate, _gb(row["bf16_bytes"]), _gb(row["export_bytes"]), row["reason"])
    console.print(table)
    for kept in sorted({row["kept_because"] for row in plan.summary() if row["kept_because"]}):
        if kept.why:
            console.print(f"  [dim]{kept}: {kept.why}[/]")
    counts = plan.counts()
    console.print(f"linear layers: {counts['linear']} ({counts['quantized']} quantized, {counts['kept']} kept); "
                  f"parameters: {plan.total_params:,}")
    if plan.mixed:
        by_name = {m.name: m for m in plan.modules}
        for scheme, names in plan.schemes().items():
            console.print(f"  {scheme.label}: {len(names)} modules, "
                          f"{_gb(sum(by_name[n].export_bytes for n in names))}")
        for note in plan.serving_notes():
            console.print(f"  [yellow]serving: {note}[/]")
    console.print(f"estimated size: {_gb(plan.export_bytes)} vs {_gb(plan.bf16_bytes)} BF16 "
                  f"({plan.export_bytes / plan.bf16_bytes:.1%})")


def cmd_plan(args) -> None:
    from pipeline.run import plan_run
    from pipeline.rundir import PLAN

    settings = _settings(args)
    plan = plan_run(args.recipe, args.run_dir, settings)
    show_plan(plan)
    console.print(f"plan written to {(args.run_dir or _run_dir(args.recipe, settings)) / PLAN}", markup=False)
    show_memory_plan(args.recipe, plan, _memory_flags(args), settings)


def show_memory_plan(recipe_ref: str, plan, overrides, settings: tuple[Setting, ...] = ()) -> None:
    """How `quantize` would hold the model within the budget (raises MemoryBudgetError if it cannot)."""
    from pipeline.memory import plan_memory, resolve_budget
    from pipeline.model import load_config, resolve
    from pipeline.recipe import load_recipe, resolve_recipe_path

    recipe = load_recipe(recipe_ref, settings)
    text = load_config(resolve(recipe.model)).get_text_config()
    memory = plan_memory(plan, recipe, text, *resolve_budget(recipe.memory, overrides), resolve_recipe_path(recipe_ref))
    console.print(memory.table())


def cmd_quantize(args) -> int:
    from pipeline.run import quantize_run
    from pipeline.rundir import REJECTED
    from pipeline.validate import ValidationFailed

    settings = _settings(args)
    run_dir = args.run_dir or _run_dir(args.recipe, settings)
    try:
        manifest = quantize_run(args.recipe, args.run_dir, reload_check=False if args.no_reload_check else None,
                                validate=not args.no_validate, card=not args.no_card, memory=_memory_flags(args),
                                serve=not args.no_serve, settings=settings)
    except ValidationFailed as err:
        show_eval(run_dir / REJECTED)
        previous = "the previous export is left in place" if (run_dir / "export").is_dir() else "no export is in place"
        console.print(f"[bold red]{escape(str(err))}[/]\nthis run's export, card and eval are kept in "
                      f"{escape(str(run_dir / REJECTED))}; {previous}", highlight=False)
        return 1
    sizes = manifest.sizes
    if not args.no_validate:
        show_eval(run_dir)
    estimate = "" if manifest.export.gguf else f"; plan estimated {_gb(sizes.export_weights_bytes_estimate)}"
    console.print(f"[bold green]done[/]: {run_dir}/export ({_gb(sizes.export_weights_bytes)} weights{estimate})")
    return 0


def _memory_flags(args):
    """--max-cpu-memory / --max-gpu-memory, validated like the recipe's memory: block."""
    from pipeline.recipe import MemorySpec

    try:
        return MemorySpec(max_cpu_memory=args.max_cpu_memory, max_gpu_memory=args.max_gpu_memory)
    except ValueError as err:
        problem = err.errors()[0]
        raise RecipeError(f"--{problem['loc'][0].replace('_', '-')}", f"memory.{problem['loc'][0]}",
                          problem["msg"].removeprefix("Value error, ")) from None


def cmd_validate(args) -> int:
    from pipeline.validate import ValidationFailed, serve_check_run, validate_run

    run_dir = _run_dir_arg(args.run, _settings(args))
    if not _holds_a_run(run_dir):
        return 1
    try:
        if args.verb == "serve-check":
            serve_check_run(run_dir)
        else:
            validate_run(run_dir, serve=not args.no_serve)
    except ValidationFailed as err:
        _refresh_card(run_dir, after_failure=True)
        show_eval(run_dir)
        console.print(f"[bold red]{err}[/]")
        return 1
    _refresh_card(run_dir)
    show_eval(run_dir)
    return 0


def _refresh_card(run_dir: Path, after_failure: bool = False) -> None:
    """A card that quotes the previous validation would no longer tell the truth: it is rewritten, or,
    after a failed validation of an export that cannot even describe itself (config.json unreadable), removed."""
    from pipeline.card import CARD, write_card

    card = run_dir / "export" / CARD
    if not card.is_file():
        return
    try:
        write_card(run_dir)
    except (OSError, ValueError) as err:
        if not after_failure:
            raise
        card.unlink()
        console.print(f"{card} removed: the card cannot be rewritten from this export "
                      f"({type(err).__name__}: {str(err)[:200]})", markup=False)


def _holds_a_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds a gemma-quant run (its manifest); if not, said, and nothing is written there
    (not even the run lock)."""
    from pipeline.run import our_manifest

    if our_manifest(run_dir) is None:
        console.print(f"[bold red]no run in {escape(str(run_dir))}[/] (no manifest.json of a gemma-quant run): "
                      "quantize the recipe first", highlight=False)
        return False
    return True


def _run_dir_arg(ref: str, settings: tuple[Setting, ...] = ()) -> Path:
    """RUN is a run directory, or a recipe whose run directory is meant (as `make` passes it), with the
    settings it was quantized with."""
    path = Path(ref)
    if path.is_dir():
        if settings:
            raise RecipeError(ref, "run", f"is a run directory; settings ({', '.join(s.text for s in settings)}) "
                              "apply to a recipe: give the recipe and its settings, or the run directory alone")
        return path
    try:
        from pipeline.recipe import resolve_recipe_path

        resolve_recipe_path(ref)
    except RecipeError:
        raise RecipeError(ref, "run", "neither a run directory nor a recipe name or file") from None
    return _run_dir(ref, settings)


def _repo_id(args, settings: tuple[Setting, ...]) -> str | None:
    """--repo-id, else a hub.repo_id given on the command line (else None: the run's recipe says)."""
    from pipeline.recipe import load_recipe

    if args.repo_id or not any(setting.concerns("hub.repo_id") for setting in settings):
        return args.repo_id
    return load_recipe(args.run, settings).hub.repo_id


def cmd_card(args) -> int:
    from huggingface_hub import ModelCard

    from pipeline.card import write_card

    settings = _settings(args)
    run_dir = _run_dir_arg(args.run, settings)
    if not _holds_a_run(run_dir):
        return 1
    path = write_card(run_dir, _repo_id(args, settings))
    console.print(f"{path} front matter:\n{ModelCard.load(path).data.to_yaml()}", markup=False, highlight=False)
    return 0


def cmd_publish(args) -> int:
    from pipeline.publish import PublishError, describe, prepare, publish

    try:
        settings = _settings(args)
        plan = prepare(_run_dir_arg(args.run, settings), _repo_id(args, settings), args.private, args.revision)
        if args.dry_run:
            console.print(describe(plan, args.force), markup=False, highlight=False)
            return 0 if args.force or not plan.problems else 1
        publish(plan, force=args.force, echo=lambda line: console.print(line, markup=False, highlight=False))
    except PublishError as err:
        console.print(f"[bold red]publish failed[/]: {escape(str(err))}", highlight=False)
        return 1
    return 0


def cmd_sweep(args) -> int:
    from pipeline.recipe import load_recipe
    from pipeline.sweep import resolve_policies, run_sweep

    settings = _settings(args)
    recipe = load_recipe(args.recipe, settings)
    # --gguf alone compares GGUF types only; with --policies or --bits, both
    policies = resolve_policies(args.policies, args.bits, recipe) if args.policies or args.bits or not args.gguf else []
    out_dir = (args.run_dir or _run_dir(args.recipe, settings)) / "sweep"
    results = run_sweep(args.recipe, policies, out_dir, args.eval_samples, args.eval_seq_len, args.gguf, settings)
    table = Table(title=f"sweep: {recipe.model.id}, {recipe.algorithm}")
    for col in ("policy", "weights", "bits/param", "weight error (all)", "KL mean", "top-1"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in results:
        table.add_row(r.policy, _gb(r.weights_bytes), f"{r.bits_per_quantized_param:.2f}",
                      f"{r.weight_error['all']:.3f}" if r.weight_error else "—", f"{r.kl_mean:.4f}",
                      f"{r.top1_agreement:.3f}")
    console.print(table)
    console.print(f"table: {out_dir / 'sweep.md'}, plot: {out_dir / 'sweep.png'}")
    return 0


def _csv(kind):
    return lambda text: [kind(part) for part in text.split(",") if part.strip()]


def _gguf_types(text: str) -> list[str]:
    from typing import get_args

    from pipeline.recipe import GGUFType

    types = _csv(str)(text)
    if unknown := [t for t in types if t not in get_args(GGUFType)]:
        raise argparse.ArgumentTypeError(f"unknown GGUF type {unknown[0]!r}; known: {', '.join(get_args(GGUFType))}")
    return types


def show_eval(run_dir: Path) -> None:
    from pipeline.rundir import EVAL_JSON

    report = json.loads((run_dir / EVAL_JSON).read_text())
    if report.get("gguf"):
        return show_gguf_eval(run_dir, report)
    q, s = report["quality"], report["sizes"]
    c = (report.get("conversations") or {}).get("quality")  # eval.conversations, scored on the assistant turns
    title = f"validation: {report['model_id']}, {report['scheme']}"
    table = Table(title=f"{title} ({q['samples']}×{q['seq_len']} held-out tokens)" if q else title)
    table.add_column("metric")
    table.add_column("held-out text" if c else "value", justify="right")
    if c:
        table.add_column(f"conversations ({c['tokens']:,} assistant tokens)", justify="right")

    def figures(q: dict) -> list[str]:
        return [f"{q['kl_mean']:.5f}", f"{q['kl_p99']:.5f}", f"{q['top1_agreement']:.4f}",
                f"{q['ppl_reference']:.3f} → {q['ppl_quantized']:.3f}", f"{q['ppl_ratio']:.4f}"]

    names = ["KL mean", "KL p99", "top-1 agreement", "perplexity unquantized → quantized", "perplexity ratio"]
    quality_rows = list(zip(names, figures(q), *([figures(c)] if c else []))) if q else [("quality", "not measured")]
    for name, *values in [*quality_rows,
                          ("weights on disk", f"{_gb(s['export_weights_bytes'])} ({s['export_vs_source']:.1%} of BF16)"),
                          ("bits per quantized parameter", f"{s['bits_per_quantized_param']:.3f}"),
                          ("structure", "ok" if not report["structure"]["problems"] else
                           f"{len(report['structure']['problems'])} problems"),
                          ("loads cleanly", "no" if report["load_problems"] else "yes")]:
        table.add_row(name, *values)
    console.print(table)
    for gate in report["gates"] + report["serving"]["gates"]:
        console.print(("[green]" if gate["passed"] else "[red]") + escape(gate["message"]) + "[/]")
    from pipeline.records import Serving

    serving = Serving.model_validate(report["serving"])
    console.print(f"served by {serving.engine}: {escape(serving.summary)}", highlight=False)
    console.print(f"report: {run_dir / 'eval.md'}")


def show_gguf_eval(run_dir: Path, report: dict) -> None:
    """An `export: gguf` run: each file as llama.cpp scored it."""
    table = Table(title=f"validation: {report['model_id']}, GGUF files in llama.cpp")
    for col in ("file", "type", "size", "bits/weight", "KL mean", "top-1", "PPL ratio"):
        table.add_column(col, justify="left" if col in ("file", "type") else "right")
    for g in report["gguf"]:
        q = g["quality"]
        table.add_row(g["file"], g["label"], _gb(g["bytes"]), f"{g['bits_per_weight']:.2f}",
                      *((f"{q['kl_mean']:.5f}", f"{q['top1_agreement']:.4f}", f"{q['ppl_ratio']:.4f}") if q
                        else (escape(g["problem"] or ""), "", "")))
    console.print(table)
    if projector := report.get("projector"):
        console.print(f"projector: {projector['file']} " + (
            f"[red]{escape(projector['problem'])}[/]" if projector["problem"] else
            f"loaded by llama.cpp's mtmd (image {projector['vision']}, audio {projector['audio']})")
            if projector["file"] else f"projector: not written ({escape(projector['why_not'])})")
    for gate in report["gates"]:
        console.print(("[green]" if gate["passed"] else "[red]") + escape(gate["message"]) + "[/]")
    for problem in report["structure"]["problems"]:
        console.print(f"[red]{escape(problem)}[/]")
    console.print(f"report: {run_dir / 'eval.md'}")


def _run_dir(recipe_ref: str, settings: tuple[Setting, ...] = ()) -> Path:
    from pipeline.recipe import default_run_dir, load_recipe

    return default_run_dir(load_recipe(recipe_ref, settings), settings)


def _settings(args) -> tuple[Setting, ...]:
    """--model, then the KEY=VALUE settings given after the recipe, in their order."""
    return (*((Setting.model(args.model),) if args.model else ()), *(Setting.parse(text) for text in args.settings))


def _add_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                        help="recipe keys to change, e.g. group_size=64 calibration.samples=256 hub.repo_id=me/x "
                             "(dotted keys, YAML values), applied to the recipe file before it is validated")
    parser.add_argument("--model", default=None, metavar="ID_OR_FOLDER",
                        help="the checkpoint to quantize instead of the recipe's: a Hub id or a local folder "
                             "(shorthand for model.id=...); names the run directory runs/<recipe>--<its last part>")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gemma-quant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    verbs = parser.add_subparsers(dest="verb", required=True)
    plan = verbs.add_parser("plan", help="show every layer's fate and the size estimate (config only)")
    quantize = verbs.add_parser("quantize", help="plan, quantize, export and reload-check a recipe")
    for sub in (plan, quantize):
        sub.add_argument("recipe", help="recipe name in recipes/ or a path to a YAML file")
        _add_settings(sub)
        sub.add_argument("--run-dir", type=Path, default=None,
                         help="default: the recipe's output_dir or runs/<name>, named after the settings given")
    quantize.add_argument("--no-reload-check", action="store_true")
    quantize.add_argument("--no-validate", action="store_true", help="skip the validation stage")
    quantize.add_argument("--no-card", action="store_true", help="do not write the model card (export/README.md)")
    sweep = verbs.add_parser("sweep", help="compare mixed-precision policies on the recipe's model: size, "
                                           "weight error per layer type, KL and top-1 (table and plot)")
    sweep.add_argument("recipe", help="recipe name in recipes/ or a path to a YAML file")
    _add_settings(sweep)
    sweep.add_argument("--policies", type=_csv(str), default=None,
                       help="comma-separated policy names (default: a standard set; `recipe`: the recipe as written)")
    sweep.add_argument("--bits", type=_csv(int), default=None, help="uniform policies at these widths, e.g. 8,4,3")
    sweep.add_argument("--gguf", type=_gguf_types, default=None, metavar="TYPES",
                       help="GGUF types to add, e.g. Q8_0,Q4_0,Q4_K_M: one GGUF build, each file scored in llama.cpp "
                            "(needs `make llama-setup`)")
    sweep.add_argument("--run-dir", type=Path, default=None, help="default: the recipe's run directory (+ /sweep)")
    sweep.add_argument("--eval-samples", type=int, default=None, help="held-out windows (default: the recipe's eval)")
    sweep.add_argument("--eval-seq-len", type=int, default=None, help="tokens per window (default: the recipe's eval)")
    for sub in (plan, quantize):
        sub.add_argument("--max-cpu-memory", default=None, metavar="SIZE",
                         help="host RAM budget, e.g. 20GiB (overrides the recipe's memory.max_cpu_memory)")
        sub.add_argument("--max-gpu-memory", default=None, metavar="SIZE",
                         help="per-GPU memory budget, e.g. 70GiB (overrides the recipe's memory.max_gpu_memory)")
    validate = verbs.add_parser("validate", help="measure an exported run against the unquantized model")
    validate.add_argument("run", help="run directory, or a recipe (its run directory is used)")
    _add_settings(validate)
    for sub in (quantize, validate):
        sub.add_argument("--no-serve", action="store_true",
                         help="skip validation's serve check (the export served by vLLM, where it can run here)")
    serve_check = verbs.add_parser("serve-check", help="serve a validated run's export with vLLM and compare its "
                                                       "log-probs with transformers' from validation")
    serve_check.add_argument("run", help="run directory, or a recipe (its run directory is used)")
    _add_settings(serve_check)
    card = verbs.add_parser("card", help="write the model card, export/README.md, from the run's measurements")
    publish = verbs.add_parser("publish", help="push a validated export to the Hugging Face Hub in one commit")
    for sub in (card, publish):
        sub.add_argument("run", help="run directory, or a recipe (its run directory is used)")
        _add_settings(sub)
        sub.add_argument("--repo-id", default=None, help="OWNER/NAME; default: the recipe's hub.repo_id")
    publish.add_argument("--private", action="store_true", default=None,
                         help="create the repo private (default: the recipe's hub.private)")
    publish.add_argument("--revision", default=None, help="branch to commit to, created if missing (default: main)")
    publish.add_argument("--force", action="store_true",
                         help="publish even if the run failed or skipped validation, is incomplete, or changed since")
    publish.add_argument("--dry-run", action="store_true", help="show what would be pushed; touch no network")
    # KEY=VALUE settings may come after options too (`quantize e2b-w4a16 --model ./x group_size=64`),
    # where argparse leaves them over.
    args, extra = parser.parse_known_args(argv)
    if unknown := [text for text in extra if text.startswith("-") or "settings" not in args]:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.settings = [*args.settings, *extra]
    logging.basicConfig(level=logging.INFO if args.verbose or args.verb != "plan" else logging.WARNING,
                        format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    try:
        return {"plan": cmd_plan, "quantize": cmd_quantize, "validate": cmd_validate, "serve-check": cmd_validate,
                "card": cmd_card,
                "publish": cmd_publish, "sweep": cmd_sweep}[args.verb](args) or 0
    except RecipeError as err:
        console.print(f"[bold red]recipe error[/] {escape(str(err))}", highlight=False)
        return 2
    except RunDirBusy as err:
        console.print(f"[bold red]run directory busy[/] {escape(str(err))}", highlight=False)
        return 1
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]; the previous export, card and manifest are left as they were",
                      highlight=False)
        return 130
    except _manifest_error() as err:  # evaluated only when an error gets here
        console.print(f"[bold red]run directory error[/] {escape(str(err))}", highlight=False)
        return 1


def _manifest_error() -> type[Exception]:
    """Imported on the error path only: pipeline.rundir loads torch (through the stages' records), which
    `gemma-quant --help` and a recipe error need not wait for."""
    from pipeline.rundir import ManifestError

    return ManifestError


if __name__ == "__main__":
    sys.exit(main())
