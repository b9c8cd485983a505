"""Memory budgets: the memory plan (made before any weight loads), refusal, and sequential execution."""

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.memory import MemoryBudgetError, plan_memory
from pipeline.recipe import MemorySpec, RecipeError, load_recipe, parse_bytes
from pipeline.run import MEMORY_PLAN, make_plan, quantize_run

MIB = 2**20


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def _memory_plan(recipe_path, cpu_budget=10**12):
    recipe = load_recipe(recipe_path)
    _, config, plan = make_plan(recipe, recipe_path)
    return plan, plan_memory(plan, recipe, config.get_text_config(), cpu_budget, [], {"cpu": "recipe", "gpu": "none"},
                             recipe_path)


def test_memory_block_sizes_and_errors(write_recipe):
    assert parse_bytes("20GiB") == 20 * 2**30 and parse_bytes("1.5 GB") == 1_500_000_000 and parse_bytes(4096) == 4096
    assert load_recipe(write_recipe(model="tiny:31b", scheme="W8A16",
                                    memory={"max_cpu_memory": "512MiB"})).memory.max_cpu_memory == 512 * MIB
    with pytest.raises(RecipeError, match=r"memory\.max_gpu_memory: got '20 furlongs'; write a size like 20GiB"):
        load_recipe(write_recipe(model="tiny:31b", scheme="W8A16", memory={"max_gpu_memory": "20 furlongs"}))
    with pytest.raises(RecipeError, match=r"memory\.max_ram: unknown key; allowed keys here: max_cpu_memory"):
        load_recipe(write_recipe(model="tiny:31b", scheme="W8A16", memory={"max_ram": "1GiB"}))


def test_memory_plan_numbers_are_the_plans(write_recipe):
    plan, memory = _memory_plan(write_recipe(model="tiny:e2b", scheme="W4A16"))
    by_layer = {}
    for m in plan.modules:
        if m.layer is not None:
            by_layer[m.layer] = by_layer.get(m.layer, 0) + m.bf16_bytes
    assert memory.layer_bytes == by_layer and len(by_layer) == 10
    assert memory.model_bf16_bytes == plan.bf16_bytes == memory.non_layer_bytes + sum(by_layer.values())
    assert memory.largest_layer_bytes == max(by_layer.values()) == by_layer[memory.largest_layer]
    assert memory.largest_layer_export_bytes == max(plan.layer_bytes(export=True).values())
    # all-at-once holds every layer and builds the whole export beside them, sequential one layer and its export
    others = sum(by_layer.values()) - memory.largest_layer_bytes
    assert memory.needs["all_at_once_host"] - memory.needs["sequential_host"] == \
        others + plan.export_bytes - memory.largest_layer_export_bytes
    assert memory.mode == "all-at-once" and memory.host == "resident"


def test_budget_between_modes_chooses_sequential_and_too_small_is_refused(write_recipe):
    path = write_recipe(model="tiny:31b", scheme="W4A16")
    _, roomy = _memory_plan(path)
    between = (roomy.needs["sequential_host"] + roomy.needs["all_at_once_host"]) // 2
    _, memory = _memory_plan(path, between)
    assert (memory.mode, memory.host) == ("sequential", "disk-offload")
    with pytest.raises(MemoryBudgetError) as err:
        _memory_plan(path, roomy.needs["sequential_host"] - 1)
    assert err.value.key == "memory.max_cpu_memory" and "a budget of at least" in str(err.value)
    # the block driver cannot run disk-offloaded: between the needs is too small for it, and it says why
    tuned = write_recipe("tuned", model="tiny:31b", scheme="W4A16", algorithm="gptq")
    _, tuned_roomy = _memory_plan(tuned)
    with pytest.raises(MemoryBudgetError, match="only RTN through llmcompressor exported as compressed-tensors"):
        _memory_plan(tuned, tuned_roomy.needs["all_at_once_host"] - 1)


