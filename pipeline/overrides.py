"""Per-module quantization schemes from a recipe's `overrides:` rules.

Each rule selects modules (every selection key it gives must match) and sets bits, group size,
symmetry, or skip. Rules apply in order and later rules win, field by field; modules no rule
selects keep the recipe's scheme. The checks that need the model's module tree live here:
a rule that selects nothing, a layer index the model does not have, a rule that later rules
entirely undo.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from pipeline.recipe import PLE, Override, Recipe, RecipeError

OVERRIDABLE = ("text_decoder", "ple")  # components whose Linear layers a rule can select


class WeightScheme(BaseModel):
    """How one module's weights are stored: int `bits`, one scale per `group_size` inputs (None:
    per output channel), symmetric or with zero points. Hashable: the plan groups modules by it."""

    model_config = ConfigDict(frozen=True)

    bits: int
    group_size: int | None
    symmetric: bool

    @property
    def label(self) -> str:
        return (f"int{self.bits} {'g' + str(self.group_size) if self.group_size else 'per-channel'}"
                f"{'' if self.symmetric else ' asym'}")


class Selectable(Protocol):
    name: str
    kind: str
    component: str
    layer: int | None
    layer_type: str | None
    submodule: str


@dataclass
class Resolution:
    """What the rules decided for one module: its scheme, whether a rule skips it, and which rules
    selected it (indices into `overrides:`)."""

    scheme: WeightScheme
    skipped_by: int | None = None
    rules: list[int] = field(default_factory=list)


def default_scheme(recipe: Recipe) -> WeightScheme:
    return WeightScheme(bits=recipe.bits, group_size=recipe.group_size, symmetric=recipe.symmetric)


def table_scheme(value: str) -> WeightScheme | None:
    """A recipe's `embeddings:` value (bf16, int8, int4-g<N>) as a scheme; None for bf16."""
    if value == "bf16":
        return None
    bits, _, group = value.removeprefix("int").partition("-g")
    return WeightScheme(bits=int(bits), group_size=int(group) if group else None, symmetric=True)


def selects(rule: Override, m: Selectable) -> bool:
    if m.kind != "linear" or m.component not in OVERRIDABLE:
        return False
    if m.component == "ple" and not (rule.submodule and m.submodule in PLE):
        return False  # PLE stays BF16 unless a rule names it
    return ((rule.layer_type is None or m.layer_type in rule.layer_type)
            and (rule.submodule is None or m.submodule in rule.submodule)
            and (rule.layers is None or m.layer in rule.layers)
            and (rule.regex is None or re.fullmatch(rule.regex, m.name) is not None))


def resolve(recipe: Recipe, modules: list[Selectable], num_layers: int,
            source: str | Path = "<recipe>") -> dict[str, Resolution]:
    """Each overridable module's resolution (modules no rule selects get the default scheme)."""
    default = default_scheme(recipe)
    result = {m.name: Resolution(default) for m in modules if m.kind == "linear" and m.component in OVERRIDABLE}
    # Which rule decided each (module, field) last: a rule that decides nothing in the end is an error.
    decided: dict[tuple[str, str], int] = {}
    selected_by_rule: list[list[str]] = []
    for i, rule in enumerate(recipe.overrides):
        _check_layers(rule, i, num_layers, recipe, source)
        selected = [m.name for m in modules if selects(rule, m)]
        if not selected:
            raise RecipeError(source, f"overrides.{i}", f"selects no module of {recipe.model.id} "
                              f"({describe(rule)}); {_hint(rule, modules)}")
        selected_by_rule.append(selected)
        for name in selected:
            res = result[name]
            res.rules.append(i)
            if rule.skip:
                res.skipped_by = i
            else:
                res.skipped_by = None  # a later rule that sets a scheme quantizes the module again
                res.scheme = res.scheme.model_copy(update={k: getattr(rule, k) for k in rule.sets})
            decided.update({(name, key): i for key in rule.sets})
    for i, (rule, selected) in enumerate(zip(recipe.overrides, selected_by_rule)):
        if not any(decided[(name, key)] == i for name in selected for key in rule.sets):
            later = sorted({decided[(name, key)] for name in selected for key in rule.sets})
            raise RecipeError(source, f"overrides.{i}", f"has no effect: every module it selects ({describe(rule)}) "
                              f"gets its {', '.join(sorted(rule.sets))} from later rules "
                              f"({', '.join(f'overrides.{j}' for j in later)}); remove it or narrow those rules")
    return result


def describe(rule: Override) -> str:
    parts = [f"{key} {_short(getattr(rule, key))}" for key in Override.SELECTORS if getattr(rule, key) is not None]
    return ", ".join(parts)


def _short(value) -> str:
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return _ranges(value)
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _ranges(indices: list[int]) -> str:
    spans, start = [], None
    ordered = sorted(set(indices))
    for a, b in zip(ordered, ordered[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            spans.append(f"{start}-{a}" if a != start else str(a))
            start = None
    return ",".join(spans)


def _check_layers(rule: Override, index: int, num_layers: int, recipe: Recipe, source) -> None:
    missing = [i for i in rule.layers or [] if i >= num_layers]
    if missing:
        raise RecipeError(source, f"overrides.{index}.layers", f"{recipe.model.id} has {num_layers} decoder layers "
                          f"(0-{num_layers - 1}); no layer {_ranges(missing)}")


def _hint(rule: Override, modules: list[Selectable]) -> str:
    """What the model does have, for the keys the rule gives."""
    linears = [m for m in modules if m.kind == "linear" and m.component in OVERRIDABLE]
    hints = []
    if rule.layer_type is not None:
        hints.append(f"layer types here: {', '.join(sorted({m.layer_type for m in linears if m.layer_type}))}")
    if rule.submodule is not None:
        hints.append(f"sub-modules here: {', '.join(sorted({m.submodule for m in linears}))}")
        full = {m.layer for m in linears if m.layer_type == "full_attention"}
        if "v_proj" in rule.submodule and full and not any(m.layer in full and m.submodule == "v_proj" for m in linears):
            hints.append("full_attention layers here have no v_proj: with attention_k_eq_v, V reuses K's projection "
                         "(select k_proj)")
    if rule.regex is not None:
        hints.append(f"the regex must match a whole name, e.g. {linears[0].name if linears else '-'}")
    return "; ".join(hints) or "no module matches all its selection keys together"
