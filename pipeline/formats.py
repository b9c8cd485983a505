"""Export formats besides compressed-tensors: GPTQ folders and auto-round's native format.

Every backend leaves the planned modules carrying compressed-tensors' quantization state (scale,
zero point, arguments). Their integers are taken with compressed-tensors' own `quantize` — the
call its compressor makes when it writes a compressed-tensors export — so the three formats of one
run hold the same integers. They are then packed with auto-round's GPTQ-layout packer (qweight
int32 along the input dim, qzeros storing zero − 1, fp16 scales [groups, out]), the layout that
both formats share:

- `gptq`: AutoGPTQ / GPTQModel layout (`quant_method: gptq`, `desc_act: false`, `g_idx` stored),
  modules kept in BF16 named as negative `dynamic` rules, which vLLM's gptq / gptq_marlin read;
  transformers loads it through auto-round's loader (`quantization_config=AutoRoundConfig()`),
  without needing optimum or gptqmodel.
- `auto-round`: `quant_method: auto-round`, `packing_format: auto_round:auto_gptq`, kept modules in
  `extra_config` at 16 bits; transformers loads it as is (auto-round installed), vLLM through its
  auto-round config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.names import first_dynamic_rule, matches
from pipeline.overrides import WeightScheme
from pipeline.plan import Plan
from pipeline.recipe import Recipe

COMPRESSED_TENSORS = "compressed-tensors"


@dataclass(frozen=True)
class ExportFormat:
    name: str
    packed_weight: str  # the int32 tensor that holds a quantized module's weight
    module_tensors: tuple[str, ...]  # every tensor a quantized module stores
    g_idx: bool = False

    def load_kwargs(self) -> dict:
        """What `from_pretrained` needs besides the folder to load this format in transformers."""
        if self.name == "gptq":
            from transformers import AutoRoundConfig

            # transformers' own GPTQ loader needs optimum + gptqmodel; auto-round's reads the layout.
            return {"quantization_config": AutoRoundConfig()}
        return {}

    def tolerated_unexpected(self, key: str) -> bool:
        """Keys transformers reports unexpected that the format must still store: with desc_act off
        auto-round's loader has no g_idx buffer, but vLLM's GPTQ loader requires the tensor."""
        return self.g_idx and key.endswith(".g_idx")


FORMATS = {
    COMPRESSED_TENSORS: ExportFormat(COMPRESSED_TENSORS, "weight_packed",
                                     ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")),
    "gptq": ExportFormat("gptq", "qweight", ("qweight", "qzeros", "scales", "g_idx", "bias"), g_idx=True),
    "auto-round": ExportFormat("auto-round", "qweight", ("qweight", "qzeros", "scales", "bias")),
}


def export_format(name: str) -> ExportFormat:
    return FORMATS[name]


@dataclass
class IntegerGrid:
    """One module's weight as stored: integers (as float), its scales and zero points [out, groups]."""

    ints: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    group_size: int | None


def integer_grid(module) -> IntegerGrid:
    from compressed_tensors.quantization.lifecycle.forward import quantize

    args = module.quantization_scheme.weights
    zero_point = getattr(module, "weight_zero_point", None)
    if zero_point is None:
        zero_point = torch.zeros_like(module.weight_scale, dtype=torch.int8)
    ints = quantize(module.weight, module.weight_scale, zero_point, args)
    return IntegerGrid(ints.float(), module.weight_scale.float(), zero_point.to(torch.int32), args.num_bits,
                       args.group_size)


def pack_module(module, grid: IntegerGrid, g_idx: bool):
    """A QuantLinear (auto-round's GPTQ-layout packer) holding `grid`'s integers exactly: the packer
    computes round(W / scale + zero), so it is handed W = ints × scale in float32."""
    from auto_round_extension.torch.qlinear_torch_zp import QuantLinear

    out_features, in_features = module.weight.shape
    offset = 2 ** (grid.bits - 1)  # signed grid [-2^(b-1), 2^(b-1)) -> GPTQ's unsigned one
    scale = grid.scale.reshape(out_features, -1)
    zero = (grid.zero_point.reshape(out_features, -1) + offset).clone()
    groups = scale.shape[1]
    dequantized = ((grid.ints.reshape(out_features, groups, -1) - grid.zero_point.reshape(out_features, groups, 1))
                   * scale.unsqueeze(-1)).reshape(out_features, in_features)
    carrier = torch.nn.Linear(in_features, out_features, bias=module.bias is not None)
    carrier.weight.data = dequantized
    if module.bias is not None:
        carrier.bias.data = module.bias.data.float()
    packed = QuantLinear(grid.bits, grid.group_size or -1, in_features, out_features, module.bias is not None,
                         g_idx=g_idx)
    packed.pack(carrier, scale, zero, None)
    return packed


