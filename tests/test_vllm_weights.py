"""vLLM's view of every Gemma 4 export: vLLM's own model class built from the export's config and every
parameter filled by vLLM's own loader from the export's tensors (vLLM's `enable_weights_track` check),
byte for byte what the export stores (fused projections: the shards in vLLM's order), with the
quantization method the plan chose. Multimodal exports through the text-only view the serve check gives
vLLM (its multimodal Gemma 4 classes import torchvision, which has no build beside the CPU torch here);
the 12B as a text-only build (vLLM's `Gemma4ForCausalLM` does not skip the 12B's `vision_embedder`)."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from pipeline.model import resolve
from pipeline.plan import Plan
from pipeline.recipe import ModelSpec
from pipeline.run import quantize_run
from pipeline.rundir import PLAN
from pipeline.runtimes.base import Target
from pipeline.runtimes.vllm import servable_folder
from pipeline.tensors import StoredTensors

from conftest import vllm_load

pytestmark = pytest.mark.slow

# vLLM fuses these projections into one layer: its parameter is the shards stacked along the rows
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
EXPERTS = {"w13_weight": "gate_up_proj", "w2_weight": "down_proj"}  # vLLM's fused MoE names, transformers' tensors


def _export(tmp_path, variant: str, extra: str = "") -> tuple:
    recipe = tmp_path / f"{variant}.yaml"
    recipe.write_text(f"model: tiny:{variant}\nscheme: W4A16\ngroup_size: 32\noutput_dir: {tmp_path / 'run'}\n{extra}")
    quantize_run(recipe, validate=False, card=False)
    plan = Plan.load(tmp_path / "run" / PLAN)  # the plan the run quantized by
    export = tmp_path / "run" / "export"
    target = Target(export, None, json.loads((export / "config.json").read_text()), None)
    folder, _ = servable_folder(target, tmp_path / "work")
    return plan, export, folder


def _loaded(folder) -> dict:
    done = vllm_load(folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1].removeprefix("RESULT "))


def _stored_as_vllm_holds_it(stored: StoredTensors, name: str) -> list[str]:
    """The export's tensors behind vLLM parameter `name`, in the order vLLM stacks them; none for what a
    checkpoint does not carry (the KV-cache scales vLLM defaults) and the shape records vLLM derives."""
    keys = set(stored.headers)
    prefix = "model.language_model." if any(k.startswith("model.language_model.") for k in keys) else "model."
    module, _, leaf = name.removeprefix("model.").rpartition(".")
    module = prefix + module
    if module.endswith(".attn") or leaf == "weight_shape":
        return []
    owner, _, last = module.rpartition(".")
    if last in FUSED:
        shards = [f"{owner}.{p}.{leaf}" for p in FUSED[last]]
        if last == "qkv_proj" and shards[2] not in keys:
            # k_eq_v full-attention layers (V is K: vLLM loads K's weight into V's rows); KV-shared layers: q only
            shards = [shards[0], shards[1], shards[1]] if shards[1] in keys else [shards[0]]
        return shards
    if last == "routed_experts":
        return [f"{owner}.{EXPERTS[leaf]}"]
    return [f"{module}.{leaf}"]


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("variant, extra", [
    ("e2b", ""), ("e4b", ""), ("31b", ""),
    ("26b-a4b", "quantize_experts: false\n"),  # int4 experts: vLLM-CPU has no WNA16 MoE method to build them
    ("12b", "modalities: text\n"),
], ids=["e2b", "e4b", "31b", "26b-a4b-experts-bf16", "12b-text"])
def test_vllm_loads_every_weight_of_the_export_as_stored(tmp_path, variant, extra):
    plan, export, folder = _export(tmp_path, variant, extra)
    loaded = _loaded(folder)
    stored = StoredTensors(export)
    used, mismatched = set(), []
    for name, got in loaded.items():
        keys = _stored_as_vllm_holds_it(stored, name)
        if not keys or (got["method"] == "buffer" and not set(keys) <= set(stored.headers)):
            continue  # nothing stored for it: vLLM's defaults, its own buffers (rotary tables)
        used |= set(keys)
        expected = torch.cat([stored.get(k) for k in keys])
        if (got["dtype"], got["shape"], got["sha256"]) != (str(expected.dtype).removeprefix("torch."),
                                                           list(expected.shape), _digest(expected)):
            mismatched.append(f"{name}: vLLM {got['dtype']} {got['shape']}, export {expected.dtype} {list(expected.shape)}")
    assert not mismatched, mismatched[:5]
    text = {k for k in stored.headers if not k.endswith(".weight_shape") and not k.startswith(
        ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio."))}
    assert text - used == set()  # every text tensor of the export is in one of vLLM's parameters

    # The plan's choice is vLLM's: every quantized Linear in a layer vLLM computes as int4, every kept one not
    methods = {name.rpartition(".")[0]: v["method"] for name, v in loaded.items()}
    packed = {m for m, method in methods.items() if method == "CompressedTensorsLinearMethod"}
    kept_linears = {m for m, method in methods.items() if method == "UnquantizedLinearMethod"}
    fused_into = {part: fused for fused, parts in FUSED.items() for part in parts}

    def vllm_module(name: str) -> str:  # KV-shared layers have q_proj alone: vLLM keeps it unfused
        owner, _, last = ("model." + name.removeprefix("model.").removeprefix("language_model.")).rpartition(".")
        return f"{owner}.{last}" if f"{owner}.{last}" in methods else f"{owner}.{fused_into.get(last, last)}"

    text = [m for m in plan.modules if m.kind == "linear" and m.name != "lm_head"  # tied: the token table
            and m.component not in ("vision", "audio", "projector")]
    assert {vllm_module(m.name) for m in text if m.quantize} == packed
    assert {vllm_module(m.name) for m in text if not m.quantize} == kept_linears
    if variant == "26b-a4b":
        assert {v["method"] for n, v in loaded.items() if ".experts." in n} == {"UnquantizedFusedMoEMethod"}


def test_bf16_experts_ignored_by_a_pattern_that_spells_out_the_prefix_fail_in_vllm(tmp_path):
    """vLLM renames its modules and maps exact ignore entries, not patterns: a per-expert pattern written with
    transformers' prefix never matches, and vLLM reads the BF16 experts as int4 (on this CPU build: no MoE
    method for them; on a GPU: packed weights the checkpoint lacks). The plan's prefix-free pattern loads."""
    _, export, folder = _export(tmp_path, "26b-a4b", "quantize_experts: false\n")
    config = json.loads((export / "config.json").read_text())
    ignore = config["quantization_config"]["ignore"]
    spelt = [e.replace("re:^(.*\\.)?layers\\.", "re:^model\\.language_model\\.layers\\.") for e in ignore]
    assert spelt != ignore
    config["quantization_config"]["ignore"] = spelt
    view = folder / "config.json"
    view_config = json.loads(view.read_text())
    view_config["quantization_config"] = config["quantization_config"]
    view.write_text(json.dumps(view_config))
    done = vllm_load(folder)
    assert done.returncode != 0 and "No WNA16 MoE backend supports the deployment configuration" in done.stderr


