"""The memory plan: how the quantize run will hold the model within its memory budget, decided from
the plan (config only) before any weight is loaded.

Two modes:
- all-at-once: the whole BF16 model is resident in host RAM (and, for the calibrated block driver
  when a GPU is present, on the GPUs, over several through accelerate's device map).
- sequential: only the non-layer parts and about one decoder layer are resident at a time. On the
  host, layers that do not fit are offloaded to disk (transformers/accelerate `device_map` +
  `offload_folder`, converted to compressed-tensors' offload, which llmcompressor onloads module by
  module). On the GPU, the block driver onloads one decoder layer at a time and keeps its
  per-layer state in host RAM.

The numbers are estimates of tensor bytes (the plan's exact BF16/export sizes plus activation and
calibration-state estimates), not of the Python process: libraries and allocator overhead come on top.
"""

from __future__ import annotations

import io
import logging
import shutil
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from pipeline.algorithms import ALGORITHMS, BLOCK_ERROR_SAMPLES, SEARCH_CHUNK_ELEMENTS
from pipeline.allocator import return_freed_memory
from pipeline.compute import ComputeDtype, host_compute_dtype
from pipeline.plan import Plan
from pipeline.recipe import MemorySpec, Recipe, RecipeError
from pipeline.tables import stage_bytes as table_stage_bytes

log = logging.getLogger(__name__)

OFFLOAD_MARKER = ".gemma-quant-offload"



def disk_offload_supported(recipe: Recipe) -> bool:
    """llmcompressor's RTN runs on compressed-tensors' offload and saves compressed-tensors from it.
    auto-round's RTN and the block driver set `module.weight.data`, which an offloaded module drops,
    the packed exports (gptq, auto-round, MoE experts) read every weight in memory, and text-only
    builds load through their own key mapping."""
    return recipe.quant_pass.disk_offload and recipe.export == "compressed-tensors" and recipe.modalities == "all"


class MemoryBudgetError(RecipeError):
    """The budget cannot hold even the sequential mode; raised in the plan stage, before any weight loads."""


class MemoryPlan(BaseModel):
    mode: Literal["all-at-once", "sequential"]
    host: Literal["resident", "disk-offload"]
    gpu: Literal["none", "whole-model", "per-layer"]
    cpu_budget_bytes: int
    gpu_budget_bytes: list[int]  # per visible GPU
    budget_source: dict[str, str]  # where each budget came from: recipe, cli or free memory
    model_bf16_bytes: int
    non_layer_bytes: int  # embeddings, towers, lm_head, norms: resident in every mode
    layer_bytes: dict[int, int]  # per decoder layer, BF16
    largest_layer: int
    largest_layer_bytes: int
    largest_layer_export_bytes: int  # its quantized copy, held beside it while it is quantized
    activation_bytes: int  # one forward of the probe or one calibration batch
    chain_batch: int = 1  # calibration samples per forward of the block driver's chains
    calibration_state_bytes: int  # the block driver's recorded layer inputs and two chains
    solver_state_bytes: int = 0  # what the calibrated algorithm holds for the block it solves
    table_stage_bytes: int = 0  # the quantized token tables' stage, on the host (pipeline/tables.py)
    needs: dict[str, int]  # cpu/gpu need of each mode
    # Validation measures the quantization error in float32 (and as served, in bf16) only where this holds.
    float32_fits: bool
    compute_dtype: ComputeDtype  # what the probe, reload-check and generation forwards compute in

    def table(self):
        from rich.table import Table

        table = Table(title=f"memory plan: {self.mode} (host {self.host}, GPU {self.gpu})")
        table.add_column("part")
        table.add_column("bytes", justify="right")
        rows = [("whole model, BF16", self.model_bf16_bytes), ("non-layer parts (always resident)", self.non_layer_bytes),
                (f"largest decoder layer ({self.largest_layer}) of {len(self.layer_bytes)}", self.largest_layer_bytes),
                ("its quantized copy", self.largest_layer_export_bytes),
                (f"activations (chains: {self.chain_batch} sample{'s' if self.chain_batch > 1 else ''} a forward)",
                 self.activation_bytes),
                ("calibration state (the block driver's chains and recorded inputs)", self.calibration_state_bytes),
                ("solver state of one block", self.solver_state_bytes),
                ("token tables: untied head, packing (host)", self.table_stage_bytes)]
        rows += [(f"need: {name.replace('_', ' ')}", value) for name, value in self.needs.items()]
        if self.float32_fits:
            rows.append(("the model in float32, measured (validation; "
                         f"{'every check: this CPU has no bf16 instructions' if self.compute_dtype == 'float32' else 'the quantization error'})",
                         2 * self.model_bf16_bytes))
        rows.append((f"budget: host ({self.budget_source['cpu']})", self.cpu_budget_bytes))
        rows += [(f"budget: GPU {i} ({self.budget_source['gpu']})", b) for i, b in enumerate(self.gpu_budget_bytes)]
        for name, value in rows:
            table.add_row(name, human(value))
        return table

    def render(self) -> str:
        from rich.console import Console

        out = io.StringIO()
        Console(file=out, width=100).print(self.table())
        return out.getvalue()


