"""The source checkpoint: config, weights and the files that travel with them.

A model spec is a Hub id, a local folder, or `tiny:<variant>` (a seeded random tiny Gemma 4,
built once into a cache folder so every later stage treats it like any local checkpoint).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.cache import cache_dir
from pipeline.recipe import GEMMA3_270M, ModelSpec, RecipeError, clip, looks_local, shown

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Files written by the export itself, never copied from the source.
EXPORT_WRITES = ("config.json", "README.md", "recipe.yaml", "ple_hot_ids.json")  # the last: generate/ple_cache.py
SIDECAR_PATTERNS = ["*.json", "*.jinja", "*.model", "*.txt", "*.py"]


@dataclass(frozen=True)
class Source:
    """A resolved checkpoint: where its files are and what to call it."""

    spec: ModelSpec
    path: Path | None  # local folder; None for a Hub id not downloaded yet

    @property
    def ref(self) -> str:
        """What transformers' from_pretrained takes."""
        return str(self.path) if self.path else self.spec.id


def resolve(spec: ModelSpec) -> Source:
    if spec.id.startswith("tiny:"):
        return Source(spec, _tiny_source(spec.id.removeprefix("tiny:"), spec.seed))
    if spec.id == GEMMA3_270M:
        from pipeline.gguf_source import gemma3_270m_source

        return Source(spec, gemma3_270m_source())
    local = Path(spec.id).expanduser()
    if local.is_dir():
        return Source(spec, local.resolve())
    return Source(spec, None)


def _tiny_source(variant: str, seed: int) -> Path:
    from pipeline.tiny import TINY_VERSION, build_tiny_source

    dest = cache_dir() / "tiny" / f"{variant}-seed{seed}-v{TINY_VERSION}"
    if (dest / "model.safetensors").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{variant}-", dir=dest.parent))
    build_tiny_source(variant, staging, seed=seed)
    try:
        staging.rename(dest)
    except OSError:  # built concurrently by another process: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def load_config(source: Source):
    """The source's config; for the known Gemma 4 Hub ids, the bundled copy when the Hub is out of reach
    (so plans of the shipped recipes work offline). An unreachable Hub costs one request (go_offline_if_unreachable)
    and one warning."""
    from transformers import AutoConfig

    went_offline = go_offline_if_unreachable(source.spec.id, source.spec.revision) if source.path is None else None
    try:
        config = AutoConfig.from_pretrained(source.ref, revision=source.spec.revision)
    except OSError:
        bundled = bundled_config_name(source.spec.id)
        if source.path is not None or bundled is None:
            if went_offline:
                log.warning(went_offline)
            raise
        from pipeline.tiny import full_config

        if went_offline or source.spec.id not in _BUNDLED_WARNED:
            log.warning("%s: %s; planning from the bundled copy of its config", source.spec.id,
                        went_offline or "the Hub is unreachable (offline mode)")
            _BUNDLED_WARNED.add(source.spec.id)
        return AutoConfig.for_model(**full_config(bundled))
    if went_offline:
        log.warning("%s; the config of %s comes from the local cache", went_offline, source.spec.id)
    return config


_BUNDLED_WARNED: set[str] = set()  # model ids planned from the bundled config, said once per process


def go_offline_if_unreachable(repo_id: str, revision: str | None = None, repo_type: str | None = None,
                               filename: str = "config.json") -> str | None:
    """One HEAD request for a file of the repo, without huggingface_hub's retries (hf_hub_download retries
    a failed connection five times with backoff, 23 s per file); if the Hub cannot be reached at all, offline
    mode for the rest of the process, so no later request waits either. Returns what to tell the user when it
    switched (None: the Hub answered, even with an error, or offline mode was already on)."""
    import httpx
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    if constants.is_offline_mode():
        return None
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, repo_type=repo_type, revision=revision))
    except httpx.TransportError as err:  # no answer: DNS, refused, timed out (an HTTP error status is an answer)
        go_offline()
        return (f"the Hub ({constants.ENDPOINT}) is unreachable ({type(err).__name__}: {clip(str(err), 120)}); "
                "offline for the rest of this run (HF_HUB_OFFLINE=1 skips this check)")
    except Exception:  # the Hub answered (gated, missing, ...): from_pretrained reports it as it does online
        return None
    return None


