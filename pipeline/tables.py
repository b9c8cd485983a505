"""The token tables a recipe quantizes (`embeddings:`): Gemma 4's Per-Layer-Embedding table, the input
table and the output head, stored as compressed-tensors' pack-quantized tables, the layout vLLM's
`CompressedTensorsEmbeddingWNA16Int` reads (symmetric int, group or channel, no zero point).

Round to nearest on compressed-tensors' symmetric min/max grid, row block by row block, so no table is
ever copied whole in float32 (E2B's PLE table holds 2.3 B values). Three library gaps are filled here
(see ../shared/notes/gemma4-quantization-findings.md, "Quantized embedding tables"):
- compressed-tensors picks a module's format by its exact class, so Gemma's ScaledWordEmbedding
  subclass would be written dense (a BF16 weight beside its scales): the scheme names pack-quantized;
- an untied head needs `tie_word_embeddings: false` in the *text* config, which vLLM reads, and at the
  top level, which transformers reads; llmcompressor's save writes neither;
- transformers 5.17's `_init_weights` draws `normal_(module.weight)` on every Embedding, and a packed
  table has no `weight` until compressed-tensors decompresses it: `loading_packed_tables` guards that.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.plan import ModuleFate, Plan
from pipeline.tensors import StoredTensors

ROWS_PER_BLOCK = 16384  # rows quantized (or checked) at a time: 16384 x 8960 float32 is 0.6 GB
# Gemma's scaled embeddings keep sqrt(hidden) in a non-persistent buffer; compressed-tensors turns a
# packed table's buffers into parameters, so transformers reports it missing and its `_init_weights`
# sets it from the config (which loading_packed_tables leaves to run).
DERIVED_ON_LOAD = "embed_scale"


def stage_bytes(plan: Plan) -> int:
    """What the table stage holds beside the model, for the memory plan: an untied head's own BF16 copy
    of the input table (held to the end of the run), and while the largest table is packed, its packed
    tensors beside one row block's working copies (measured: 4.8x the block's BF16 bytes)."""
    if not plan.tables:
        return 0
    copy = 2 * plan.head.params if plan.untied else 0
    packing = max(m.export_bytes + 5 * 2 * min(ROWS_PER_BLOCK, m.shape[0]) * m.shape[1] for m in plan.tables)
    return copy + packing


def row_blocks(rows: int) -> Iterator[slice]:
    for start in range(0, rows, ROWS_PER_BLOCK):
        yield slice(start, start + ROWS_PER_BLOCK)


def untie_head(model) -> None:
    """Give lm_head its own copy of the input table, and say so in both config flags. Through
    compressed-tensors' offload helpers: after a pass the model's weights may live in its offload cache."""
    from compressed_tensors.offload import align_module_device
    from compressed_tensors.utils import delete_offload_parameter, register_offload_parameter

    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    with align_module_device(table):
        copy = table.weight.detach().clone()
    delete_offload_parameter(head, "weight")
    register_offload_parameter(head, "weight", torch.nn.Parameter(copy, requires_grad=False))
    model.config.tie_word_embeddings = False
    model.config.get_text_config().tie_word_embeddings = False


@torch.no_grad()
def quantize_tables(model, plan: Plan) -> None:
    """Quantize the plan's tables in place: each table's weight on its grid (what the model computes
    from now on), with compressed-tensors' frozen pack-quantized scheme for the export to pack."""
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme, QuantizationStatus,
                                                 apply_quantization_config)
    from compressed_tensors.offload import align_module_device, update_offload_parameter
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    from pipeline.quantize.blockwise import rtn_qparams
    from pipeline.quantize.grids import weight_args

    if not plan.tables:
        return
    if plan.untied:
        untie_head(model)
    groups = {f"table_{i}": QuantizationScheme(targets=[m.name], weights=weight_args(m.scheme), format="pack-quantized")
              for i, m in enumerate(plan.tables)}
    apply_quantization_config(model, QuantizationConfig(config_groups=groups, quantization_status=QuantizationStatus.FROZEN),
                              show_progress=False)
    for fate in plan.tables:
        module = model.get_submodule(fate.name)
        args = module.quantization_scheme.weights
        with align_module_device(module):
            weight, scales = module.weight.data, []
            for rows in row_blocks(weight.shape[0]):  # compressed-tensors' min/max scale, per block
                scale = rtn_qparams(weight[rows].float(), fate.scheme)[0].to(weight.dtype)
                weight[rows] = fake_quantize(weight[rows], scale, torch.zeros_like(scale, dtype=torch.int8), args)
                scales.append(scale)
            scale = torch.cat(scales)
            update_offload_parameter(module, "weight", weight)
            update_offload_parameter(module, "weight_scale", scale.reshape(module.weight_scale.shape))