def human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def resolve_budget(spec: MemorySpec, overrides: MemorySpec | None = None) -> tuple[int, list[int], dict[str, str]]:
    """Host and per-GPU budgets: the CLI's over the recipe's over what the machine has free now."""
    import psutil
    import torch

    overrides = overrides or MemorySpec()
    source = {}

    def pick(key: str, free):
        for origin, value in (("cli", getattr(overrides, key)), ("recipe", getattr(spec, key))):
            if value is not None:
                source[key.split("_")[1]] = origin
                return value
        source[key.split("_")[1]] = "free memory"
        return free()

    cpu = pick("max_cpu_memory", lambda: psutil.virtual_memory().available)
    gpus = [pick("max_gpu_memory", lambda i=i: torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())]
    source.setdefault("gpu", "none visible")
    return cpu, gpus, source


def _widths(fields: dict) -> tuple[int, int]:
    """The hidden size and the widest MLP intermediate (dense or expert, doubled where the MLP is)."""
    intermediate = max(fields.get("intermediate_size") or 0, fields.get("moe_intermediate_size") or 0)
    return fields["hidden_size"], intermediate * 2 if fields.get("use_double_wide_mlp") else intermediate


def sample_forward_bytes(recipe: Recipe, text_config) -> int:
    """FP32 activations of one calibration sample through one block: hidden states, MLP intermediate,
    attention scores."""
    fields = text_config.to_dict()  # per-layer attributes refuse a global read; the dict has them all
    (hidden, intermediate), seq = _widths(fields), recipe.calibration.seq_len
    return seq * (4 * hidden + 2 * intermediate) * 4 + fields["num_attention_heads"] * seq * seq * 4


def activation_bytes(recipe: Recipe, text_config) -> int:
    """FP32 activations of one forward: the probe's logits (every run), or one calibration sample
    through one block with its gradients (a chain batch of more samples is sized into what is left:
    `chain_batch_size`)."""
    from pipeline.reload import PROBE_SEQUENCES, PROBE_TOKENS

    fields = text_config.to_dict()
    (hidden, intermediate), vocab = _widths(fields), fields["vocab_size"]
    probe = PROBE_SEQUENCES * PROBE_TOKENS
    need = probe * (vocab * 3 + 4 * hidden + 2 * intermediate) * 4
    if recipe.calibrated:
        # AutoRound/GPTQ keep the block's inputs, outputs and gradients; AutoRound of its picked batches at once
        joined = min(recipe.autoround.batch_size, recipe.calibration.samples) if recipe.algorithm == "autoround" else 1
        need = max(need, 3 * sample_forward_bytes(recipe, text_config) * joined)
    return need


def calibration_state_bytes(recipe: Recipe, text_config) -> tuple[int, int]:
    """The block driver's state: both chains' hidden states (the unquantized one on every sample only
    for AutoRound), and the recorded layer inputs of every layer (PLE slices, rotary tables, masks)."""
    if not recipe.calibrated:
        return 0, 0
    samples, seq = recipe.calibration.samples, recipe.calibration.seq_len
    fields = text_config.to_dict()  # head_dim may vary per layer: the config refuses a global read
    layers = fields["num_hidden_layers"]
    ple = fields.get("hidden_size_per_layer_input") or 0
    head = max(fields.get("head_dim") or 0, fields.get("global_head_dim") or 0)
    reference = samples if ALGORITHMS[recipe.algorithm].fits_block_outputs else min(samples, BLOCK_ERROR_SAMPLES)
    chains = (samples + reference) * seq * fields["hidden_size"] * 2
    # each layer's own PLE slice; the rotary tables and masks are one tensor per layer type, shared
    recorded = samples * (layers * seq * ple * 2 + 2 * (seq * head * 2 * 4 + seq * seq))
    return chains, recorded


