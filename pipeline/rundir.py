"""The run directory: the names of its files and its one manifest, typed.

runs/<recipe>/
  plan.json       every module's fate and the size estimate
  export/         the complete, reloadable checkpoint (replaced atomically)
  manifest.json   resolved recipe, source, versions, timings, sizes, reload numbers (`Manifest`)
  eval.json/.md   validation's measurements and verdict
  runtime_reference.safetensors  transformers' log-probs on validation's windows, which the serve check compares with
  rejected/       the last run that failed validation: its export, card, eval and manifest
  logs/           one log per stage invocation
  .gemma-quant-run.json  says a gemma-quant run owns the folder (a run writes into no other non-empty folder)

Every stage reads and writes the run through this module: quantize writes the manifest, validate adds
its verdict, card its card record, publish its commits. None of them imports the orchestrator (run.py).
"""

from __future__ import annotations

import json
import os
import platform
from importlib.metadata import version
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline import __version__
from pipeline.calibration import CalibrationSet
from pipeline.recipe import Recipe
from pipeline.records import Quality, QuantizeReport, Serving
from pipeline.reload import ReloadReport

EXPORT = "export"
PLAN = "plan.json"
MANIFEST = "manifest.json"
DIGESTS = "export_digests.json"  # per-tensor sha256 of the export as written
MEMORY_PLAN = "memory_plan.json"
EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"
RUNTIME_REFERENCE = "runtime_reference.safetensors"  # transformers' log-probs on validation's windows (serve check)
OFFLOAD = "offload"  # disk-offloaded weights of a sequential run, removed when the run ends
REJECTED = "rejected"  # the last candidate that failed validation, kept for inspection
CANDIDATE = ".candidate-"  # prefix of the folder a run builds in
RUN_FILES = (PLAN, MEMORY_PLAN, DIGESTS, EVAL_JSON, EVAL_MD, RUNTIME_REFERENCE)  # a run's files beside export/ and the manifest
PROMOTING = ".promoting.json"  # a promotion under way: the candidate and the files it moves
# Written first into a run directory a verb takes (plan, quantize, sweep): a later run knows the folder for one
# of gemma-quant's even before a plan or manifest is in it (a first run that failed leaves neither).
RUN_MARK = ".gemma-quant-run.json"

Status = Literal["exported", "validated", "failed_validation"]


class ManifestError(ValueError):
    """manifest.json is not one this gemma-quant wrote (edited, truncated, or from another version)."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Tool(_Record):
    name: Literal["gemma-quant"] = "gemma-quant"
    version: str = __version__


class SourceRecord(_Record):
    id: str
    path: str | None  # a local folder (or the project cache's converted GGUF); None for a Hub id
    revision: str | None


class PlanRecord(_Record):
    file: str = PLAN
    linear: int
    quantized: int
    kept: int


class Sizes(_Record):
    source_bf16_bytes_estimate: int
    export_weights_bytes_estimate: int
    export_weights_bytes: int
    export_bytes: int


class FileSum(_Record):
    bytes: int
    sha256: str


class GGUFFile(_Record):
    """One file of an `export: gguf` run (pipeline/gguf_export.py)."""
    type: str  # the GGUF type llama.cpp wrote (Q4_0, Q4_K_M, ...)
    label: str  # the type, or e.g. GPTQ-Q4_0 where the file carries this run's integers
    name: str  # file name in the export
    calibrated: bool  # this run's integers and scales, not llama.cpp's own rounding


class Projector(_Record):
    """The vision/audio projector GGUF (`mmproj-…`) of an `export: gguf` run that keeps the towers."""
    name: str | None  # file name in the export; None: not written (`why_not`)
    why_not: str | None = None


class ExportRecord(_Record):
    """What the pipeline wrote: validate judges the export against this record."""
    dir: str = EXPORT
    format: str
    copied_from_source: list[str]
    tensor_digests: str = DIGESTS
    tensor_digests_sha256: str
    files: dict[str, FileSum]
    gguf: list[GGUFFile] = []  # export: gguf
    projector: Projector | None = None  # export: gguf keeping the towers


class Modalities(_Record):
    kept: Literal["all", "text"]
    dropped_params: dict[str, int]


class MemoryRecord(_Record):
    file: str = MEMORY_PLAN
    mode: Literal["all-at-once", "sequential"]
    host: Literal["resident", "disk-offload"]
    gpu: Literal["none", "whole-model", "per-layer"]
    needs: dict[str, int]
    chain_batch: int = 1  # calibration samples per forward of the block driver's chains


class ValidationRecord(_Record):
    passed: bool
    report: str = EVAL_JSON
    failures: list[str]
    quality: Quality | None  # as eval.json holds it
    conversations: Quality | None = None  # on eval.conversations, as eval.json holds it
    serving: Serving | None = None  # as eval.json holds it
    export_files: dict[str, FileSum]  # the export as validation checksummed it


class CardRecord(_Record):
    file: str
    repo_id: str | None
    bytes: int
    sha256: str
    written: str


class Published(_Record):
    repo_id: str
    revision: str
    url: str
    commit_oid: str | None
    commit_url: str | None
    uploaded: list[str]
    deleted: list[str]
    up_to_date: bool
    forced_past: list[str]
    time: str


class Manifest(_Record):
    tool: Tool = Tool()
    status: Status
    created: str
    recipe_file: str
    recipe_sha256: str
    recipe: Recipe  # as run: the file with `settings` applied
    settings: list[str] = []  # given on the command line (`group_size=128`, `--model ./x`), in order
    source: SourceRecord
    algorithm: str
    library: str  # what the algorithm ran on (pipeline/algorithms.py)
    calibration: CalibrationSet | None
    quantize_report: QuantizeReport
    versions: dict[str, str]
    timings_s: dict[str, float]
    plan: PlanRecord
    sizes: Sizes
    export: ExportRecord
    reload: ReloadReport | None
    modalities: Modalities
    memory: MemoryRecord
    validation: ValidationRecord | None = None
    card: CardRecord | None = None
    published: list[Published] = []

    @classmethod
    def load(cls, run_dir: Path) -> Manifest:
        path = Path(run_dir) / MANIFEST
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(map(str, first["loc"])) or "the file"
            raise ManifestError(f"{path} is not a manifest this gemma-quant wrote ({err.error_count()} problem(s); "
                                f"{where}: {first['msg']}): re-run `gemma-quant quantize`") from None

    def save(self, run_dir: Path) -> None:
        write_json_atomically(Path(run_dir) / MANIFEST, self.model_dump(mode="json"))


def write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def library_versions() -> dict[str, str]:
    names = ("torch", "transformers", "llmcompressor", "compressed-tensors", "auto-round", "accelerate", "llama-cpp-python")
    found = {"python": platform.python_version(), "gemma-quant": __version__}
    for name in names:
        try:
            found[name] = version(name)
        except Exception:
            continue
    return found
