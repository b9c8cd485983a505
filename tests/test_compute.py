"""The measuring dtype: float32 where the CPU emulates bf16 and the model fits, BF16 elsewhere; widening
for a measurement gives back the stored tensors bit for bit."""

import pytest
import torch

from pipeline.compute import computing_in, cpu_computes_bf16
from pipeline.memory import plan_memory
from pipeline.model import ModelSpec, load_config, load_model, resolve
from pipeline.recipe import load_recipe
from pipeline.reload import compare, logits, probe_input_ids
from pipeline.run import make_plan


@pytest.mark.parametrize("flags, has_bf16", [
    ("fpu avx2 fma avx512f avx512_bf16 amx_tile", True),  # Sapphire Rapids, Zen 4
    ("fpu avx2 fma sha_ni", False),  # Zen 3: AVX2 only
    ("fp asimd evtstrm aes bf16 i8mm", True),  # Arm Neoverse V1 ("Features")
])
def test_cpu_bf16_instructions_are_read_from_cpuinfo(tmp_path, flags, has_bf16):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cpu_computes_bf16(cpuinfo) is has_bf16
    assert cpu_computes_bf16(tmp_path / "absent") is False


def test_measuring_dtype_is_float32_only_where_bf16_is_emulated_and_float32_fits(write_recipe, monkeypatch):
    path = write_recipe(model="tiny:e2b", scheme="W4A16")
    recipe = load_recipe(path)
    _, config, plan = make_plan(recipe, path)

    def memory(has_bf16: bool, cpu_budget: int, gpus=()):
        monkeypatch.setattr("pipeline.compute.cpu_computes_bf16", lambda: has_bf16)
        return plan_memory(plan, recipe, config.get_text_config(), cpu_budget, list(gpus),
                           {"cpu": "recipe", "gpu": "recipe" if gpus else "none"}, path)

    def dtype(has_bf16: bool, cpu_budget: int, gpus=()) -> str:
        return memory(has_bf16, cpu_budget, gpus).compute_dtype

    roomy = 10**12
    assert dtype(False, roomy) == "float32"
    assert dtype(True, roomy) == "bfloat16"
    assert dtype(False, roomy, gpus=[roomy]) == "bfloat16"
    monkeypatch.setattr("pipeline.compute.cpu_computes_bf16", lambda: False)
    needs = plan_memory(plan, recipe, config.get_text_config(), roomy, [], {"cpu": "recipe", "gpu": "none"},
                        path).needs["all_at_once_host"]
    assert dtype(False, needs + plan.bf16_bytes) == "float32"
    assert dtype(False, needs + plan.bf16_bytes - 1) == "bfloat16"  # resident in BF16, no room for float32
    # Validation's float32 figure (the quantization error) wherever the model fits in float32, bf16 or not.
    assert memory(True, needs + plan.bf16_bytes).float32_fits
    assert not memory(True, needs + plan.bf16_bytes - 1).float32_fits
    assert memory(True, roomy, gpus=[roomy]).float32_fits


def test_computing_in_float32_is_the_float32_model_and_restores_every_bit():
    source = resolve(ModelSpec(id="tiny:e2b"))
    config = load_config(source)
    from transformers import AutoTokenizer

    probe = probe_input_ids(AutoTokenizer.from_pretrained(source.ref))
    model = load_model(source, config)
    stored = {name: t.clone() for name, t in (*model.named_parameters(), *model.named_buffers())}
    with computing_in(model, torch.float32):
        widened = logits(model, probe)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert compare(logits(load_model(source, config, dtype=torch.float32), probe), widened).max_abs_diff == 0.0
    assert compare(logits(model, probe), widened).max_abs_diff > 0  # BF16 arithmetic is not float32's
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        assert t.dtype == stored[name].dtype and torch.equal(t, stored[name]), name