def chain_batch_size(recipe: Recipe, text_config, activations: int, free: int) -> int:
    """Calibration samples per chain forward on a GPU: as many as the activations already counted and the
    device's headroom hold, so a block's chains are a few wide forwards instead of one per sample."""
    per_sample = sample_forward_bytes(recipe, text_config)
    return max(1, min(recipe.calibration.samples, (activations + max(free, 0)) // per_sample))


# auto-round's quant_tensor_opt_rtn_sym, which the scale search runs, holds up to this many times the BF16
# bytes of the weights it is given at once (measured 12.3-13.4x on 2k-8k x 2k-8k weights at g32-g128;
# tests/test_memory.py); the block driver gives it row chunks (pipeline/algorithms.py SEARCH_CHUNK_ELEMENTS).
SCALE_SEARCH_FACTOR = 14


def solver_state_bytes(plan: Plan, recipe: Recipe, on_gpu: bool = False) -> int:
    """What the calibrated algorithm holds while it solves one block, beyond the block's weights and
    activations, for the heaviest block (each algorithm's `solver_bytes`, pipeline/algorithms.py; for
    MoE GPTQ one Hessian per expert: every expert sees every token, 128 x ~65 MB on 26B-A4B), and the
    scale search's transient for its largest module (in chunks, `on_gpu` or not) where the pass searches
    its scales."""
    solver_bytes = recipe.algorithm_spec.solver_bytes
    if solver_bytes is None:
        return 0
    per_layer: dict[int, int] = defaultdict(int)
    searched: dict[int, int] = defaultdict(int)  # the search runs module by module: its largest module
    for m in plan.quantized:
        if m.layer is not None:
            per_layer[m.layer] += solver_bytes(m.shape, m.bf16_bytes)
            if recipe.searches_scales:
                chunk = min(m.bf16_bytes, 2 * SEARCH_CHUNK_ELEMENTS["gpu" if on_gpu else "cpu"])
                searched[m.layer] = max(searched[m.layer], SCALE_SEARCH_FACTOR * chunk)
    return max((held + searched[layer] for layer, held in per_layer.items()), default=0)


def plan_memory(plan: Plan, recipe: Recipe, text_config, cpu_budget: int, gpu_budgets: list[int],
                budget_source: dict[str, str], recipe_path: str | Path = "<recipe>") -> MemoryPlan:
    """Choose the mode that fits (all-at-once first), or raise MemoryBudgetError naming the budget,
    the need and what would fit."""
    layers = plan.layer_bytes()
    if not layers:
        raise ValueError("the plan has no decoder layers")
    largest = max(layers, key=layers.get)
    largest_export = max(plan.layer_bytes(export=True).values())
    non_layer = plan.bf16_bytes - sum(layers.values())
    act = activation_bytes(recipe, text_config)
    chains, recorded = calibration_state_bytes(recipe, text_config)
    state = chains + recorded
    on_gpu = bool(gpu_budgets)
    solver = solver_state_bytes(plan, recipe, on_gpu)
    one_layer = layers[largest] + largest_export
    working = act + solver  # where the blocks are solved: the GPU when there is one, else the host
    tables = table_stage_bytes(plan)  # after the pass, on the host: at most its working set or this
    host_working = max(0 if on_gpu else working, tables)
    # All at once, the export is built whole beside the model (the compressor's state dict, the packed or
    # GGUF tensors): measured on the 270M (benchmarks/RESULTS.md, the memory plan against measured peaks).
    needs = {
        "all_at_once_host": plan.bf16_bytes + plan.export_bytes + state + host_working,
        "sequential_host": non_layer + one_layer + state + host_working,
    }
    if on_gpu:  # the block driver's state where its blocks run: all of it, or one layer's onloaded with its block
        layer_count = len(layers)
        needs["all_at_once_gpu"] = plan.bf16_bytes + working + state
        needs["sequential_gpu"] = non_layer + one_layer + working + chains + recorded // layer_count
    fields = dict(cpu_budget_bytes=cpu_budget, gpu_budget_bytes=gpu_budgets, budget_source=budget_source,
                  model_bf16_bytes=plan.bf16_bytes, non_layer_bytes=non_layer, layer_bytes=layers,
                  largest_layer=largest, largest_layer_bytes=layers[largest],
                  largest_layer_export_bytes=largest_export, activation_bytes=act,
                  calibration_state_bytes=state, solver_state_bytes=solver, table_stage_bytes=tables, needs=needs)

    if state + act > cpu_budget and recipe.calibrated:  # the data alone cannot fit: say which key is too large
        c = recipe.calibration
        too_large = "calibration.samples" if state >= act else "calibration.seq_len"
        raise MemoryBudgetError(
            recipe_path, too_large, f"{c.samples:,} samples of {c.seq_len:,} tokens need {human(state + act)} for "
            f"the calibration state and activations alone, more than the host budget {human(cpu_budget)} "
            f"({budget_source['cpu']}); the shipped recipes use 128-512 samples of 512-2048 tokens")
    if needs["all_at_once_host"] <= cpu_budget:
        host = "resident"
    elif needs["sequential_host"] <= cpu_budget and disk_offload_supported(recipe):
        host = "disk-offload"
    else:
        offload = disk_offload_supported(recipe)
        fits = needs["sequential_host"] if offload else needs["all_at_once_host"]
        raise MemoryBudgetError(
            _budget_origin(recipe_path, budget_source["cpu"], "--max-cpu-memory"), "memory.max_cpu_memory",
            f"the host budget {human(cpu_budget)} ({budget_source['cpu']}) cannot hold this run: all-at-once needs "
            f"{human(needs['all_at_once_host'])}, sequential (one decoder layer resident, the rest offloaded to disk) "
            f"needs {human(needs['sequential_host'])}"
            + ("" if offload else f", but only RTN through llmcompressor exported as compressed-tensors runs "
                                  f"disk-offloaded (this recipe: {recipe.algorithm} on {recipe.runs_on}, "
                                  f"export {recipe.export})")
            + f"; a budget of at least {human(fits)} would fit")

    gpu = "none"
    if on_gpu:
        if needs["all_at_once_gpu"] <= sum(gpu_budgets) and recipe.quant_pass.spreads_over_gpus:
            gpu = "whole-model"  # spread over the GPUs by accelerate's device map
        elif needs["sequential_gpu"] <= max(gpu_budgets):
            gpu = "per-layer"  # llmcompressor's RTN always onloads module by module to the GPU
        else:
            raise MemoryBudgetError(
                _budget_origin(recipe_path, budget_source["gpu"], "--max-gpu-memory"), "memory.max_gpu_memory",
                f"the GPU budget {human(max(gpu_budgets))} per GPU ({budget_source['gpu']}) cannot hold one decoder "
                f"layer: sequential needs {human(needs['sequential_gpu'])} on one GPU "
                f"(all-at-once {human(needs['all_at_once_gpu'])} over all); a budget of at least "
                f"{human(needs['sequential_gpu'])} would fit")
    # On a CPU one sample per forward: wider chain batches measured no faster there (benchmarks/RESULTS.md).
    chain_batch = 1
    if recipe.calibrated and gpu == "whole-model":  # the headroom spread over the GPUs, as accelerate spreads the layers
        chain_batch = chain_batch_size(recipe, text_config, act, (sum(gpu_budgets) - needs["all_at_once_gpu"])
                                       // len(gpu_budgets))
    elif recipe.calibrated and gpu == "per-layer":  # layers onload to the first GPU
        chain_batch = chain_batch_size(recipe, text_config, act, gpu_budgets[0] - needs["sequential_gpu"])
    mode = "all-at-once" if host == "resident" and gpu in ("none", "whole-model") else "sequential"
    float32_fits = fits_float32(host, gpu, needs, plan, cpu_budget, gpu_budgets)
    return MemoryPlan(mode=mode, host=host, gpu=gpu, float32_fits=float32_fits, chain_batch=chain_batch,
                      compute_dtype=measuring_dtype(gpu, float32_fits), **fields)


def fits_float32(host: str, gpu: str, needs: dict[str, int], plan: Plan, cpu_budget: int,
                 gpu_budgets: list[int]) -> bool:
    """Whether a measuring forward can widen the whole model to float32 (twice its BF16 bytes) beside what
    the run holds: the model resident on the host (validation reloads the export there) and, when the run
    puts the whole model on the GPUs, there too."""
    on_host = host == "resident" and needs["all_at_once_host"] + plan.bf16_bytes <= cpu_budget
    if gpu == "whole-model":
        return on_host and needs["all_at_once_gpu"] + plan.bf16_bytes <= sum(gpu_budgets)
    return on_host


def measuring_dtype(gpu: str, float32_fits: bool) -> ComputeDtype:
    """What the probe and reload-check forwards compute in: float32 on a CPU that emulates bf16
    (pipeline/compute.py) when the model fits in float32; bf16 on a GPU, on a CPU with bf16 instructions,
    or when it does not fit."""
    if gpu != "none" or host_compute_dtype() == "bfloat16":
        return "bfloat16"
    return "float32" if float32_fits else "bfloat16"


def _budget_origin(recipe_path, origin: str, flag: str) -> str:
    return flag if origin == "cli" else str(recipe_path)


def device_map(meta_model, memory: MemoryPlan) -> dict[str, int | str]:
    """accelerate's device map within the budgets: GPUs first (each its own budget) when the whole model
    goes on them, then host RAM, then disk. Decoder layers are never split. On a CPU-only machine the
    same call places what fits in host RAM and sends the rest to disk."""
    from accelerate import infer_auto_device_map

    max_memory: dict[int | str, int] = {}
    if memory.gpu == "whole-model":
        max_memory.update(enumerate(memory.gpu_budget_bytes))
    # Host room for weights: the budget less what the run holds beside them.
    max_memory["cpu"] = max(memory.cpu_budget_bytes - (memory.needs["sequential_host"] - memory.non_layer_bytes
                                                       - memory.largest_layer_bytes), 0)
    return infer_auto_device_map(meta_model, max_memory=max_memory, dtype="bfloat16",
                                 no_split_module_classes=list(getattr(meta_model, "_no_split_modules", None) or []))


def load_within(memory: MemoryPlan, source, config, offload_dir: Path, dtype=None):
    """The source model loaded as the memory plan says: fully in host RAM (in `dtype`, BF16 by default),
    or with the layers that do not fit offloaded to disk (compressed-tensors' offload, which llmcompressor
    onloads per module; always BF16, as the plan counts it)."""
    import torch

    from pipeline.model import build_meta_model, load_model, model_class

    if memory.host == "resident":
        return load_model(source, config, dtype=dtype)
    from compressed_tensors.offload import load_offloaded_model

    return_freed_memory()

    placement = device_map(build_meta_model(config), memory)
    on_disk = sorted(name for name, where in placement.items() if where == "disk")
    log.info("sequential: %d of %d modules offloaded to %s", len(on_disk), len(placement), offload_dir)
    shutil.rmtree(offload_dir, ignore_errors=True)  # left by an interrupted run
    offload_dir.mkdir(parents=True)
    (offload_dir / OFFLOAD_MARKER).touch()  # a later run may remove this folder: it made it
    cls = model_class(config)
    with load_offloaded_model(cls):
        return cls.from_pretrained(source.ref, revision=source.spec.revision, dtype=torch.bfloat16,
                                   device_map=placement, offload_folder=str(offload_dir))


@contextmanager
def quantized_forward_per_layer(model):
    """Forwards of a disk-offloaded, quantized model that compute what the export holds.

    compressed-tensors' quantized forward fake-quantizes the onloaded weight in place for the call, then
    reads `self.weight` again: a disk-offloaded module onloads a fresh, unquantized copy there, so its
    output skips quantization (measured: every disk-offloaded Linear computed with BF16 weights). Inside
    `disable_offloading` a weight onloads once; entered per decoder layer, one layer stays resident."""
    from compressed_tensors.offload import disable_offloading

    from pipeline.quantize.blockwise import decoder_layers

    _, layers = decoder_layers(model)
    stack = ExitStack()

    def enter(module, args) -> None:
        stack.enter_context(disable_offloading())

    def leave(module, args, output) -> None:
        stack.close()

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(enter),
                                                layer.register_forward_hook(leave))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        stack.close()
