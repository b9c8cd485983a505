"""A complete export folder, written to a staging folder and moved into place atomically.

Complete means what users load and serve: config.json with quantization_config, the
quantized weights, and the source's tokenizer, processor, chat template and generation
config files. A failed or interrupted run never replaces a good export.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch

from pipeline.formats import COMPRESSED_TENSORS, FORMATS, kept_problems, save_packed, scheme_problems
from pipeline.model import Source, sidecar_files
from pipeline.plan import Plan
from pipeline.names import matches
from pipeline.quantize.base import Backend
from pipeline.recipe import Recipe
from pipeline.rundir import FileSum
from pipeline.tables import kept_untied, pack_tables, write_tie_flags
from pipeline.tensors import WEIGHT_GLOB, StoredTensors

SIZE_TOLERANCE = 0.02  # the plan counts tensor data exactly; the margin is for layouts it rounds


class ExportIncomplete(RuntimeError):
    pass


def write_export(model, backend: Backend, source: Source, recipe: Recipe, plan: Plan, folder: Path) -> list[str]:
    """Save the quantized model and the source's side files into `folder`; return the copied names."""
    from pipeline.text_only import detach_from_source_config, export_sidecars, wanted

    if recipe.export == COMPRESSED_TENSORS:
        if wanted(recipe):
            detach_from_source_config(model)
        pack_tables(model, plan)
        with kept_untied(plan):
            backend.save(model, folder, recipe)
        write_tie_flags(folder, plan)
        add_missing_ignores(folder, plan)
    else:
        save_packed(model, plan, recipe, folder)
    copied = []
    for path in export_sidecars(recipe, sidecar_files(source)):
        if not (folder / path.name).exists():
            shutil.copy2(path, folder / path.name)
            copied.append(path.name)
    check_complete(folder, plan, recipe.export)
    return copied


def add_missing_ignores(folder: Path, plan: Plan) -> None:
    """compressed-tensors derives `ignore` from the module classes it quantized (Linear), so fused
    MoE experts kept in BF16 are not listed; vLLM applies the Linear scheme to experts unless
    they are ignored, so the plan's entries are added."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    ignore = config.get("quantization_config", {}).get("ignore")
    if ignore is None:
        return
    missing = [name for name in plan.ignore if name not in ignore]
    if missing:
        config["quantization_config"]["ignore"] = ignore + missing
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def ignore_problems(ignore: list[str], plan: Plan) -> list[str]:
    """Every module the plan keeps must be ignored, and no quantized module may be."""
    problems = [f"{name} is kept in BF16 but not in quantization_config.ignore"
                for name in plan.ignore if name not in ignore]
    quantized = {m.name for m in plan.quantized}
    for entry in ignore:
        problems += [f"{n} is quantized but quantization_config.ignore lists it ({entry})"
                     for n in quantized if matches(n, entry)]
    return problems


def written_quantization_config(folder: Path) -> tuple[dict | None, list[str]]:
    """The export's quantization_config, or None and why it cannot be read."""
    try:
        qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, [f"{folder.name}/config.json has no readable quantization_config ({type(err).__name__}: {str(err)[:200]})"]
    if not isinstance(qconfig, dict):
        return None, [f"{folder.name}/config.json: quantization_config is not an object"]
    return qconfig, []


def config_problems(qconfig: dict, plan: Plan, export_format: str) -> list[str]:
    """The written quantization_config against the plan: it keeps what the plan keeps, and gives every
    quantized module the plan's scheme for it."""
    kept = (ignore_problems(qconfig.get("ignore", []), plan) if export_format == COMPRESSED_TENSORS
            else kept_problems(qconfig, plan, FORMATS[export_format]))
    return kept + scheme_problems(qconfig, plan, FORMATS[export_format])


def check_complete(folder: Path, plan: Plan, export_format: str = COMPRESSED_TENSORS) -> None:
    """The export has weights and a quantization_config that keeps exactly what the plan keeps and,
    for compressed-tensors, names every module the written weights store 16-bit (no packed one)."""
    if not any(folder.glob(WEIGHT_GLOB)):
        raise ExportIncomplete(f"{folder}: no safetensors weights were written")
    qconfig, unreadable = written_quantization_config(folder)
    if unreadable or not qconfig:
        raise ExportIncomplete(f"{folder.parent}/{unreadable[0]}" if unreadable
                               else f"{folder}/config.json has an empty quantization_config")
    written, estimate = StoredTensors(folder).data_bytes(), plan.export_bytes
    if abs(written / estimate - 1) > SIZE_TOLERANCE:
        # e.g. experts or towers written in BF16 that the plan counted packed, or the reverse
        raise ExportIncomplete(f"the weights written ({written / 1e6:.2f} MB) differ from the plan's estimate "
                               f"({estimate / 1e6:.2f} MB) by more than {SIZE_TOLERANCE:.0%}: the export does not hold what the plan says")
    if problems := config_problems(qconfig, plan, export_format):
        raise ExportIncomplete(f"quantization_config does not say what the plan says ({len(problems)} problems): "
                               + "; ".join(problems[:5]))
    from pipeline.index_check import index_ignore_problems

    if export_format == COMPRESSED_TENSORS and (problems := index_ignore_problems(folder, qconfig.get("ignore", []))):
        raise ExportIncomplete(f"quantization_config.ignore does not match the written weights "
                               f"({len(problems)} problems): " + "; ".join(problems[:5]))


GENERATION_CONFIG = "generation_config.json"


def sidecar_problems(export: Path, source_files: list[Path]) -> list[str]:
    """The tokenizer, chat template, processor and generation config the export ships are the source's:
    each file byte for byte, except generation_config.json, which save_pretrained may write itself and is
    compared by its settings."""
    problems = []
    for path in source_files:
        shipped = export / path.name
        if not shipped.is_file():
            problems.append(f"{export.name}/{path.name} is missing: the source ships it")
        elif shipped.read_bytes() != path.read_bytes() and not (
                path.name == GENERATION_CONFIG and _generation_settings(shipped) == _generation_settings(path)):
            problems.append(f"{export.name}/{path.name} differs from the source's {path.name}")
    return problems


def _generation_settings(path: Path) -> dict | None:
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {k: v for k, v in settings.items() if k != "transformers_version"} if isinstance(settings, dict) else None


def replace_atomically(staging: Path, final: Path) -> None:
    """Move `staging` to `final`; an existing `final` is only removed once the new one is in place."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}-old-", dir=final.parent))
        final.rename(old / final.name)
    staging.rename(final)
    if old is not None:
        shutil.rmtree(old)


def restore_interrupted_swap(final: Path) -> bool:
    """A run killed between the two renames of replace_atomically left the good folder aside: put it back."""
    if final.exists():
        return False
    for old in sorted(final.parent.glob(f".{final.name}-old-*/{final.name}")):
        old.rename(final)
        return True
    return False


def file_checksums(folder: Path) -> dict[str, FileSum]:
    sums = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        sums[path.name] = FileSum(bytes=path.stat().st_size, sha256=digest.hexdigest())
    return sums


def tensor_digests(folder: Path) -> dict[str, str]:
    """sha256 of every stored tensor's bytes, so a later check can name exactly what changed."""
    return {name: tensor_digest(tensor) for name, tensor in StoredTensors(folder).items()}


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())
