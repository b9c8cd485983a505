"""The ignore list against the written weights: every module stored 16-bit named, no packed one."""

import json
import shutil

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.export import ExportIncomplete
from pipeline.index_check import index_ignore_problems, linear_like_modules
from pipeline.tensors import StoredTensors
from pipeline.plan import Plan
from pipeline.run import quantize_run


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    done = {}

    def export(variant: str):
        if variant not in done:
            root = tmp_path_factory.mktemp(variant)
            recipe = root / "recipe.yaml"
            recipe.write_text(f"model: tiny:{variant}\nscheme: W4A16\ngroup_size: 64\noutput_dir: {root / 'run'}\n")
            quantize_run(recipe, validate=False, card=False)
            done[variant] = root / "run"
        return done[variant]

    return export


def _ignore(folder):
    return json.loads((folder / "config.json").read_text())["quantization_config"]["ignore"]


@pytest.mark.parametrize("variant", ["e2b", "26b-a4b"])
def test_written_index_matches_the_ignore_list(exports, variant):
    run = exports(variant)
    folder, plan = run / "export", Plan.load(run / "plan.json")
    assert index_ignore_problems(folder, _ignore(folder)) == []
    headers = StoredTensors(folder).headers
    linear_like = linear_like_modules(folder)
    stored_16bit = {m for m in linear_like if f"{m}.weight_packed" not in headers
                    and any(k.startswith(m + ".") for k in headers)}
    # What the check looked at is what the plan keeps (minus the tied head, which is not stored).
    assert stored_16bit == {m.name for m in plan.modules if m.kind != "embedding" and not m.quantize and not m.tied_to}
    if variant == "e2b":
        assert any(".audio_tower." in m for m in stored_16bit) and any(".vision_tower." in m for m in stored_16bit)
    else:
        assert any(m.endswith(".experts") for m in stored_16bit)


@pytest.mark.parametrize("variant, dropped", [("e2b", "model.audio_tower.layers.1.self_attn.relative_k_proj"),
                                              ("26b-a4b", "model.language_model.layers.0.experts")])
def test_a_dropped_ignore_entry_is_named(exports, tmp_path, variant, dropped):
    folder = shutil.copytree(exports(variant) / "export", tmp_path / "export")
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["ignore"].remove(dropped)
    path.write_text(json.dumps(config))
    problems = index_ignore_problems(folder, _ignore(folder))
    stored = f"{dropped}.{'down_proj' if variant != 'e2b' else 'weight'}"
    assert problems == [f"{dropped} is stored unpacked ({stored}) but quantization_config.ignore does not name it"]


def test_an_ignore_pattern_that_covers_a_packed_module_is_named(exports):
    folder = exports("e2b") / "export"
    problems = index_ignore_problems(folder, _ignore(folder) + [r"re:.*\.layers\.4\.mlp\..*"])
    assert [p.split(" ")[0] for p in problems] == [f"model.language_model.layers.4.mlp.{n}_proj" for n in ("down", "gate", "up")]
    assert all(p.endswith(r"is stored packed but quantization_config.ignore names it (re:.*\.layers\.4\.mlp\..*)")
               for p in problems)


def test_export_fails_when_a_planned_module_is_written_unpacked(tmp_path, monkeypatch):
    """The plan check cannot see this (the plan says quantized, the ignore list agrees): only the
    written index shows a 16-bit weight vLLM would try to read as packed."""
    from pipeline.quantize.llmcompressor_backend import LLMCompressorBackend

    original_save = LLMCompressorBackend.save
    victim = "model.language_model.layers.2.self_attn.q_proj"

    def save_one_unpacked(self, model, folder, recipe):
        original_save(self, model, folder, recipe)
        path = folder / "model.safetensors"
        with safe_open(path, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        packed, scale = tensors.pop(f"{victim}.weight_packed"), tensors.pop(f"{victim}.weight_scale")
        shape = tensors.pop(f"{victim}.weight_shape").tolist()
        ints = unpack_from_int32(packed, 4, torch.Size(shape))
        tensors[f"{victim}.weight"] = (ints.reshape(shape[0], -1, 64) * scale.unsqueeze(-1)).reshape(shape).bfloat16()
        save_file(tensors, path, metadata={"format": "pt"})

    monkeypatch.setattr(LLMCompressorBackend, "save", save_one_unpacked)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: tiny:e2b\nscheme: W4A16\ngroup_size: 64\noutput_dir: {tmp_path / 'run'}\n")
    with pytest.raises(ExportIncomplete, match=rf"does not match the written weights \(1 problems\): {victim} is stored "
                                               rf"unpacked \({victim}.weight\) but quantization_config.ignore does not"):
        quantize_run(recipe, validate=False, card=False)
    assert not (tmp_path / "run" / "export").exists()