def _drafter_export(tmp_path, recipe: str = "tiny-e2b-assistant-w4a16") -> Path:
    quantize_run(recipe, tmp_path / "drafter", validate=False, card=False)
    return tmp_path / "drafter" / "export"


def _target_view(tmp_path) -> Path:
    """tiny E2B as vLLM-CPU can build it: the text-only view of a text-only export (its multimodal class imports
    torchvision)."""
    recipe = tmp_path / "target.yaml"
    recipe.write_text(f"model: tiny:e2b\nscheme: W4A16\nmodalities: text\noutput_dir: {tmp_path / 'target'}\n")
    quantize_run(recipe, validate=False, card=False)
    export = tmp_path / "target" / "export"
    folder, _ = servable_folder(Target(export, None, json.loads((export / "config.json").read_text()), None),
                                tmp_path / "work")
    return folder


def test_vllm_loads_drafters_beside_their_target_as_gemma4_mtp(tmp_path):
    """vLLM builds the drafter as `gemma4_mtp` under `draft_model.` and fills every parameter from the export
    (enable_weights_track), byte for byte; it computes as int4 exactly the decoder linears the plan quantized and
    keeps pre/post_projection, which the plan names in `ignore` by patterns that match vLLM's prefix. Without the
    patterns, vLLM asks about `draft_model.pre_projection`, which no exact entry names: it builds the BF16
    projections as int4 and refuses the checkpoint's unpacked weights. The BF16 drafter as published loads too."""
    drafter, target = _drafter_export(tmp_path), _target_view(tmp_path)
    plan = Plan.load(tmp_path / "drafter" / PLAN)
    done = vllm_load(target, draft=drafter)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
    stored = StoredTensors(drafter)
    used, mismatched = set(), []
    for name, got in loaded.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight_shape" or ".attn." in name or got["method"] == "buffer" and name not in stored.headers:
            continue
        owner, _, last = module.rpartition(".")
        checkpoint = module.removeprefix("model.") if last in ("pre_projection", "post_projection") else module
        keys = ([f"{owner}.{p}.{leaf}" for p in FUSED[last]] if last in FUSED else [f"{checkpoint}.{leaf}"])
        used |= set(keys)
        expected = torch.cat([stored.get(k) for k in keys])
        if (got["shape"], got["sha256"]) != (list(expected.shape), _digest(expected)):
            mismatched.append(name)
    assert not mismatched, mismatched[:5]
    assert {k for k in stored.headers if not k.endswith(".weight_shape")} - used == set()
    methods = {name.rpartition(".")[0]: v["method"] for name, v in loaded.items()}
    packed = {m for m, method in methods.items() if method == "CompressedTensorsLinearMethod"}
    fused_into = {part: fused for fused, parts in FUSED.items() for part in parts}

    def vllm_module(name: str) -> str:  # every drafter layer is KV-shared: q_proj alone, unfused
        owner, _, last = name.rpartition(".")
        return name if name in methods else f"{owner}.{fused_into.get(last, last)}"

    assert packed == {vllm_module(m.name) for m in plan.modules if m.quantize}
    assert methods["model.pre_projection"] == methods["model.post_projection"] == "UnquantizedLinearMethod"

    # The default beside a quantized target: the BF16 drafter as published (the card's `assistant:`), every
    # parameter filled, nothing computed as int4
    bf16 = vllm_load(target, draft=resolve(ModelSpec(id="tiny:e2b-assistant")).path)
    assert bf16.returncode == 0, bf16.stderr[-3000:]
    methods = {v["method"] for v in json.loads(bf16.stdout.strip().splitlines()[-1].removeprefix("RESULT ")).values()}
    assert "UnquantizedLinearMethod" in methods and "CompressedTensorsLinearMethod" not in methods

    config = json.loads((drafter / "config.json").read_text())
    config["quantization_config"]["ignore"] = [e for e in config["quantization_config"]["ignore"]
                                               if not e.startswith("re:")]
    (drafter / "config.json").write_text(json.dumps(config))
    done = vllm_load(target, draft=drafter)
    assert done.returncode != 0
    assert re.search(r"There is no module or parameter named 'model\.(pre|post)_projection\.weight' in Gemma4MTP\. "
                     r"The available parameters .* are: \{[^}]*weight_packed", done.stderr)
