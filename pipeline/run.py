"""A run: the stages of one recipe, their outputs in its run directory (pipeline/rundir.py), and a
manifest.

A run builds all of these in a candidate folder inside the run directory (`.candidate-*`) and moves
them into place only once the export is validated and carded: until then, and on any failure or
interruption, the previous export, its card and manifest stay as they were.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import drafter, text_only
from pipeline.calibration import CalibrationSet
from pipeline.compute import computing_in, torch_dtype
from pipeline.generate.ple_cache import write_hot_ids
from pipeline.memory import (OFFLOAD_MARKER, MemoryPlan, load_within, plan_memory, quantized_forward_per_layer,
                             resolve_budget)
from pipeline.model import Source, build_meta_model, load_config, model_class, source_and_config, text_config
from pipeline.plan import Plan, build_plan
from pipeline.recipe import (MemorySpec, Recipe, RecipeError, Setting, check_against_config, data_file_problems,
                             default_run_dir, load_recipe, resolve_recipe_path)
from pipeline.rundir import (CANDIDATE, DIGESTS, EXPORT, MANIFEST, MEMORY_PLAN, OFFLOAD, PLAN, PROMOTING, REJECTED,
                             RUN_FILES, RUN_MARK, ExportRecord, GGUFFile, Manifest, MemoryRecord, Modalities, PlanRecord, Projector,
                             Sizes, SourceRecord, library_versions, write_json_atomically)
from pipeline.records import QuantizeReport
from pipeline.reload import ReloadReport
from pipeline.runlock import LOCK, run_lock
from pipeline.runtimes.check import SERVE_SCRATCH
from pipeline.tables import quantize_tables

if TYPE_CHECKING:  # torch and the passes load with the first weight, not with the CLI
    import torch

    from pipeline.quantize.base import Backend, CalibrationData

log = logging.getLogger("pipeline")

class ReloadFailed(RuntimeError):
    pass


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        log.info("stage %s ...", name)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        log.info("stage %s done in %.1f s", name, self.seconds[name])


def make_plan(recipe: Recipe, recipe_path: str | Path, settings: tuple[Setting, ...] = ()) -> tuple[Source, object, Plan]:
    """Config only: resolve the source, validate the recipe against it, build the plan. `settings`: those
    given on the command line, named by the problems at their keys."""
    problems = data_file_problems(recipe)
    try:
        source, config = source_and_config(recipe.model, recipe_path)
        check_against_config(recipe, config, recipe_path)
        problems += drafter.recipe_problems(recipe, config, recipe_path)
    except RecipeError as err:
        problems = err.problems + problems
    try:
        RecipeError.collect(recipe_path, problems)
        if text_only.wanted(recipe):
            config = text_only.text_only_config(config)
        return source, config, build_plan(build_meta_model(config), config, recipe, recipe_path)
    except RecipeError as err:
        raise err.naming(settings) from None


def plan_run(recipe_ref: str | Path, run_dir: Path | None = None, settings: tuple[Setting, ...] = ()) -> Plan:
    recipe = load_recipe(recipe_ref, settings)
    recipe_path = resolve_recipe_path(recipe_ref)
    _, _, plan = make_plan(recipe, recipe_path, settings)
    run_dir = run_dir or default_run_dir(recipe, settings)
    check_run_dir(run_dir, recipe_path, plan)
    claim_run_dir(run_dir)
    plan.save(run_dir / PLAN)
    return plan


MAX_ENTRIES_SHOWN = 5


def check_owned(run_dir: Path, recipe_path: str | Path) -> None:
    """Refuse a folder that is neither missing, nor empty, nor a gemma-quant run's, naming a few of its entries:
    a run writes beside its own files only (`output_dir: /etc` must not get a plan.json)."""
    try:  # the lock file of a run that holds the folder is gemma-quant's (pipeline/runlock.py)
        entries = sorted(path.name for path in run_dir.iterdir() if path.name != LOCK)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise RecipeError(recipe_path, "output_dir", f"{run_dir} is a file; give a folder for the run") from None
    except OSError as err:
        raise RecipeError(recipe_path, "output_dir", f"{run_dir} cannot be read: {err.strerror or err}") from None
    if not entries or _ours(run_dir):
        return
    shown = ", ".join(entries[:MAX_ENTRIES_SHOWN]) + (f" and {len(entries) - MAX_ENTRIES_SHOWN} more"
                                                     if len(entries) > MAX_ENTRIES_SHOWN else "")
    raise RecipeError(recipe_path, "output_dir", f"{run_dir} holds {shown}, and no gemma-quant run: a run writes "
                      "only into a folder that does not exist, is empty, or holds a gemma-quant run; give another "
                      "output_dir or --run-dir")


def _ours(run_dir: Path) -> bool:
    """A folder a gemma-quant run took (its mark), or one that runs from before the mark made: with a manifest
    of ours, here or in rejected/, or a plan.json that is a plan of ours."""
    try:
        if json.loads((run_dir / RUN_MARK).read_text()).get("tool") == "gemma-quant":
            return True
    except (OSError, ValueError, AttributeError):
        pass
    if our_manifest(run_dir) is not None or our_manifest(run_dir / REJECTED) is not None:
        return True
    try:
        Plan.load(run_dir / PLAN)
    except (OSError, ValueError):
        return False
    return True


def claim_run_dir(run_dir: Path) -> None:
    """Make the run directory (checked by check_owned) and mark it as a gemma-quant run's, before anything else."""
    from pipeline import __version__

    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / RUN_MARK).is_file():
        write_json_atomically(run_dir / RUN_MARK, {"tool": "gemma-quant", "version": __version__,
                                                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def our_manifest(run_dir: Path) -> dict | None:
    """The run directory's manifest, if a gemma-quant run wrote it."""
    try:
        manifest = json.loads((run_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("tool", {}).get("name") == "gemma-quant" else None


def check_run_dir(run_dir: Path, recipe_path: str | Path, plan: Plan | None = None) -> None:
    """Refuse a run directory whose export/ or offload/ no gemma-quant run made (quantize replaces the one
    and removes the other: never what it did not create), and, given the plan about to be written, one
    whose export was made from another plan (validate and card would judge that export against this one).
    Before that, a folder that is not missing, empty or a gemma-quant run's is refused (check_owned)."""
    check_owned(run_dir, recipe_path)
    manifest = our_manifest(run_dir)
    if manifest is None:
        foreign = [f"{name}/" for name in (EXPORT, OFFLOAD) if (run_dir / name).exists()
                   and not (name == OFFLOAD and (run_dir / name / OFFLOAD_MARKER).is_file())]
        if foreign:
            raise RecipeError(recipe_path, "output_dir", f"{run_dir} holds {' and '.join(foreign)} that no gemma-quant "
                              "run wrote (no manifest.json of one beside it), which a run would replace or remove; "
                              "move it away, or give another output_dir or --run-dir")
        return
    if plan is not None and (run_dir / EXPORT).is_dir():
        try:
            written = Plan.load(run_dir / PLAN).model_dump()
        except (OSError, ValueError):
            written = None
        if written != plan.model_dump():
            raise RecipeError(recipe_path, "output_dir", f"{run_dir} holds the export of {manifest.get('recipe_file')}, "
                              "made with another plan; writing this plan there would make validate and card judge "
                              "that export against it: plan into another --run-dir or output_dir, or quantize there")


def quantize_run(recipe_ref: str | Path, run_dir: Path | None = None, reload_check: bool | None = None,
                 validate: bool = True, card: bool = True, memory: MemorySpec | None = None,
                 serve: bool = True, settings: tuple[Setting, ...] = ()) -> Manifest:
    """recipe → plan → load → quantize → export → reload check → manifest → validation → model card,
    all in a candidate folder, then moved into place at once. A candidate that fails validation (which
    raises ValidationFailed) gets its card too, saying so, and is kept in `rejected/`; the previous export
    stays. `memory` overrides the recipe's memory budgets (the CLI's flags); the memory plan is made in the
    plan stage, before any weight loads. `serve`: validation's serve check, where a runtime can run the export
    here (pipeline/runtimes/). `settings`: given on the command line, applied to the recipe file's keys and
    recorded in the manifest."""
    recipe_path = resolve_recipe_path(recipe_ref)
    recipe = load_recipe(recipe_path, settings)
    run_dir = run_dir or default_run_dir(recipe, settings)
    check_run_dir(run_dir, recipe_path)
    claim_run_dir(run_dir)
    started = datetime.now(timezone.utc)
    with run_lock(run_dir), _log_to(run_dir / "logs" / f"quantize-{started:%Y%m%dT%H%M%S}.log"):
        clear_interrupted(run_dir)
        candidate = Path(tempfile.mkdtemp(prefix=CANDIDATE, dir=run_dir))
        try:
            build_candidate(recipe, recipe_path, run_dir, candidate, started, reload_check, memory,
                            settings=settings)
            if validate:
                _validate_candidate(candidate, card, serve)
            elif card:
                from pipeline.card import write_card

                write_card(candidate, export_at=run_dir / EXPORT)
            manifest = Manifest.load(candidate)
            promote(candidate, run_dir)
            log.info("export ready: %s", run_dir / EXPORT)
        finally:
            shutil.rmtree(candidate, ignore_errors=True)
    return manifest


@dataclass
class Planned:
    """The plan stage's output: config only, no weight loaded."""
    source: Source
    config: object
    plan: Plan
    memory: MemoryPlan


@dataclass
class Loaded:
    """The load stage's output: the source model and what the later checks compare against."""
    model: object
    tokenizer: object
    probe: torch.Tensor | drafter.TargetStates  # input ids of the reload check; a drafter's: its target's states
    reference_logits: torch.Tensor  # the unquantized model's on the probe
    measuring: torch.dtype  # what every measuring forward computes in


@dataclass
class Quantized:
    backend: Backend
    report: QuantizeReport
    in_memory_logits: torch.Tensor  # the quantized model's on the probe, before export


@dataclass
class Exported:
    record: ExportRecord
    sizes: Sizes


def plan_stage(recipe: Recipe, recipe_path: Path, memory: MemorySpec | None, candidate: Path,
               settings: tuple[Setting, ...] = ()) -> Planned:
    source, config, plan = make_plan(recipe, recipe_path, settings)
    plan.save(candidate / PLAN)
    memory_plan = plan_memory(plan, recipe, text_config(config), *resolve_budget(recipe.memory, memory), recipe_path)
    log.info("memory plan:\n%s", memory_plan.render())
    write_json_atomically(candidate / MEMORY_PLAN, memory_plan.model_dump(mode="json"))
    return Planned(source, config, plan, memory_plan)


def load_stage(planned: Planned, recipe: Recipe, offload_dir: Path) -> Loaded:
    from transformers import AutoTokenizer

    from pipeline import reload as reloading

    model = (text_only.load_text_model(planned.source, planned.config) if text_only.wanted(recipe)
             else load_within(planned.memory, planned.source, planned.config, offload_dir))
    measuring = torch_dtype(planned.memory.compute_dtype)
    if drafter.is_drafter(planned.config):  # fed its target's states on the probe text, the target's tokens
        target, target_config = source_and_config(recipe.target, recipe.model.id)
        tokenizer = AutoTokenizer.from_pretrained(target.ref, revision=recipe.target.revision)
        probe = drafter.target_states(target, target_config, reloading.probe_input_ids(tokenizer), measuring)
    else:
        tokenizer = AutoTokenizer.from_pretrained(planned.source.ref, revision=recipe.model.revision)
        probe = reloading.probe_input_ids(tokenizer)
    with computing_in(model, measuring):
        reference = reloading.logits(model, probe)
    return Loaded(model, tokenizer, probe, reference, measuring)


def calibration_stage(recipe: Recipe, tokenizer, run_dir: Path) -> tuple[CalibrationData, CalibrationSet]:
    """The recipe's calibration windows, built once and kept in `run_dir`, where a rerun (or the next
    sweep policy) finds them."""
    from pipeline.calibration import load_or_build
    from pipeline.quantize.base import CalibrationData

    tokens, calibration_set = load_or_build(recipe.calibration, tokenizer, run_dir,
                                            f"{recipe.model.id}@{recipe.model.revision}")
    return CalibrationData(tokens, calibration_set.sha256, run_dir), calibration_set


def quantize_stage(loaded: Loaded, planned: Planned, recipe: Recipe, data: CalibrationData | None,
                   reference_model=None) -> Quantized:
    """The recipe's pass over the loaded model, in place; with `reference_model` (an unquantized copy),
    its report also holds the relative weight error per layer type."""
    from pipeline import reload as reloading
    from pipeline.quantize import get_backend
    from pipeline.quantize.grids import relative_weight_errors

    backend = get_backend(recipe, loaded.tokenizer, planned.memory)
    backend.quantize(loaded.model, planned.plan, recipe, data)
    quantize_tables(loaded.model, planned.plan)
    report = backend.report
    if reference_model is not None:
        report = report.model_copy(update={"weight_error": relative_weight_errors(loaded.model, reference_model,
                                                                                  planned.plan)})
    with (quantized_forward_per_layer(loaded.model) if planned.memory.host == "disk-offload" else nullcontext(),
          computing_in(loaded.model, loaded.measuring)):
        in_memory = reloading.logits(loaded.model, loaded.probe)
    return Quantized(backend, report, in_memory)


def export_stage(model, quantized: Quantized, planned: Planned, recipe: Recipe, candidate: Path,
                 data: CalibrationData | None = None, hot_tokens: torch.Tensor | None = None) -> Exported:
    """The quantized model as a complete export in `candidate/export`, and its per-tensor digests; with
    `hot_tokens` (an E-model's calibration tokens), the PLE cache's recorded hot set beside it."""
    from pipeline.export import file_checksums, folder_bytes, tensor_digests, write_export
    from pipeline.gguf_export import gguf_tensor_digests

    export = candidate / EXPORT
    export.mkdir()
    gguf, projector = [], None
    if recipe.export == "gguf":
        copied, (gguf, projector) = [], gguf_stage(model, planned, recipe, data, export, candidate)
        digests = gguf_tensor_digests(export)
    else:
        copied = write_export(model, quantized.backend, planned.source, recipe, planned.plan, export)
        digests = tensor_digests(export)
        if hot_tokens is not None:
            write_hot_ids(export, hot_tokens, recipe.calibration.mixture or "the recipe's calibration sources")
    write_json_atomically(candidate / DIGESTS, digests)
    record = ExportRecord(format=recipe.export, copied_from_source=copied, files=file_checksums(export),
                          tensor_digests_sha256=hashlib.sha256((candidate / DIGESTS).read_bytes()).hexdigest(),
                          gguf=gguf, projector=projector)
    weights = "*.gguf" if recipe.export == "gguf" else "*.safetensors"
    sizes = Sizes(source_bf16_bytes_estimate=planned.plan.bf16_bytes,
                  export_weights_bytes_estimate=planned.plan.export_bytes,
                  export_weights_bytes=folder_bytes(export, weights), export_bytes=folder_bytes(export))
    return Exported(record, sizes)


def gguf_stage(model, planned: Planned, recipe: Recipe, data: CalibrationData, export: Path,
               candidate: Path) -> tuple[list[GGUFFile], Projector | None]:
    """`export: gguf`: the GGUF files (pipeline/gguf_export.py) from the source's own weights and this run's
    integers, and the towers' projector file where the build keeps them."""
    from pipeline.gguf_export import write_gguf, write_projector
    from pipeline.model import is_multimodal
    from pipeline.validate import source_weights_dir

    work = Path(tempfile.mkdtemp(prefix=".gguf-", dir=candidate))
    source_dir = source_weights_dir(planned.source)
    try:
        files = write_gguf(model, planned.plan, recipe, source_dir, export, data.tokens[: recipe.gguf.imatrix_samples],
                           work, rename=text_only.source_key if text_only.wanted(recipe) else None)
        towers = not text_only.wanted(recipe) and is_multimodal(planned.config)
        return files, write_projector(source_dir, export, recipe, work) if towers else None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def reload_stage(export: Path, planned: Planned, recipe: Recipe, probe: torch.Tensor, reference_logits: torch.Tensor,
                 in_memory_logits: torch.Tensor, measuring: torch.dtype) -> ReloadReport:
    """The written export loaded as users load it; its probe logits against the unquantized model's and
    the in-memory quantized model's. Needs only the saved export and the two saved logit tensors."""
    from pipeline import reload as reloading
    from pipeline.formats import export_format

    report = reloading.reload_check(export, model_class(planned.config), probe, reference_logits, in_memory_logits,
                                    export_format(recipe.export), measuring)
    if report.problems:
        raise ReloadFailed("the export does not reload correctly: " + "; ".join(report.problems))
    return report


def build_candidate(recipe: Recipe, recipe_path: Path, run_dir: Path, candidate: Path, started: datetime,
                    reload_check: bool | None = None, memory: MemorySpec | None = None,
                    reference_model=None, settings: tuple[Setting, ...] = ()) -> Manifest:
    """Plan, load, quantize, export and reload-check into `candidate`, its manifest last. Calibration
    tokens and block checkpoints go to `run_dir`, where a rerun finds them. `reference_model`: see
    quantize_stage. `settings`: those given on the command line, which `recipe` has applied."""
    timer = Timer()
    with timer.stage("plan"):
        planned = plan_stage(recipe, recipe_path, memory, candidate, settings)
    offload_dir = run_dir / OFFLOAD
    with timer.stage("load"):
        loaded = load_stage(planned, recipe, offload_dir)
    data, calibration_set, hot_tokens = None, None, None
    if recipe.calibrated:
        with timer.stage("calibration"):
            data, calibration_set = calibration_stage(recipe, loaded.tokenizer, run_dir)
    if any(m.table == "per_layer" for m in planned.plan.modules) and recipe.export != "gguf":
        # the PLE cache's static hot set: the calibration text's most frequent ids (llama.cpp maps the table itself)
        hot_tokens = data.tokens if data else calibration_stage(recipe, loaded.tokenizer, run_dir)[0].tokens
    try:
        with timer.stage("quantize"):
            quantized = quantize_stage(loaded, planned, recipe, data, reference_model)
        with timer.stage("export"):
            exported = export_stage(loaded.model, quantized, planned, recipe, candidate, data, hot_tokens)
        loaded.model = None  # the export is the model from here on
        report = None
        # a GGUF is not a transformers checkpoint: validation loads it in llama.cpp
        if (recipe.reload_check if reload_check is None else reload_check) and recipe.export != "gguf":
            with timer.stage("reload_check"):
                report = reload_stage(candidate / EXPORT, planned, recipe, loaded.probe, loaded.reference_logits,
                                      quantized.in_memory_logits, loaded.measuring)
    finally:
        shutil.rmtree(offload_dir, ignore_errors=True)
    manifest = Manifest(
        status="exported", created=started.isoformat(timespec="seconds"), recipe_file=str(recipe_path),
        recipe_sha256=hashlib.sha256(recipe_path.read_bytes()).hexdigest(), recipe=recipe,
        settings=[setting.text for setting in settings],
        source=SourceRecord(id=recipe.model.id, path=str(planned.source.path) if planned.source.path else None,
                            revision=recipe.model.revision),
        algorithm=recipe.algorithm, library=recipe.runs_on, calibration=calibration_set,
        quantize_report=quantized.report, versions=library_versions(), timings_s=timer.seconds,
        plan=PlanRecord(**planned.plan.counts()), sizes=exported.sizes, export=exported.record, reload=report,
        modalities=Modalities(kept=recipe.modalities,
                              dropped_params=text_only.dropped_towers(load_config(planned.source))
                              if text_only.wanted(recipe) else {}),
        memory=MemoryRecord(mode=planned.memory.mode, host=planned.memory.host, gpu=planned.memory.gpu,
                            needs=planned.memory.needs, chain_batch=planned.memory.chain_batch),
    )
    manifest.save(candidate)
    return manifest


def _validate_candidate(candidate: Path, card: bool, serve: bool = True) -> None:
    """Validate the candidate and write its card. One that fails is carded too (the card says so) and kept
    in `rejected/`; the previous export stays in place."""
    from pipeline.export import replace_atomically
    from pipeline.validate import ValidationFailed, validate_run

    timer, failed = Timer(), None
    with timer.stage("validate"):
        try:
            validate_run(candidate, serve, logs_dir=candidate.parent / "logs")
        except ValidationFailed as err:
            failed = err
    manifest = Manifest.load(candidate)
    manifest.timings_s.update(timer.seconds)
    manifest.save(candidate)
    run_dir = candidate.parent
    if card:
        from pipeline.card import write_card

        write_card(candidate, export_at=(run_dir / REJECTED if failed else run_dir) / EXPORT)
    if failed is not None:
        replace_atomically(candidate, run_dir / REJECTED)
        log.error("validation failed: this run's export, card and eval are in %s; %s", run_dir / REJECTED,
                  "the previous export is left as it was" if (run_dir / EXPORT).is_dir() else "no export is in place")
        raise failed


def clear_interrupted(run_dir: Path) -> None:
    """What a killed run left in `run_dir`: a promotion cut short is finished (its candidate was validated
    and carded), a half-swapped export restored, its candidate and validation's logit scratch removed;
    each named in the log."""
    from pipeline.export import restore_interrupted_swap

    if (run_dir / PROMOTING).is_file():
        log.info("finishing the promotion of %s, cut short by an interrupted run",
                 json.loads((run_dir / PROMOTING).read_text())["candidate"])
        finish_promotion(run_dir)
    for folder in (run_dir / EXPORT, run_dir / REJECTED):
        if restore_interrupted_swap(folder):
            log.info("restored %s, set aside by an interrupted run", folder)
    patterns = (f"{CANDIDATE}*", ".eval-*", f"{SERVE_SCRATCH}*", ".*-old-*", f".{EXPORT}-staging-*", ".*.tmp")
    for stale in sorted(p for pattern in patterns for p in run_dir.glob(pattern)):
        log.info("removing %s, left by an interrupted run", stale.name)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def promote(candidate: Path, run_dir: Path) -> None:
    """The finished candidate into place: export/ swapped by renames, then the run's files, the manifest
    last; a file of the previous run that this one did not write (eval.json of a run not validated) goes.
    The moves are written down first, so a run killed among them is finished by the next one instead of
    leaving a new export beside the previous manifest."""
    moves = [name for name in (EXPORT, *RUN_FILES, MANIFEST) if (candidate / name).exists()]
    write_json_atomically(run_dir / PROMOTING, {"candidate": candidate.name, "moves": moves})
    finish_promotion(run_dir)


def finish_promotion(run_dir: Path) -> None:
    """Every move of the promotion written down in PROMOTING that is not done yet (each one is a rename,
    done once: what the candidate no longer holds was moved)."""
    from pipeline.export import replace_atomically

    promoting = json.loads((run_dir / PROMOTING).read_text())
    candidate, moves = run_dir / promoting["candidate"], promoting["moves"]
    for name in moves:
        if not (candidate / name).exists():
            continue
        if name == EXPORT:
            replace_atomically(candidate / EXPORT, run_dir / EXPORT)
        else:
            os.replace(candidate / name, run_dir / name)
    for name in RUN_FILES:
        if name not in moves:
            (run_dir / name).unlink(missing_ok=True)
    (run_dir / PROMOTING).unlink()


@contextmanager
def _log_to(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    # The run's log has its stages whatever the caller's logging level (a library caller's is WARNING).
    level = log.level
    log.setLevel(min(log.getEffectiveLevel(), logging.INFO))
    kept = "the previous export, card and manifest are left as they were"
    try:
        yield
    except KeyboardInterrupt:  # into the log file; the CLI says it on the console, in one line
        handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "interrupted; %s", (kept,), None))
        raise
    except BaseException as err:
        log.error("run failed (%s: %s); %s", type(err).__name__, err, kept)
        handler.stream.write(traceback.format_exc())  # the traceback in the log file, not on the console
        raise
    finally:
        log.setLevel(level)
        root.removeHandler(handler)
        handler.close()