@torch.no_grad()
def pack_tables(model, plan: Plan) -> None:
    """Pack each planned table as compressed-tensors' pack-quantized tensors, row block by row block,
    and mark it compressed: the save compresses only modules not yet compressed, so it writes these as
    they are. Fills a library gap: compressed-tensors' compressor packs a module whole, through int8 and
    two int32 copies (measured: a peak of 4.8x the BF16 table, 21 GiB on E2B's PLE table). Its own
    `quantize` and `pack_to_int32` on each block, which act row by row, give the same tensors."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.offload import align_module_device
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.utils import get_direct_state_dict, replace_direct_state_dict

    for fate in plan.tables:
        module = model.get_submodule(fate.name)
        args = module.quantization_scheme.weights
        with align_module_device(module):
            state = dict(get_direct_state_dict(module))
        weight, scale, zero_point = state.pop("weight"), state["weight_scale"], state.pop("weight_zero_point")
        packed = torch.empty(packed_layout(fate)["weight_packed"][1], dtype=torch.int32)
        for rows in row_blocks(weight.shape[0]):
            packed[rows] = pack_to_int32(quantize(weight[rows], scale[rows], zero_point[rows], args, dtype=torch.int8),
                                         args.num_bits)
        state["weight_packed"] = packed
        state["weight_shape"] = torch.tensor(weight.shape)
        del weight
        replace_direct_state_dict(module, state)  # symmetric: no zero point, as compressed-tensors stores it
        module.quantization_status = QuantizationStatus.COMPRESSED


def write_tie_flags(folder: Path, plan: Plan) -> None:
    """An untied export says so at the top level and in the text config (see the module docstring)."""
    if not plan.untied:
        return
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@contextmanager
def kept_untied(plan: Plan):
    """llmcompressor's save re-ties an input table and head that hold equal tensors (both quantized
    alike), and a tied packed pair is what vLLM cannot load: while saving an untied plan, it does not."""
    from llmcompressor.transformers.compression import compressed_tensors_utils

    original = compressed_tensors_utils._retie_embeddings
    if plan.untied:
        compressed_tensors_utils._retie_embeddings = lambda model: None
    try:
        yield
    finally:
        compressed_tensors_utils._retie_embeddings = original


@contextmanager
def loading_packed_tables():
    """transformers' `from_pretrained` of an export with packed tables: `_init_weights` skips the
    `normal_` draw on an Embedding that has no `weight` yet, and is otherwise untouched (restored after)."""
    from transformers import PreTrainedModel

    original = PreTrainedModel._init_weights

    def _init_weights(self, module):
        if isinstance(module, torch.nn.Embedding) and "weight" not in module._parameters:
            return None
        return original(self, module)

    PreTrainedModel._init_weights = _init_weights
    try:
        yield
    finally:
        PreTrainedModel._init_weights = original


def derived_on_load(key: str, stored: set[str]) -> bool:
    """A key transformers reports missing that it derives itself: a packed table's embed_scale."""
    owner, _, leaf = key.rpartition(".")
    return leaf == DERIVED_ON_LOAD and f"{owner}.weight_packed" in stored