def test_chain_batches_fill_the_gpu_headroom_and_stay_single_on_a_cpu(write_recipe):
    """On a GPU the chains run as many samples per forward as the device's headroom holds, beside the block
    driver's state, which the GPU needs count where the blocks run; on a CPU one sample per forward."""
    from pipeline.memory import sample_forward_bytes

    path = write_recipe(model="tiny:31b", scheme="W4A16", algorithm="gptq", calibration={"samples": 64, "seq_len": 64})
    recipe = load_recipe(path)
    _, config, plan = make_plan(recipe, path)
    text = config.get_text_config()

    def gpu_plan(budgets, cpu=10**12):
        return plan_memory(plan, recipe, text, cpu, budgets, {"cpu": "recipe", "gpu": "recipe"}, path)

    assert _memory_plan(path)[1].chain_batch == 1
    roomy = gpu_plan([10**12])
    assert roomy.gpu == "whole-model" and roomy.chain_batch == 64  # every sample in one forward
    assert roomy.needs["all_at_once_gpu"] == (plan.bf16_bytes + roomy.activation_bytes + roomy.solver_state_bytes
                                              + roomy.calibration_state_bytes)
    per_sample = sample_forward_bytes(recipe, text)
    for extra in (0, 5):  # headroom for the counted activations and `extra` samples more
        budget = roomy.needs["all_at_once_gpu"] + extra * per_sample + per_sample // 2
        fitted = gpu_plan([budget])
        assert fitted.chain_batch == (roomy.activation_bytes + extra * per_sample + per_sample // 2) // per_sample
        assert fitted.chain_batch * per_sample <= budget - fitted.needs["all_at_once_gpu"] + fitted.activation_bytes
    # two GPUs: the headroom is shared between them
    assert gpu_plan([roomy.needs["all_at_once_gpu"] // 2 + 4 * per_sample + per_sample // 2] * 2).chain_batch == \
        (roomy.activation_bytes + 4 * per_sample + per_sample // 2) // per_sample
    # a GPU below the whole model onloads layers: one layer's recorded inputs and the chains go with it
    one_layer = gpu_plan([roomy.needs["sequential_gpu"] + 3 * per_sample])
    assert one_layer.gpu == "per-layer" and one_layer.chain_batch == (roomy.activation_bytes + 3 * per_sample) // per_sample
    assert roomy.needs["sequential_gpu"] > roomy.non_layer_bytes + roomy.largest_layer_bytes \
        + roomy.largest_layer_export_bytes + roomy.activation_bytes + roomy.solver_state_bytes


def test_solver_state_is_what_gptq_allocates_for_its_heaviest_block(write_recipe, monkeypatch, tmp_path):
    """GPTQ holds one float32 Hessian per quantized module of the block; with MoE experts every expert
    has its own (each sees every token). The memory plan counts them from the plan: measured here."""
    from llmcompressor.modifiers.gptq import helpers

    from pipeline import calibration
    from pipeline.model import load_config, load_model, resolve
    from pipeline.quantize import blockwise
    from transformers import AutoTokenizer

    path = write_recipe(model="tiny:26b-a4b", scheme="W4A16", group_size=64, algorithm="gptq", quantize_experts=True,
                        export="gptq", calibration={"samples": 2, "seq_len": 32},
                        gptq={"grid": "minmax"})  # the Hessians alone: the scale search's transient is below
    plan, memory = _memory_plan(path)
    allocated, block = {}, [None]
    make_empty = helpers.make_empty_hessian

    def counted(module, *args, **kwargs):
        hessian = make_empty(module, *args, **kwargs)
        allocated[block[0]] = allocated.get(block[0], 0) + hessian.numel() * hessian.element_size()
        return hessian

    solve = blockwise.BLOCK_SOLVERS["gptq"]

    def solve_counted(layer, targets, index, *args):
        block[0] = index
        return solve(layer, targets, index, *args)

    monkeypatch.setattr(helpers, "make_empty_hessian", counted)
    monkeypatch.setitem(blockwise.BLOCK_SOLVERS, "gptq", solve_counted)
    recipe = load_recipe(path)
    source = resolve(recipe.model)
    config = load_config(source)
    tokens, _ = calibration.build(recipe.calibration, AutoTokenizer.from_pretrained(source.path))
    blockwise.quantize_blockwise(load_model(source, config), plan, recipe, tokens, tmp_path, "sha")
    experts = sum(1 for m in plan.quantized if m.layer == 0 and m.component == "moe_experts")
    assert experts == 3 * config.get_text_config().num_experts
    assert memory.solver_state_bytes == max(allocated.values()) > 0
    assert "solver state of one block" in memory.render()


def test_too_small_budget_refused_before_any_weight_loads(write_recipe, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    loads = []
    monkeypatch.setattr("pipeline.run.load_within", lambda *args: loads.append(args))
    path = write_recipe(model="tiny:31b", scheme="W4A16", memory={"max_cpu_memory": "1MiB"})
    with pytest.raises(MemoryBudgetError) as err:
        quantize_run(path, validate=False, card=False)
    message = str(err.value)
    assert message.startswith(f"{path}: memory.max_cpu_memory: the host budget 1.00 MiB (recipe) cannot hold this run")
    assert "all-at-once needs" in message and "sequential" in message and "would fit" in message
    assert loads == []
    stages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage ")]
    assert stages == ["stage plan ..."]  # refused inside the plan stage: it never finished, load never began
    # the CLI flag overrides the recipe's budget and is named as the budget's origin
    from pipeline.cli import main

    assert main(["quantize", str(path), "--max-cpu-memory", "2MiB", "--no-validate", "--no-card"]) == 2
    assert main(["quantize", str(path), "--max-cpu-memory", "lots"]) == 2
    assert loads == []


def test_sequential_export_is_bit_identical_to_all_at_once(write_recipe, monkeypatch):
    # A disk-offloaded run measures in BF16 (its layers are onloaded as stored); the resident one measures
    # in BF16 too where the CPU computes BF16, as here: the two runs' measurements are then comparable.
    monkeypatch.setattr("pipeline.compute.cpu_computes_bf16", lambda: True)
    windows = {"samples": 2, "seq_len": 64, "max_new_tokens": 4}
    all_path = write_recipe("all", model="tiny:31b", scheme="W4A16", eval=windows)
    _, roomy = _memory_plan(all_path)
    between = (roomy.needs["sequential_host"] + roomy.needs["all_at_once_host"]) // 2
    seq_path = write_recipe("seq", model="tiny:31b", scheme="W4A16", eval=windows)
    all_manifest = quantize_run(all_path, card=False)
    seq_manifest = quantize_run(seq_path, card=False, memory=MemorySpec(max_cpu_memory=between))
    assert all_manifest.memory.mode == "all-at-once"
    assert json.loads((all_path.parent / "runs" / "all" / MEMORY_PLAN).read_text())["compute_dtype"] == "bfloat16"
    assert (seq_manifest.memory.mode, seq_manifest.memory.host) == ("sequential", "disk-offload")
    seq_run = seq_path.parent / "runs" / "seq"
    assert json.loads((seq_run / MEMORY_PLAN).read_text())["budget_source"]["cpu"] == "cli"
    assert not (seq_run / "offload").exists()  # the disk offload is removed with the run
    reference, sequential = _stored(all_path.parent / "runs" / "all" / "export"), _stored(seq_run / "export")
    assert reference.keys() == sequential.keys()
    assert any(k.endswith("weight_packed") for k in reference)
    for key, tensor in reference.items():
        assert tensor.dtype == sequential[key].dtype and torch.equal(tensor, sequential[key]), key
    assert seq_manifest.reload.missing_keys == seq_manifest.reload.unexpected_keys == []
    assert seq_manifest.reload.vs_unquantized == all_manifest.reload.vs_unquantized
    # the offloaded in-memory model computes what the export holds, as the resident one does
    assert seq_manifest.reload.vs_in_memory == all_manifest.reload.vs_in_memory
    assert seq_manifest.reload.vs_in_memory.max_abs_diff == 0.0
    # validation loads its reference within the run's memory plan (disk-offloaded here: no room to widen it to
    # float32, so only the bf16 figure) and measures what the resident run measures as served
    reports = {run: json.loads((all_path.parent / "runs" / run / "eval.json").read_text()) for run in ("all", "seq")}
    assert reports["seq"]["served"] is None and reports["seq"]["quality"]["dtype"] == "bfloat16"
    assert reports["seq"]["quality"] == reports["all"]["served"] and reports["seq"]["quality"]["kl_mean"] > 0


SEARCH_PEAK = textwrap.dedent("""
    import sys, torch
    from pipeline.overrides import WeightScheme
    from pipeline.quantize.blockwise import searched_qparams
    def peak_rss():  # VmHWM, as PEAK_RSS below reads it
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    rows, cols, group, chunk = map(int, sys.argv[1:])
    scheme = WeightScheme(bits=4, group_size=group, symmetric=True)
    searched_qparams(torch.randn(256, 256).bfloat16(), scheme, torch.rand(256))  # imports, allocator
    weight, importance = torch.randn(rows, cols).bfloat16(), torch.rand(cols)
    before = peak_rss()
    searched_qparams(weight, scheme, importance, chunk or None)
    print((peak_rss() - before) / (weight.numel() * 2))
""")


@pytest.mark.parametrize("rows, cols, group", [(8192, 2048, 32), (2048, 8192, 128)])
def test_the_scale_search_holds_no_more_than_the_memory_plan_counts(write_recipe, rows, cols, group):
    """auto-round's optimized-RTN search, which opt-rtn and GPTQ's imatrix grid run module by module, measured
    in a process of its own against the factor the memory plan counts: on a GPU's chunk (here the whole
    2^24-weight module), and in the CPU's chunks, which hold less than the module's own bytes."""
    from pipeline.algorithms import SEARCH_CHUNK_ELEMENTS
    from pipeline.memory import SCALE_SEARCH_FACTOR

    def held(chunk: int) -> float:
        done = subprocess.run([sys.executable, "-c", SEARCH_PEAK, str(rows), str(cols), str(group), str(chunk)],
                              capture_output=True, text=True, check=True)
        return float(done.stdout)

    assert rows * cols == SEARCH_CHUNK_ELEMENTS["gpu"]
    assert 0.7 * SCALE_SEARCH_FACTOR < held(rows * cols) <= SCALE_SEARCH_FACTOR
    assert held(0) < 1
    path = write_recipe(model="tiny:e2b", scheme="W4A16", algorithm="opt-rtn")
    plan, memory = _memory_plan(path)
    largest = max(m.bf16_bytes for m in plan.quantized if m.layer is not None)
    assert memory.solver_state_bytes > SCALE_SEARCH_FACTOR * min(largest, 2 * SEARCH_CHUNK_ELEMENTS["cpu"])


PEAK_RSS = textwrap.dedent("""
    import json, sys
    def peak_rss():
        # VmHWM: this process image's peak RSS. ru_maxrss would not do: Linux carries it over fork and
        # exec, so a child of a big parent reports the parent's peak.
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    from pipeline.recipe import MemorySpec
    from pipeline.run import quantize_run
    budget = int(sys.argv[2]) if len(sys.argv) > 2 else None
    manifest = quantize_run(sys.argv[1], validate=False, card=False, reload_check=False,
                            memory=MemorySpec(max_cpu_memory=budget))
    print(json.dumps({"mode": manifest.memory.mode,
                      "peak_rss": peak_rss()}))
""")


@pytest.mark.slow
def test_sequential_peak_rss_is_lower(write_recipe, tmp_path, tiny_cache):
    """Peak RSS (VmHWM) of two processes (torch's CPU tensors are invisible to tracemalloc) on a tiny 31B-shaped
    model widened to ~340 MB BF16, so the difference stands well above the libraries' own ~0.5 GB."""
    from pipeline.tiny import build_tiny_source

    source = build_tiny_source("31b", tmp_path / "wide-31b", text_hidden=1536)
    all_path = write_recipe("wide-all", model=str(source), scheme="W4A16")
    seq_path = write_recipe("wide-seq", model=str(source), scheme="W4A16")
    _, roomy = _memory_plan(all_path)
    budget = roomy.needs["sequential_host"] + roomy.largest_layer_bytes  # room for about two layers
    script = tmp_path / "peak.py"
    script.write_text(PEAK_RSS)

    def peak(*args) -> dict:
        done = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                              check=True, env={**__import__("os").environ, "PYTHONPATH": str(Path.cwd())})
        return json.loads(done.stdout.strip().splitlines()[-1])

    whole, sequential = peak(all_path), peak(seq_path, budget)
    assert (whole["mode"], sequential["mode"]) == ("all-at-once", "sequential")
    saved = whole["peak_rss"] - sequential["peak_rss"]
    assert saved > 0.25 * roomy.model_bf16_bytes, (whole, sequential, roomy.model_bf16_bytes)


def test_block_driver_layer_onloading_and_device_map_paths_give_the_same_grids(tmp_path):
    """The GPU code paths run here on the one device there is: per-layer onloading (onload=cpu moves
    every layer and its state in turn) and accelerate's device map (`spread` over a {"cpu": budget}, the
    call that spreads the model over several GPUs). Both must give exactly the grids of the plain run."""
    from transformers import AutoTokenizer

    from pipeline import calibration
    from pipeline.model import build_meta_model, load_config, load_model, resolve
    from pipeline.plan import build_plan
    from pipeline.quantize.blockwise import quantize_blockwise
    from pipeline.quantize.blockwise_backend import gather, spread
    from pipeline.recipe import parse_recipe

    recipe = parse_recipe({"name": "t", "model": "tiny:e2b", "scheme": "W4A16", "algorithm": "gptq",
                           "calibration": {"samples": 2, "seq_len": 32}})
    source = resolve(recipe.model)
    config = load_config(source)
    plan = build_plan(build_meta_model(config), config, recipe)
    tokens, _ = calibration.build(recipe.calibration, AutoTokenizer.from_pretrained(source.path))

    def grids(label, **kwargs):
        model = load_model(source, config)
        if label == "spread":
            device_map = spread(model, {"cpu": 10 * plan.bf16_bytes})
            assert set(device_map.values()) == {"cpu"}
        result = quantize_blockwise(model, plan, recipe, tokens, tmp_path / label, "sha", **kwargs)
        if label == "spread":
            gather(model)
        return result.grids

    plain, onloaded, spread_grids = grids("plain"), grids("onload", onload=torch.device("cpu")), grids("spread")
    assert plain.keys() == onloaded.keys() == spread_grids.keys() and len(plain) == len(plan.quantized)
    for name, grid in plain.items():
        for other in (onloaded[name], spread_grids[name]):
            assert torch.equal(grid.weight, other.weight) and torch.equal(grid.scale, other.scale), name
            assert other.weight.device.type == "cpu"


def test_plan_verb_prints_the_memory_plan_or_refuses(write_recipe, capsys):
    from pipeline.cli import main

    path = write_recipe(model="tiny:31b", scheme="W4A16")
    assert main(["plan", str(path), "--max-cpu-memory", "10MiB"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: sequential (host disk-offload" in out and "budget: host (cli)" in out
    assert main(["plan", str(path), "--max-cpu-memory", "1MiB"]) == 2
    assert "--max-cpu-memory: memory.max_cpu_memory: the host budget 1.00 MiB (cli)" in capsys.readouterr().out
