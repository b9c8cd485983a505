"""The plan: every weight of the model, its component, and its fate under the recipe.

Built from the config alone (a meta-device model: module names and shapes, no storage). The
same plan drives the quantize step: the quantizer's target and ignore lists come from it,
never from a second hand-written list.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from enum import StrEnum
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, model_validator

from pipeline.names import first_match, matches
from pipeline.overrides import Resolution, WeightScheme, default_scheme, resolve, table_scheme
from pipeline.recipe import VLLM_BITS, Recipe, RecipeError, TableScheme, shown

Component = Literal["text_decoder", "vision", "audio", "projector", "ple", "lm_head", "embedding",
                    "moe_router", "moe_experts", "drafter", "other"]

class Kept(StrEnum):
    """Why a module stays in BF16: the short label tables and cards group by."""

    VISION = "vision tower"
    AUDIO = "audio tower"
    PROJECTOR = "multimodal projector"
    PLE = "Per-Layer-Embedding"
    LM_HEAD = "lm_head"
    EMBEDDING = "embedding table"
    ROUTER = "MoE router"
    EXPERTS = "fused MoE experts"
    DRAFTER = "drafter's joins to its target"
    OTHER = "norms and scalars"
    SHAPE = "shape"
    RECIPE = "recipe"

    @property
    def why(self) -> str:
        return WHY_KEPT[self]


# Why each component stays in BF16 unless the recipe's overrides say otherwise.
COMPONENT_KEPT: dict[str, Kept] = {
    "vision": Kept.VISION, "audio": Kept.AUDIO, "projector": Kept.PROJECTOR, "ple": Kept.PLE,
    "lm_head": Kept.LM_HEAD, "embedding": Kept.EMBEDDING, "moe_router": Kept.ROUTER,
    "moe_experts": Kept.EXPERTS, "drafter": Kept.DRAFTER, "other": Kept.OTHER,
}
WHY_KEPT: dict[Kept, str] = {
    Kept.VISION: "small and quality-sensitive; vLLM serves it unquantized",
    Kept.AUDIO: "small and quality-sensitive; vLLM serves it unquantized",
    Kept.PROJECTOR: "maps image and audio features (tower outputs, or the 12B's raw patches) into the text embedding space",
    Kept.PLE: "the PLE path sits beside the decoder's linears, not in them",
    Kept.LM_HEAD: "tied to embed_tokens; every generated token reads it",
    Kept.EMBEDDING: "not a Linear layer",
    Kept.ROUTER: "routing decisions are precision-sensitive",
    Kept.EXPERTS: "kept unless the recipe sets `quantize_experts: true` (auto-round or GPTQ exports)",
    Kept.DRAFTER: ("pre_projection and post_projection map the target's hidden states in and out; centroids pick "
                   "the vocabulary slice the head scores (vLLM builds it as a plain Linear, never quantized)"),
    Kept.OTHER: "",
    Kept.SHAPE: "the scheme cannot take this input width (group size or 32-bit packing)",
    Kept.RECIPE: "listed under skip: in the recipe",
}

_COMPONENT_RULES: list[tuple[str, str]] = [
    (r"(^|\.)vision_tower\.", "vision"),
    (r"(^|\.)audio_tower\.", "audio"),
    (r"(^|\.)(embed_vision|embed_audio|vision_embedder|multi_modal_projector)\.", "projector"),  # vision_embedder: the 12B on disk
    (r"(^|\.)(per_layer_model_projection|per_layer_input_gate|per_layer_projection|embed_tokens_per_layer)\b", "ple"),
    (r"^lm_head$", "lm_head"),
    (r"(^|\.)embed_tokens$", "embedding"),
    (r"\.router(\.|$)", "moe_router"),
    (r"\.experts$", "moe_experts"),
    (r"^(pre_projection|post_projection|masked_embedding\.centroids)$", "drafter"),  # gemma4_assistant
    (r"(^|\.)layers\.\d+\.(self_attn|mlp)\.", "text_decoder"),
]
# The token tables a recipe's `embeddings:` block stores (pipeline/tables.py), by its keys.
TABLES = {"per_layer": "embed_tokens_per_layer", "tokens": "embed_tokens", "lm_head": "lm_head"}
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:language_model\.|model\.)layers\.(\d+)\.")


class ModuleFate(BaseModel):
    name: str
    component: Component
    kind: Literal["linear", "embedding", "experts"]
    shape: list[int]
    params: int
    layer: int | None = None
    layer_type: str | None = None
    submodule: str
    quantize: bool
    kept_because: Kept | None = None  # None for quantized modules
    reason: str = ""  # the label and its detail, as the plan table shows it
    tied_to: str | None = None  # shares its weight with another module (stored once)
    bf16_bytes: int
    export_bytes: int
    # How a quantized module is stored (the recipe's scheme unless an `overrides:` rule changed it);
    # None for modules kept in BF16.
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None

    @property
    def scheme(self) -> WeightScheme | None:
        return WeightScheme(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric) \
            if self.quantize else None

    @property
    def table(self) -> str | None:
        """The `embeddings:` key of a token table (per_layer, tokens, lm_head); None for other modules."""
        return table_key(self.name)


class Plan(BaseModel):
    model_id: str
    scheme: str
    bits: int
    group_size: int | None
    symmetric: bool
    modules: list[ModuleFate]
    other_params: int

    @model_validator(mode="after")
    def _per_module_schemes(self) -> Plan:
        """Plans written before per-module schemes existed: every quantized module has the plan's."""
        for m in self.modules:
            if m.quantize and m.bits is None:
                m.bits, m.group_size, m.symmetric = self.bits, self.group_size, self.symmetric
        return self

    @property
    def quantized(self) -> list[ModuleFate]:
        """What the quantize pass quantizes: every quantized module but the token tables."""
        return [m for m in self.modules if m.quantize and m.table is None]

    @property
    def tables(self) -> list[ModuleFate]:
        """The quantized token tables, which the export step quantizes (pipeline/tables.py)."""
        return [m for m in self.modules if m.quantize and m.table is not None]

    @property
    def head(self) -> ModuleFate | None:
        return next((m for m in self.modules if m.table == "lm_head"), None)

    @property
    def untied(self) -> bool:
        """The source ties lm_head to embed_tokens and the export stores them apart (one is quantized)."""
        return unties_head(self.modules) and self.head is not None and bool(self.head.tied_to)

    @property
    def default_scheme(self) -> WeightScheme:
        return WeightScheme(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    def schemes(self) -> dict[WeightScheme, list[str]]:
        """Quantized module names by scheme, the most common scheme first: the export's config groups."""
        groups: dict[WeightScheme, list[str]] = defaultdict(list)
        for m in self.quantized:
            groups[m.scheme].append(m.name)
        return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0].bits, kv[0].group_size or 0)))

    @property
    def mixed(self) -> bool:
        """Some quantized module is stored otherwise than the recipe's scheme."""
        return any(scheme != self.default_scheme for scheme in self.schemes())

    def serving_notes(self) -> list[str]:
        """What vLLM cannot serve in this mix: bit widths without a Marlin kernel (a fused projection split
        across schemes is refused at planning: _split_fused_projections)."""
        notes = []
        odd = sorted({s.bits for s in self.schemes()} - set(VLLM_BITS))
        if odd:
            notes.append(f"int{'/int'.join(map(str, odd))} weights: vLLM's kernels serve int4 and int8 only; "
                         "transformers loads this checkpoint")
        return notes

    @property
    def ignore(self) -> list[str]:
        """What the quantizer must skip and the export's `quantization_config.ignore`: every Linear
        left unquantized and every fused expert block kept BF16. Fused experts are named twice:
        as the module transformers loads (`...experts`) and as the per-expert linears that
        llmcompressor and vLLM address (`...experts.<i>.<gate|up|down>_proj`). The second is a pattern
        on the name from `layers.` on: vLLM renames its modules (`model.language_model.` to `model.` or
        `language_model.model.`) and maps exact ignore entries but not patterns, so a pattern that spelt out
        the prefix would never match and vLLM would read the BF16 experts as quantized
        (docs/runtime-findings.md)."""
        names = []
        # vLLM builds a drafter as `gemma4_mtp` with its modules under `draft_model.` (`lm_head` aside) and matches
        # exact entries against those names: a pattern from the name's end matches in both
        drafter = any(m.component == "drafter" for m in self.modules)
        for m in self.modules:
            if m.quantize or m.kind == "embedding":
                continue
            names.append(m.name)
            if drafter:
                names.append(f"re:^(.*\\.)?{re.escape(m.name.removeprefix('model.'))}$")
            if m.kind == "experts":
                layer = re.escape(m.name[m.name.index("layers."):])
                names.append(f"re:^(.*\\.)?{layer}\\.\\d+\\.(gate|up|down)_proj$")
        return names

    @property
    def pass_ignore(self) -> list[str]:
        """What the quantize pass skips: the export's ignore list and the quantized head, which the
        export step quantizes with the other tables."""
        return self.ignore + [m.name for m in self.tables if m.kind == "linear"]

    @property
    def bf16_bytes(self) -> int:
        return sum(m.bf16_bytes for m in self.modules) + 2 * self.other_params

    @property
    def export_bytes(self) -> int:
        return sum(m.export_bytes for m in self.modules) + 2 * self.other_params

    def layer_bytes(self, export: bool = False) -> dict[int, int]:
        """BF16 (or export) bytes of each decoder layer's modules, by layer index (norms and scalars,
        counted in `other_params`, are not in any layer)."""
        totals: dict[int, int] = defaultdict(int)
        for m in self.modules:
            if m.layer is not None:
                totals[m.layer] += m.export_bytes if export else m.bf16_bytes
        return dict(sorted(totals.items()))

    @property
    def total_params(self) -> int:
        return sum(m.params for m in self.modules if not m.tied_to) + self.other_params

    def summary(self) -> list[dict]:
        """Rows grouped by component, layer type and submodule, with counts and sizes."""
        rows: dict[tuple, dict] = defaultdict(lambda: {"count": 0, "params": 0, "bf16_bytes": 0, "export_bytes": 0})
        for m in self.modules:
            decoder = m.component == "text_decoder"
            fate = m.scheme.label if m.quantize else "keep"
            key = (m.component, (m.layer_type or "-") if decoder else "-", m.submodule if decoder else "*", fate, m.reason,
                   m.kept_because)
            row = rows[key]
            row["count"] += 1
            row["params"] += 0 if m.tied_to else m.params
            row["bf16_bytes"] += m.bf16_bytes
            row["export_bytes"] += m.export_bytes
        return [
            {"component": c, "layer_type": t, "submodule": s, "fate": "keep" if f == "keep" else "quantize",
             "scheme": "" if f == "keep" else f, "reason": r, "kept_because": k, **v}
            for (c, t, s, f, r, k), v in sorted(rows.items(), key=lambda kv: (kv[0][0] != "text_decoder", kv[0][:5]))
        ]

    def counts(self) -> dict[str, int]:
        linears = [m for m in self.modules if m.kind == "linear"]
        quantized = sum(m.quantize for m in linears)
        return {"linear": len(linears), "quantized": quantized, "kept": len(linears) - quantized}

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")  # replaced in one rename: never a half-written plan
        tmp.write_text(self.model_dump_json(indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.model_validate_json(Path(path).read_text())


def table_key(name: str) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    return next((key for key, table in TABLES.items() if leaf == table), None)


def component_of(name: str) -> str:
    for pattern, component in _COMPONENT_RULES:
        if re.search(pattern, name):
            return component
    return "other"


def quantized_bytes(out_features: int, in_features: int, bits: int, group_size: int | None, symmetric: bool,
                    layout: str = "compressed-tensors") -> int:
    """Bytes of one Linear as stored. compressed-tensors' pack-quantized: int32-packed weights, BF16
    scales per group (or per channel), packed zero points when asymmetric, the shape. GPTQ layout
    (`gptq`, `auto-round`): int32 qweight and qzeros (always stored), FP16 scales, `g_idx` for gptq."""
    groups = in_features // group_size if group_size else 1
    packed = out_features * math.ceil(in_features * bits / 32) * 4
    if layout != "compressed-tensors":
        qzeros = groups * math.ceil(out_features * bits / 32) * 4
        return packed + qzeros + groups * out_features * 2 + (4 * in_features if layout == "gptq" else 0)
    scales = out_features * groups * 2
    zero_points = 0 if symmetric else math.ceil(out_features * bits / 32) * groups * 4
    return packed + scales + zero_points + 2 * 8


def _check_skip(recipe: Recipe, fates: list[ModuleFate], source: str | Path) -> None:
    """Every `skip:` entry names at least one Linear layer of this model; a typo would otherwise quantize
    what the recipe meant to keep."""
    import difflib

    names = [m.name for m in fates if m.kind == "linear"]
    problems = []
    for index, pattern in enumerate(recipe.skip):
        if any(matches(name, pattern) for name in names):
            continue
        nearest = difflib.get_close_matches(pattern.removeprefix("re:"), names, n=3, cutoff=0.0)
        problems.append((f"skip.{index}", f"{shown(pattern)} matches no Linear layer of {recipe.model.id}"
                         + (f"; nearest names: {', '.join(nearest)}" if nearest else "")
                         + "; allowed: a module name, or re:<regex> matched from the start of the name "
                         "(as compressed-tensors and vLLM read ignore entries)"))
    RecipeError.collect(source, problems)


def _linear_fate(name: str, component: str, shape: list[int], recipe: Recipe,
                 resolution: Resolution | None) -> tuple[Kept | None, str]:
    """Why a Linear is kept (None: it is quantized) and the detail the plan table shows."""
    if (pattern := first_match(name, recipe.skip)) is not None:
        return Kept.RECIPE, f"skip {pattern}"
    if resolution is not None and resolution.skipped_by is not None:
        return Kept.RECIPE, f"overrides.{resolution.skipped_by} skip"
    if component not in ("text_decoder", "moe_experts") and not (resolution and resolution.rules):
        return COMPONENT_KEPT[component], ""
    scheme = resolution.scheme if resolution else default_scheme(recipe)
    in_features = shape[1]
    if scheme.group_size and in_features % scheme.group_size:
        return Kept.SHAPE, f"in {in_features} % group {scheme.group_size} != 0"
    if (in_features * scheme.bits) % 32:
        return Kept.SHAPE, f"in {in_features} x {scheme.bits} bits % 32 != 0"
    if recipe.export != "compressed-tensors" and (shape[0] * scheme.bits) % 32:  # GPTQ packs zeros along out
        return Kept.SHAPE, f"out {shape[0]} x {scheme.bits} bits % 32 != 0"
    return None, ""


def _per_expert_fates(name: str, experts, layer_types: list[str]) -> list[ModuleFate]:
    """Fused experts as the per-expert Linears the quantizers and the packed exports address:
    `<name>.<i>.gate_proj` / `up_proj` [I, H] (the halves of gate_up_proj [E, 2I, H]) and
    `<name>.<i>.down_proj` [H, I]. Their fate is decided with every other Linear's."""
    num_experts, two_i, hidden = experts.gate_up_proj.shape
    shapes = {"gate_proj": [two_i // 2, hidden], "up_proj": [two_i // 2, hidden], "down_proj": [hidden, two_i // 2]}
    layer = int(_LAYER_INDEX.search(name).group(1))
    return [ModuleFate(name=f"{name}.{index}.{proj}", component="moe_experts", kind="linear", shape=shape,
                       params=shape[0] * shape[1], layer=layer,
                       layer_type=layer_types[layer] if layer < len(layer_types) else None, submodule=proj,
                       quantize=False, bf16_bytes=2 * shape[0] * shape[1], export_bytes=2 * shape[0] * shape[1])
            for index in range(num_experts) for proj, shape in shapes.items()]


def unties_head(fates: list[ModuleFate]) -> bool:
    """A quantized input table or head: the export stores the two apart."""
    return any(m.quantize and m.table in ("tokens", "lm_head") for m in fates)


def _plan_tables(recipe: Recipe, fates: list[ModuleFate], source: str | Path) -> None:
    """The recipe's `embeddings:` scheme for each token table, refused where the model has no such table
    or the group size does not divide its rows; a source-tied head stored apart counts in full."""
    tables = {m.table: m for m in fates if m.table is not None}
    problems = []
    for key in TABLES:
        scheme = table_scheme(getattr(recipe.embeddings, key))
        if scheme is None:
            continue
        m = tables.get(key)
        if m is None:
            problems.append((f"embeddings.{key}", f"{recipe.model.id} has no {TABLES[key]} table; allowed: bf16"))
        elif scheme.group_size and m.shape[1] % scheme.group_size:
            allowed = [value for value, option in ((v, table_scheme(v)) for v in get_args(TableScheme))
                       if option is None or not option.group_size or m.shape[1] % option.group_size == 0]
            problems.append((f"embeddings.{key}", f"group {scheme.group_size} does not divide {m.name}'s rows of "
                             f"{m.shape[1]}; allowed: {', '.join(allowed)}"))
        else:
            m.quantize, m.kept_because = True, None
            m.bits, m.group_size, m.symmetric = scheme.bits, scheme.group_size, scheme.symmetric
            m.reason = f"table {scheme.label}" + (" (untied)" if m.tied_to else "")
            m.export_bytes = quantized_bytes(m.shape[0], m.shape[1], scheme.bits, scheme.group_size, True)
    RecipeError.collect(source, problems)
    head = tables.get("lm_head")
    if unties_head(fates) and head is not None and head.tied_to and not head.quantize:
        head.export_bytes = 2 * head.params
        head.reason = f"{Kept.LM_HEAD}: untied from the quantized {head.tied_to}, stored BF16"


# Projections vLLM fuses into one layer, by the fused layer's name (its loader stacks the shards).
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _split_fused_projections(fates: list[ModuleFate]) -> list[tuple[str, str]]:
    """(recipe key, problem) for each layer whose projections vLLM fuses but the plan stores apart: kept and
    quantized, or at different schemes. vLLM takes one scheme per fused layer and refuses the checkpoint ("different
    quantization schemes for the shards"); llama.cpp does not fuse them, so GGUF builds may."""
    by_parent: dict[tuple[str, str], list[ModuleFate]] = defaultdict(list)
    for m in fates:
        for fused, shards in FUSED_PROJECTIONS.items():
            if m.kind == "linear" and m.component == "text_decoder" and m.submodule in shards:
                by_parent[(m.name.rsplit(".", 1)[0], fused)].append(m)
    problems = []
    for (parent, fused), members in by_parent.items():
        if len({m.scheme for m in members}) < 2:
            continue
        key = "skip" if any(m.kept_because == Kept.RECIPE for m in members) else "overrides"
        stored = ", ".join(f"{m.submodule} {m.scheme.label if m.scheme else 'BF16'}" for m in members)
        problems.append((key, f"{parent}: {stored}; vLLM fuses {'/'.join(m.submodule for m in members)} into one "
                              f"{fused} layer with one scheme for all its shards, and refuses a checkpoint that splits "
                              "them: select them together (e.g. submodule: attention or mlp), or use export: gguf"))
    return problems[:1] + ([(problems[0][0], f"... and {len(problems) - 1} more layers split the same way")]
                           if len(problems) > 1 else [])


def build_plan(meta_model, config, recipe: Recipe, source: str | Path = "<recipe>") -> Plan:
    """Every module's fate; `source` (the recipe file) names where an `overrides:` rule that does
    not fit this model came from."""
    import torch

    layer_types = getattr(config.get_text_config(), "layer_types", None) or []
    first_owner: dict[int, str] = {}
    for pname, param in meta_model.named_parameters(remove_duplicate=False):
        first_owner.setdefault(id(param), pname.rsplit(".", 1)[0])

    fates: list[ModuleFate] = []
    covered: set[int] = set()
    for name, module in meta_model.named_modules():
        if isinstance(module, torch.nn.Linear):
            kind = "linear"
        elif isinstance(module, torch.nn.Embedding):
            kind = "embedding"
        elif component_of(name) == "moe_experts":
            kind = "experts"
        else:
            continue
        params = [p for p in module.parameters(recurse=False)]
        if kind == "experts" and recipe.quantize_experts:
            fates += _per_expert_fates(name, module, layer_types)
            covered.update(id(p) for p in params)
            continue
        weight = module.weight if kind != "experts" else None
        shape = list(weight.shape) if weight is not None else [sum(p.numel() for p in params)]
        numel = sum(p.numel() for p in params)
        owner = first_owner[id(weight)] if weight is not None else name
        tied_to = owner if owner != name else None
        component = component_of(name)
        match = _LAYER_INDEX.search(name)
        layer = int(match.group(1)) if match and component in ("text_decoder", "ple", "moe_router", "moe_experts") else None
        bf16 = 0 if tied_to else 2 * numel
        parts = name.split(".")
        fates.append(ModuleFate(
            name=name, component=component, kind=kind, shape=shape, params=numel, layer=layer,
            layer_type=layer_types[layer] if layer is not None and layer < len(layer_types) else None,
            submodule=parts[-2] if parts[-1] == "linear" else parts[-1],
            quantize=False, tied_to=tied_to, bf16_bytes=bf16, export_bytes=bf16,
        ))
        covered.update(id(p) for p in params)

    _check_skip(recipe, fates, source)
    resolved = resolve(recipe, fates, config.get_text_config().num_hidden_layers, source)
    for m in fates:
        resolution = resolved.get(m.name)
        kept, detail = _linear_fate(m.name, m.component, m.shape, recipe, resolution) \
            if m.kind == "linear" else (COMPONENT_KEPT[m.component], "")
        m.quantize, m.kept_because = kept is None, kept
        m.reason = f"{kept}: {detail}" if detail else str(kept or "")
        if m.tied_to:
            m.reason = f"{m.reason} (tied, stored once)"
        if m.quantize:
            scheme = resolution.scheme if resolution else default_scheme(recipe)
            m.bits, m.group_size, m.symmetric = scheme.bits, scheme.group_size, scheme.symmetric
            m.export_bytes = (quantized_bytes(m.shape[0], m.shape[1], scheme.bits, scheme.group_size, scheme.symmetric,
                                              recipe.export)
                              + 2 * (m.params - m.shape[0] * m.shape[1]))

    if recipe.export != "gguf":
        RecipeError.collect(source, _split_fused_projections(fates))
    _plan_tables(recipe, fates, source)
    other = sum(p.numel() for p in meta_model.parameters() if id(p) not in covered)
    # Persistent buffers are saved in the checkpoint too (e.g. the vision/audio clip bounds).
    other += sum(b.numel() for module in meta_model.modules()
                 for bname, b in module.named_buffers(recurse=False)
                 if bname not in module._non_persistent_buffers_set)
    return Plan(model_id=recipe.model.id, scheme=recipe.scheme, bits=recipe.bits, group_size=recipe.group_size,
                symmetric=recipe.symmetric, modules=fates, other_params=other)

