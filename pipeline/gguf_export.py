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
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.plan import Plan
from pipeline.recipe import Recipe
from pipeline.rundir import GGUFFile
from pipeline.runtimes.llamacpp import Quantization, convert, quantize
from pipeline.tensors import StoredTensors

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


def gguf_names(bf16_gguf: Path, source: StoredTensors, module_names: list[str]) -> dict[str, str]:
    """Module name → GGUF tensor name, by identical BF16 bytes (see the module's docstring)."""
    from gguf import GGUFReader, GGMLQuantizationType

    by_digest = {}
    for tensor in GGUFReader(bf16_gguf).tensors:
        if tensor.tensor_type == GGMLQuantizationType.BF16:
            by_digest.setdefault(hashlib.sha256(np.ascontiguousarray(tensor.data).tobytes()).hexdigest(), []).append(tensor.name)
    names, unmatched = {}, []
    for name in module_names:
        weight = source.get(f"{name}.weight").to(torch.bfloat16).contiguous()
        found = by_digest.get(hashlib.sha256(weight.view(torch.uint16).numpy().tobytes()).hexdigest(), [])
        if len(found) == 1:
            names[name] = found[0]
        else:
            unmatched.append(f"{name} ({'no' if not found else len(found)} GGUF tensors with its bytes)")
    if unmatched:
        raise GGUFExportError(f"{len(unmatched)} Linear weights are not stored unchanged in llama.cpp's 16-bit GGUF, "
                              f"so this run's integers cannot be placed by content: {unmatched[:3]}")
    return names


@dataclass
class ImportanceMatrix:
    """llama.cpp's importance matrix, by GGUF tensor name: each Linear's summed squared input per input column
    and the rows (tokens) summed, over the calibration windows, on the model as the run quantized it."""

    sums: dict[str, np.ndarray]
    counts: dict[str, int]
    windows: int

    def means(self) -> dict[str, np.ndarray]:
        """What llama.cpp's quantizer weighs each column by (its C API takes the means)."""
        return {name: self.sums[name] / self.counts[name] for name in self.sums}

    def save(self, path: Path, dataset: str) -> Path:
        """llama.cpp's own imatrix file (`llama-imatrix`'s GGUF: `<tensor>.in_sum2`, `<tensor>.counts`), which
        `llama-quantize --imatrix` reads."""
        from gguf import GGUFWriter

        writer = GGUFWriter(path, "imatrix")
        writer.add_type("imatrix")
        writer.add_array("imatrix.datasets", [dataset])
        writer.add_uint32("imatrix.chunk_count", self.windows)
        writer.add_uint32("imatrix.chunk_size", next(iter(self.counts.values())) // max(self.windows, 1))
        for name in sorted(self.sums):
            writer.add_tensor(f"{name}.in_sum2", self.sums[name].astype(np.float32)[None])
            writer.add_tensor(f"{name}.counts", np.array([[self.counts[name]]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path


@torch.no_grad()
def importance(model, gguf_name: dict[str, str], tokens: torch.Tensor) -> ImportanceMatrix:
    """The importance matrix of `model`'s Linears named in `gguf_name`, over the windows of `tokens`."""
    sums, counts, hooks = {}, {}, []
    modules = dict(model.named_modules())

    def hook(name):
        def record(module, args, output):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    for name in gguf_name:
        hooks.append(modules[name].register_forward_hook(hook(name)))
    device = next(model.parameters()).device
    try:
        for window in tokens.split(1):
            model(input_ids=window.to(device))
    finally:
        for handle in hooks:
            handle.remove()
    return ImportanceMatrix({gguf_name[n]: sums[n].double().cpu().numpy() for n in sums},
                           {gguf_name[n]: counts[n] for n in counts}, tokens.shape[0])


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


def carry_integers(path: Path, model, plan: Plan, gguf_name: dict[str, str], gguf_type: str) -> int:
    """Overwrite each planned Linear's blocks in the GGUF at `path` with the run's integers and scales."""
    from gguf import GGUFReader

    from pipeline.formats import integer_grid

    reader = GGUFReader(path, "r+")
    tensors = {t.name: t for t in reader.tensors}
    modules = dict(model.named_modules())
    for fate in plan.quantized:
        tensor = tensors[gguf_name[fate.name]]
        if tensor.tensor_type.name != gguf_type:
            raise GGUFExportError(f"llama.cpp wrote {tensor.name} as {tensor.tensor_type.name}, not {gguf_type}")
        grid = integer_grid(modules[fate.name])
        data = block_bytes(grid.ints, grid.scale, gguf_type)
        if data.shape != tensor.data.shape:
            raise GGUFExportError(f"{tensor.name}: {data.shape} bytes of blocks for a {tensor.data.shape} tensor")
        tensor.data[...] = data
    reader.data.flush()
    return len(plan.quantized)


def overrides(recipe: Recipe, plan: Plan, gguf_name: dict[str, str]) -> dict[str, str]:
    """Types llama.cpp must give some tensors whatever the file's type: the token tables as the recipe's
    `embeddings:` says, and every Linear the plan keeps in BF16."""
    import re

    forced = {pattern: TABLE_TYPES[getattr(recipe.embeddings, key)] for key, pattern in GGUF_TABLES.items()}
    kept = [m.name for m in plan.modules if not m.quantize and m.kind == "linear" and m.name in gguf_name]
    forced |= {f"^{re.escape(gguf_name[name])}$": "BF16" for name in kept}
    return forced


def write_gguf(model, plan: Plan, recipe: Recipe, source_dir: Path, folder: Path, tokens: torch.Tensor,
               work: Path, rename=None) -> list[GGUFFile]:
    """The export folder's GGUF files, one per `recipe.gguf.types`."""
    bf16 = convert(source_dir, work / "source-BF16.gguf", log_path=work / "convert.log")
    linears = [m.name for m in plan.modules if m.kind == "linear" and m.component in TEXT_LINEARS]
    names = gguf_names(bf16, StoredTensors(source_dir, rename), linears)
    forced = overrides(recipe, plan, names)
    written = [(t, carries(recipe, plan, t)) for t in recipe.gguf.types]
    if recipe.gguf.baselines:
        written += [(t, False) for t, carried in list(written) if carried]
    matrix = None
    if any(not carried and t not in ("BF16", "F16") for t, carried in written):
        log.info("importance matrix over %d calibration windows", tokens.shape[0])
        matrix = importance(model, names, tokens)
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