def go_offline() -> None:
    """huggingface_hub's offline mode, which transformers reads through huggingface_hub.is_offline_mode(), set
    for this process (datasets copies it when imported: set there too) and its children (vLLM, llama.cpp)."""
    import os
    import sys

    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    if (datasets_config := sys.modules.get("datasets.config")) is not None:
        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True


def source_and_config(spec: ModelSpec, recipe_path: str | Path):
    """The resolved source and its config, every failure a RecipeError naming the recipe's `model.id`:
    a folder that does not exist or holds no readable config.json, a Hub id that cannot be reached."""
    key = "model.id"
    if looks_local(spec.id):
        folder = Path(spec.id).expanduser()
        written = f"{shown(spec.id)}" + (f" ({folder})" if spec.id.startswith("~") else "")
        if problem := _folder_problem(folder):
            raise RecipeError(recipe_path, key, f"{written}{problem}")
    source = resolve(spec)
    try:
        return source, load_config(source)
    except (OSError, ValueError, KeyError) as err:
        where = "the checkpoint folder" if source.path else "the Hub (offline? HF_HUB_OFFLINE=1 is set, or no network)"
        raise RecipeError(recipe_path, key, f"the config of {shown(spec.id)}"
                          f"{f' at revision {shown(spec.revision)}' if spec.revision else ''} could not be loaded "
                          f"from {where}: {err.__class__.__name__}: {clip(str(err), 300)}") from None


def _folder_problem(folder: Path) -> str | None:
    """What keeps `folder` from being a checkpoint folder, said after its name (None: nothing)."""
    try:
        if not folder.is_dir():
            return ": no such folder" if not folder.exists() else " is a file; give the checkpoint folder (with config.json)"
        if not (folder / "config.json").is_file():
            return " has no config.json: not a checkpoint folder (config.json, the *.safetensors weights, the tokenizer)"
        json.loads((folder / "config.json").read_bytes())
    except OSError as err:
        return f": {err.strerror or err}"
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        return f"/config.json is not JSON: {clip(str(err), 200)}"
    return None


def bundled_config_name(model_id: str) -> str | None:
    """`google/gemma-4-E2B-it` -> `e2b` when a copy of that config ships with the package. Google's QAT
    checkpoints in BF16 (`-it-qat-q4_0-unquantized`) have their model's architecture."""
    from pipeline.tiny import VARIANTS

    stem = model_id.removeprefix("google/").removesuffix("-qat-q4_0-unquantized").removesuffix("-it")
    return next((variant for variant, name in VARIANTS.items() if name == stem), None)


def text_config(config):
    return config.get_text_config()


def is_multimodal(config) -> bool:
    return getattr(config, "vision_config", None) is not None or getattr(config, "audio_config", None) is not None


def model_class(config):
    """The Auto class users load this checkpoint with."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_multimodal(config) else AutoModelForCausalLM


def build_meta_model(config):
    """The model's module tree with no storage: enough to plan, nothing loaded."""
    import torch

    with torch.device("meta"):
        return model_class(config).from_config(config, dtype=torch.bfloat16)


def load_model(source: Source, config, device_map: str | None = None, dtype=None):
    import torch

    return model_class(config).from_pretrained(
        source.ref, revision=source.spec.revision, dtype=dtype or torch.bfloat16, device_map=device_map
    )


def sidecar_files(source: Source) -> list[Path]:
    """Tokenizer, processor, chat template and generation config files of the source: everything
    in the checkpoint folder that is not weights and not rewritten by the export."""
    folder = source.path
    if folder is None:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source.spec.id, revision=source.spec.revision,
                                        allow_patterns=SIDECAR_PATTERNS))
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)
        and p.name not in WEIGHT_INDEXES and p.name not in EXPORT_WRITES and not p.name.startswith(".")
    )
