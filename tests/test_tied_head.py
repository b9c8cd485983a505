"""A tied lm_head that stays tied is stored once: not in the index, shared on reload, not in the size."""


import pytest
import torch

from pipeline.tensors import StoredTensors
from pipeline.model import model_class
from pipeline.plan import Plan
from pipeline.run import quantize_run


def _export(tmp_path, model: str, scheme: str) -> tuple[dict, Plan, object]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {model}\nscheme: {scheme}\noutput_dir: {tmp_path / 'run'}\n")
    manifest = quantize_run(recipe, validate=False, card=False)
    return manifest, Plan.load(tmp_path / "run" / "plan.json"), tmp_path / "run" / "export"


def _check_stored_once(manifest, plan: Plan, folder) -> None:
    from transformers import AutoConfig

    head = next(m for m in plan.modules if m.name == "lm_head")
    embedding = next(m for m in plan.modules if m.name == head.tied_to)
    config = AutoConfig.from_pretrained(folder)
    assert config.get_text_config().tie_word_embeddings or config.tie_word_embeddings

    headers = StoredTensors(folder).headers
    assert not [k for k in headers if k.startswith("lm_head.")]
    assert headers[f"{embedding.name}.weight"] == ("BF16", embedding.shape)

    model = model_class(config).from_pretrained(folder, dtype=torch.bfloat16)
    head_weight, embed_weight = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head_weight.data_ptr() == embed_weight.data_ptr()
    assert head_weight.untyped_storage().data_ptr() == embed_weight.untyped_storage().data_ptr()

    # The table counts once in the plan's estimate, and the written weights agree with it to
    # within half a table (a second copy would add a whole one).
    sizes = manifest.sizes
    table = embedding.bf16_bytes
    assert head.bf16_bytes == head.export_bytes == 0
    assert abs(sizes.export_weights_bytes - sizes.export_weights_bytes_estimate) < 0.5 * table


def test_tiny_e2b_stores_the_tied_head_once(tmp_path):
    manifest, plan, folder = _export(tmp_path, "tiny:e2b", "W4A16")
    _check_stored_once(manifest, plan, folder)


@pytest.mark.slow
def test_gemma3_270m_stores_the_tied_head_once(tmp_path):
    """The real 262k x 640 table, 63 % of the parameters: a second copy would be 335 MB."""
    manifest, plan, folder = _export(tmp_path, "gguf:gemma3-270m", "W8A16")
    assert next(m for m in plan.modules if m.name == "lm_head").shape == [262144, 640]
    _check_stored_once(manifest, plan, folder)