def block_prefix(plan: Plan) -> str:
    """The decoder layers' common prefix (`model.language_model.layers` or `model.layers`)."""
    names = [m.name for m in plan.quantized]
    prefixes = {re.sub(r"\.\d+\..*$", "", n) for n in names}
    if len(prefixes) != 1:
        raise ValueError(f"quantized modules outside one decoder stack: {sorted(prefixes)}")
    return prefixes.pop()


def kept_names(plan: Plan) -> list[str]:
    """Every Linear and fused expert block kept in BF16: the plan's ignore list without its patterns."""
    return [name for name in plan.ignore if not name.startswith("re:")]


def quantization_config(fmt: ExportFormat, plan: Plan, recipe: Recipe) -> dict:
    common = {"bits": recipe.bits, "group_size": recipe.group_size or -1, "sym": recipe.symmetric}
    if fmt.name == "gptq":
        return {
            "quant_method": "gptq", **common, "desc_act": False, "lm_head": False, "checkpoint_format": "gptq",
            "true_sequential": True, "damp_percent": recipe.gptq.dampening, "provider": "gemma-quant",
            # vLLM matches `dynamic` against its own module prefixes, which may differ from the
            # checkpoint's in their first parts (e.g. `language_model.model.` for `model.language_model.`):
            # so each kept module is named by everything from its last known anchor onward.
            "dynamic": {f"-:{pattern}": {} for pattern in _prefix_free_patterns(kept_names(plan))},
        }
    if fmt.name == "auto-round":
        return {
            "quant_method": "auto-round", "packing_format": "auto_round:auto_gptq", **common, "data_type": "int",
            "block_name_to_quantize": [block_prefix(plan)], "provider": "gemma-quant",
            "extra_config": {name: {"bits": 16, "data_type": "float"} for name in kept_names(plan)},
        }
    raise ValueError(f"no packed layout for {fmt.name}")


_TOWERS = r"(vision_tower|audio_tower|embed_vision|embed_audio|multi_modal_projector)"
_ANCHORS = r"(layers\.\d+\.|lm_head|per_layer_model_projection)"


def _prefix_free_patterns(names: list[str]) -> list[str]:
    patterns = []
    for name in names:
        if tower := re.search(_TOWERS, name):
            patterns.append(rf".*{tower.group(1)}\..*")
            continue
        anchors = list(re.finditer(_ANCHORS, name))
        tail = ".*" + re.escape(name[anchors[-1].start():] if anchors else name)
        # Loaders that unfuse MoE experts address them per expert (`experts.<i>.<gate|up|down>_proj`).
        patterns.append(tail + (r"(\.\d+\.(gate|up|down)_proj)?$" if name.endswith(".experts") else "$"))
    return sorted(set(patterns))


def kept_problems(qconfig: dict, plan: Plan, fmt: ExportFormat) -> list[str]:
    """The written quantization_config must keep every module the plan keeps and no quantized one."""
    quantized = [m.name for m in plan.quantized]
    if fmt.name == "gptq":
        dynamic = list(qconfig.get("dynamic", {}))
        problems = []
        for name in kept_names(plan):
            rule = first_dynamic_rule(name, dynamic)
            if rule is None:
                problems.append(f"{name} is kept in BF16 but no negative `dynamic` rule matches it")
            elif not rule.startswith("-:"):
                problems.append(f"{name} is kept in BF16 but the first `dynamic` rule matching it, {rule!r}, "
                                "quantizes it")
        problems += [f"{name} is quantized but the `dynamic` rule {rule[2:]!r} skips it" for name in quantized
                     if (rule := first_dynamic_rule(name, dynamic)) and rule.startswith("-:")]
        return problems
    if fmt.name == "auto-round":
        extra = qconfig.get("extra_config", {})
        problems = [f"{name} is kept in BF16 but not in extra_config at 16 bits"
                    for name in kept_names(plan) if extra.get(name, {}).get("bits") != 16]
        problems += [f"{name} is quantized but extra_config keeps it" for name in quantized if name in extra]
        return problems
    raise ValueError(f"no packed layout for {fmt.name}")