def table_problems(export: StoredTensors, source: StoredTensors, plan: Plan) -> list[str]:
    """Each planned table stored packed (vLLM's names, dtypes and shapes) with the integers × scales of
    round-to-nearest on its stored scales: every value within half a step of the source's; an untied
    BF16 head equal to the source's input table."""
    problems = []
    for fate in plan.tables:
        problems += _packed_table_problems(export, source, fate)
    head = plan.head
    if plan.untied and not head.quantize:
        key, source_key = f"{head.name}.weight", f"{head.tied_to}.weight"
        if key not in export.files:
            problems.append(f"{head.name}: the untied head is not stored ({key} is missing)")
        elif not torch.equal(export.get(key), source.get(source_key).to(export.get(key).dtype)):
            problems.append(f"{head.name}: the untied head differs from the source's {source_key}")
    return problems


def packed_layout(fate: ModuleFate) -> dict[str, tuple[str, list[int]]]:
    """The tensors vLLM's CompressedTensorsEmbeddingWNA16Int registers for a table, as safetensors
    dtypes and shapes: int32 rows of 32 / bits values, one scale per group (or row), the unpacked shape."""
    rows, cols = fate.shape
    groups = cols // fate.group_size if fate.group_size else 1
    return {"weight_packed": ("I32", [rows, cols * fate.bits // 32]),
            "weight_scale": ("BF16", [rows, groups]), "weight_shape": ("I64", [2])}


def _packed_table_problems(export: StoredTensors, source: StoredTensors, fate: ModuleFate) -> list[str]:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    problems = []
    if f"{fate.name}.weight" in export.files:
        problems.append(f"{fate.name}: planned {fate.scheme.label} but {fate.name}.weight is stored")
    for leaf, (dtype, shape) in packed_layout(fate).items():
        key = f"{fate.name}.{leaf}"
        if key not in export.files:
            problems.append(f"{fate.name}: {key} is missing from the export")
        elif export.headers[key] != (dtype, shape):
            problems.append(f"{fate.name}: {leaf} is {' '.join(map(str, export.headers[key]))}, vLLM reads {dtype} {shape}")
    if problems:
        return problems
    rows, cols = fate.shape
    if (stored_shape := export.get(f"{fate.name}.weight_shape").tolist()) != [rows, cols]:
        return [f"{fate.name}: weight_shape says {stored_shape}, the table is {[rows, cols]}"]
    original_key = f"{fate.tied_to or fate.name}.weight"
    limit = 2 ** (fate.bits - 1)
    group = fate.group_size or cols
    for block in row_blocks(rows):  # read from disk block by block: a table is never whole in memory
        packed = export.rows(f"{fate.name}.weight_packed", block)
        ints = unpack_from_int32(packed, fate.bits, torch.Size([packed.shape[0], cols])).to(torch.int32)
        scale = export.rows(f"{fate.name}.weight_scale", block).float()
        if ints.min() < -limit or ints.max() >= limit:
            return [f"{fate.name}: integers outside [{-limit}, {limit - 1}]"]
        values = (ints.float().reshape(ints.shape[0], -1, group) * scale.unsqueeze(-1)).reshape(ints.shape)
        # Round to nearest lands within half a step; compressed-tensors divides in bf16 (twice: our
        # fake-quantization and its compressor), whose rounding of the quotient is up to 2^(bits-1) x 2^-9
        # steps each time, and the value x scale is rounded to bf16 once: 0.58 steps at int4, 1.75 at int8.
        steps = 0.5 + 2 ** (fate.bits - 1) * 5 * 2 ** -9
        step = scale.abs().repeat_interleave(group, dim=1)
        if ((values - source.rows(original_key, block).float()).abs() > steps * step + 1e-6).any():
            return [f"{fate.name}: stored integers x scales are further than {steps:.2f} steps from the source's "
                    "values (not its round-to-nearest)"]
    return []
