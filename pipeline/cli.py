"""`gemma-quant`: the pipeline's verbs, thin over pipeline.run."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from pipeline.recipe import RecipeError

console = Console(width=None if sys.stdout.isatty() else 140)


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def show_plan(plan) -> None:
    table = Table(title=f"{plan.model_id}: {plan.scheme}, group {plan.group_size or 'per-channel'}", show_lines=False)
    for col in ("component", "layer type", "module", "n", "params", "fate", "BF16", "export", "why kept"):
        table.add_column(col, justify="right" if col in ("n", "params", "BF16", "export") else "left")
    for row in plan.summary():
        table.add_row(row["component"], row["layer_type"], row["submodule"], str(row["count"]), f"{row['params']:,}",
                      row["fate"], _gb(row["bf16_bytes"]), _gb(row["export_bytes"]), row["reason"])
    console.print(table)
    from pipeline.plan import WHY_KEPT

    labels = {row["reason"].split(":")[0].split(" (")[0] for row in plan.summary() if row["reason"]}
    for label in sorted(labels & WHY_KEPT.keys()):
        console.print(f"  [dim]{label}: {WHY_KEPT[label]}[/]")
    counts = plan.counts()
    console.print(f"linear layers: {counts['linear']} ({counts['quantized']} quantized, {counts['kept']} kept); "
                  f"parameters: {plan.total_params:,}")
    console.print(f"estimated size: {_gb(plan.export_bytes)} vs {_gb(plan.bf16_bytes)} BF16 "
                  f"({plan.export_bytes / plan.bf16_bytes:.1%})")


def cmd_plan(args) -> None:
    from pipeline.run import PLAN, plan_run

    plan = plan_run(args.recipe, args.run_dir)
    show_plan(plan)
    console.print(f"plan written to {(args.run_dir or _run_dir(args.recipe)) / PLAN}")


def cmd_quantize(args) -> None:
    from pipeline.run import quantize_run

    manifest = quantize_run(args.recipe, args.run_dir, reload_check=False if args.no_reload_check else None)
    sizes, reload = manifest["sizes"], manifest["reload"]
    console.print(f"[bold green]done[/]: {args.run_dir or _run_dir(args.recipe)}/export "
                  f"({_gb(sizes['export_weights_bytes'])} weights; plan estimated {_gb(sizes['export_weights_bytes_estimate'])})")
    if reload:
        q = reload["vs_unquantized"]
        console.print(f"reload check vs unquantized: KL {q['kl_mean']:.5f}, top-1 {q['top1_agreement']:.3f}, "
                      f"max |Δlogit| {q['max_abs_diff']:.4f}")


def _run_dir(recipe_ref: str) -> Path:
    from pipeline.recipe import load_recipe

    return load_recipe(recipe_ref).run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gemma-quant", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    verbs = parser.add_subparsers(dest="verb", required=True)
    plan = verbs.add_parser("plan", help="show every layer's fate and the size estimate (config only)")
    quantize = verbs.add_parser("quantize", help="plan, quantize, export and reload-check a recipe")
    for sub in (plan, quantize):
        sub.add_argument("recipe", help="recipe name in recipes/ or a path to a YAML file")
        sub.add_argument("--run-dir", type=Path, default=None, help="default: the recipe's output_dir or runs/<name>")
    quantize.add_argument("--no-reload-check", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.verb == "quantize" else logging.WARNING,
                        format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    try:
        {"plan": cmd_plan, "quantize": cmd_quantize}[args.verb](args)
    except RecipeError as err:
        console.print(f"[bold red]recipe error[/] {err}", highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