def written_scheme(qconfig: dict, fmt: ExportFormat, name: str, linear: bool = True) -> WeightScheme | None:
    """The weight scheme a loader reads from the written `quantization_config` for module `name` (None:
    kept unquantized), with the matching rules of the loaders of each format: compressed-tensors'
    config-group targets (class `Linear`, a name, or `re:` by its own matcher), GPTQ's `dynamic` rules
    (the first matching rule wins), auto-round's `extra_config` by name (pipeline/names.py).
    Raises KeyError, TypeError or ValueError on a config that does not say."""
    if fmt.name == COMPRESSED_TENSORS:
        # A target naming the module wins over the class target, as compressed-tensors and vLLM match;
        # the class target `Linear` does not cover the embedding tables.
        all_groups = list(qconfig.get("config_groups", {}).values())
        groups = ([g for g in all_groups if any(t != "Linear" and matches(name, t) for t in g.get("targets", []))]
                  or [g for g in all_groups if linear and "Linear" in g.get("targets", [])])
        if not groups or not groups[0].get("weights"):
            return None
        weights = groups[0]["weights"]
        fields = {"bits": weights["num_bits"], "sym": weights["symmetric"],
                  "group_size": weights.get("group_size") if weights.get("strategy") == "group" else None}
    else:
        fields = {"bits": qconfig["bits"], "group_size": qconfig["group_size"], "sym": qconfig["sym"]}
        if fmt.name == "gptq":
            rule = first_dynamic_rule(name, qconfig.get("dynamic", {}))
            if rule is not None and rule.startswith("-:"):
                return None
            fields |= qconfig["dynamic"][rule] if rule else {}
        else:
            fields |= qconfig.get("extra_config", {}).get(name, {})
        if fields["bits"] == 16:
            return None
    group_size = fields["group_size"]
    return WeightScheme(bits=fields["bits"], group_size=None if group_size == -1 else group_size,
                        symmetric=fields["sym"])


def scheme_problems(qconfig: dict, plan: Plan, fmt: ExportFormat) -> list[str]:
    """Every quantized module's scheme as the written config gives it against the plan's for that module:
    a config that says another group size or bit width makes every loader read the integers wrongly."""
    problems = []
    for module in plan.quantized + plan.tables:
        planned = module.scheme
        try:
            written = written_scheme(qconfig, fmt, module.name, module.kind == "linear")
        except (KeyError, TypeError, ValueError) as err:
            problems.append(f"{module.name}: quantization_config's scheme for it cannot be read "
                            f"({type(err).__name__}: {str(err)[:200]})")
            continue
        if written is None:
            problems.append(f"{module.name} is planned {planned.label} but quantization_config gives it no scheme")
        elif written != planned:
            problems.append(f"{module.name} is planned {planned.label} but quantization_config says {written.label}")
    return problems


def unfuse_experts(model) -> None:
    """Fused MoE experts as per-expert Linears (`experts.<i>.<gate|up|down>_proj`), through auto-round's
    own unfusing: its loader (transformers with AutoRoundConfig) unfuses Gemma 4's experts before
    loading a GPTQ or auto-round folder and expects this layout; vLLM's MoE loaders read it too."""
    from auto_round.modeling.fused_moe.moe_experts_interface import prepare_model_for_moe_quantization

    prepare_model_for_moe_quantization(model)


_PER_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


def fused_source(key: str) -> tuple[str, int, str] | None:
    """For a per-expert weight of an unfused export: the source's fused tensor, the expert, the part."""
    match = _PER_EXPERT.match(key)
    if not match:
        return None
    fused = "down_proj" if match["proj"] == "down" else "gate_up_proj"
    return f"{match['experts']}.{fused}", int(match["index"]), match["proj"]


def expert_slice(fused: torch.Tensor, index: int, proj: str) -> torch.Tensor:
    """gate_up_proj [E, 2I, H] holds gate then up along dim 1 (the forward chunks it in two)."""
    if proj == "down":
        return fused[index]
    gate, up = fused[index].chunk(2, dim=0)
    return gate if proj == "gate" else up


def save_packed(model, plan: Plan, recipe: Recipe, folder: Path) -> None:
    """Replace every planned module by its packed form and save the model in `recipe.export`'s layout."""
    from transformers import PreTrainedModel

    fmt = export_format(recipe.export)
    if any(m.component == "moe_experts" for m in plan.modules):
        unfuse_experts(model)  # a no-op when the experts were unfused to be quantized
    for fate in plan.quantized:
        module = model.get_submodule(fate.name)
        packed = pack_module(module, integer_grid(module), fmt.g_idx)
        parent, _, child = fate.name.rpartition(".")
        setattr(model.get_submodule(parent), child, packed)
    model.config.quantization_config = quantization_config(fmt, plan, recipe)
    # The class's own save_pretrained: llmcompressor wraps the instance's to write compressed-tensors.
    PreTrainedModel.save_pretrained(model, folder)
