"""End to end on tiny Gemma 4: recipe → plan → RTN → compressed-tensors export → reload."""

import hashlib
import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from transformers import AutoModelForImageTextToText

from pipeline import reload as reloading
from pipeline.export import ExportIncomplete, ignore_problems
from pipeline.model import ModelSpec, resolve
from pipeline.plan import Plan
from pipeline.run import MEMORY_PLAN, ReloadFailed, quantize_run
from pipeline.rundir import RUN_MARK
from pipeline.runlock import LOCK

from conftest import VARIANTS, read_tensors

SIDE_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"}


def reference_rtn(weight: torch.Tensor, bits: int, group_size: int | None):
    """Symmetric round-to-nearest written out independently of the libraries: per group (or per
    output channel) scale = absmax / ((2^bits - 1) / 2) in the weight's dtype; ints clamped."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // (group_size or in_features), -1)
    scale = groups.abs().amax(-1, keepdim=True) / ((2 ** bits - 1) / 2)
    ints = torch.clamp(torch.round(groups / scale), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return ints.reshape(out_features, in_features).to(torch.int8), scale.squeeze(-1)


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Quantize each tiny variant at W8A16 and W4A16 once; tests below inspect the results."""
    done = {}

    def run(variant: str, scheme: str):
        if (variant, scheme) not in done:
            root = tmp_path_factory.mktemp(f"{variant}-{scheme}")
            recipe = root / "recipe.yaml"
            group = "null" if scheme == "W8A16" else 64
            recipe.write_text(f"model: tiny:{variant}\nscheme: {scheme}\ngroup_size: {group}\n"
                              f"output_dir: {root / 'run'}\n")
            done[variant, scheme] = (quantize_run(recipe, validate=False), root / "run")
        return done[variant, scheme]

    return run


@pytest.mark.parametrize("scheme", ["W8A16", "W4A16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_export_is_complete_and_stored_as_planned(runs, variant, scheme):
    manifest, run_dir = runs(variant, scheme)
    export = run_dir / "export"
    plan = Plan.load(run_dir / "plan.json")
    assert manifest.status == "exported" and manifest.plan.quantized == len(plan.quantized)
    assert SIDE_FILES <= {p.name for p in export.iterdir()}
    assert manifest.export.copied_from_source == sorted(SIDE_FILES - {"generation_config.json"})

    qconfig = json.loads((export / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors"
    weights = qconfig["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == {"W8A16": 8, "W4A16": 4}[scheme]
    assert weights["strategy"] == {"W8A16": "channel", "W4A16": "group"}[scheme]
    assert ignore_problems(qconfig["ignore"], plan) == []

    stored = read_tensors(export)
    source = read_tensors(resolve(ModelSpec(id=f"tiny:{variant}")).path)
    bits, group_size = (8, None) if scheme == "W8A16" else (4, 64)
    for m in plan.modules:
        if m.quantize:
            # Exactly RTN of the source weight: the stored integers and scales, bit for bit.
            packed = stored[f"{m.name}.weight_packed"]
            assert packed.dtype == torch.int32, m.name
            ints = unpack_from_int32(packed, bits, torch.Size(m.shape))
            expected_ints, expected_scale = reference_rtn(source[f"{m.name}.weight"], bits, group_size)
            assert torch.equal(stored[f"{m.name}.weight_scale"], expected_scale), m.name
            assert torch.equal(ints, expected_ints), m.name
            assert f"{m.name}.weight" not in stored
        elif m.tied_to:
            assert f"{m.name}.weight" not in stored  # a tied head is stored once
        else:
            # Everything kept is bit-identical to the source: towers, PLE, embeddings, router, experts.
            keys = [k for k in source if k.startswith(m.name + ".") and k.count(".") == m.name.count(".") + 1]
            assert keys, m.name
            for key in keys:
                assert torch.equal(stored[key], source[key]), key

    sizes = manifest.sizes
    assert abs(sizes.export_weights_bytes - sizes.export_weights_bytes_estimate) / sizes.export_weights_bytes < 0.02


@pytest.mark.parametrize("variant", VARIANTS)
def test_reloaded_logits_stay_close(runs, variant):
    """The reload check's numbers, recomputed here independently from the folders on disk."""
    source = resolve(ModelSpec(id=f"tiny:{variant}")).path
    from transformers import AutoTokenizer

    probe = reloading.probe_input_ids(AutoTokenizer.from_pretrained(source))
    dtype = getattr(torch, json.loads((runs(variant, "W8A16")[1] / MEMORY_PLAN).read_text())["compute_dtype"])
    reference = reloading.logits(AutoModelForImageTextToText.from_pretrained(source, dtype=dtype), probe)
    kl = {}
    for scheme in ("W8A16", "W4A16"):
        manifest, run_dir = runs(variant, scheme)
        model, info = AutoModelForImageTextToText.from_pretrained(
            run_dir / "export", dtype=dtype, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        got = reloading.compare(reference, reloading.logits(model, probe))
        assert got.kl_mean == pytest.approx(manifest.reload.vs_unquantized.kl_mean, rel=1e-4)
        assert manifest.reload.vs_in_memory.max_abs_diff == 0.0
        kl[scheme] = got.kl_mean
    assert kl["W8A16"] < 0.1
    assert kl["W8A16"] < kl["W4A16"] < 1.5
    # Negative control: the same architecture with other random weights. (Random tiny models mostly
    # echo the current token, so its top-1 agreement is high; its KL is what sets the scale.)
    other = resolve(ModelSpec(id=f"tiny:{variant}", seed=1)).path
    unrelated = reloading.compare(
        reference, reloading.logits(AutoModelForImageTextToText.from_pretrained(other, dtype=dtype), probe))
    assert kl["W8A16"] < 0.2 * unrelated.kl_mean and kl["W4A16"] < 0.5 * unrelated.kl_mean


def _recipe(tmp_path, **extra):
    path = tmp_path / "r.yaml"
    fields = {"model": "tiny:31b", "scheme": "W4A16", "output_dir": tmp_path / "run", **extra}
    path.write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))
    return path


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_run_leaves_previous_export_intact(tmp_path, monkeypatch, failure):
    from pipeline.quantize.llmcompressor_backend import LLMCompressorBackend

    recipe = _recipe(tmp_path)
    quantize_run(recipe, validate=False)
    export, manifest = tmp_path / "run" / "export", tmp_path / "run" / "manifest.json"
    before, manifest_before = _digest(export), manifest.read_text()

    def half_written_save(self, model, folder, recipe):
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise failure

    monkeypatch.setattr(LLMCompressorBackend, "save", half_written_save)
    with pytest.raises(type(failure)):
        quantize_run(recipe)
    assert _digest(export) == before
    assert manifest.read_text() == manifest_before
    # no staging left; the run-dir lock file stays (pipeline/runlock.py: an flock, removing it would race), and
    # the mark of a gemma-quant run
    assert sorted(p.name for p in (tmp_path / "run").iterdir()
                  if p.name.startswith(".") and p.name not in (LOCK, RUN_MARK)) == []
    log = sorted((tmp_path / "run" / "logs").glob("quantize-*.log"))[-1].read_text()
    if isinstance(failure, KeyboardInterrupt):  # one line, no traceback
        assert "interrupted; the previous export, card and manifest are left as they were" in log
        assert "Traceback" not in log
    else:  # the traceback goes to the log file
        assert "run failed (RuntimeError: disk full); the previous export, card and manifest are left as they were" in log
        assert "Traceback" in log and "half_written_save" in log


def test_reload_check_catches_weights_that_would_load_random(tmp_path, monkeypatch):
    """A saved folder missing a tensor loads in transformers with that tensor silently random:
    the reload check must refuse it and keep nothing."""
    from safetensors.torch import save_file

    from pipeline.quantize.llmcompressor_backend import LLMCompressorBackend

    original_save = LLMCompressorBackend.save

    def save_without_a_tensor(self, model, folder, recipe):
        original_save(self, model, folder, recipe)
        path = folder / "model.safetensors"
        tensors = read_tensors(folder)
        del tensors["model.language_model.layers.1.self_attn.k_norm.weight"]
        save_file(tensors, path, metadata={"format": "pt"})

    monkeypatch.setattr(LLMCompressorBackend, "save", save_without_a_tensor)
    with pytest.raises(ReloadFailed, match=r"1 missing keys on reload, e.g. \['model.language_model.layers.1.self_attn.k_norm.weight'\]"):
        quantize_run(_recipe(tmp_path))
    assert not (tmp_path / "run" / "export").exists()
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_export_check_catches_an_ignore_list_that_misses_a_kept_module(tmp_path, monkeypatch):
    import pipeline.export as export_mod

    monkeypatch.setattr(export_mod, "add_missing_ignores", lambda folder, plan: None)
    with pytest.raises(ExportIncomplete, match=r"model.language_model.layers.0.experts is kept in BF16 but not in "
                                               r"quantization_config.ignore"):
        quantize_run(_recipe(tmp_path, model="tiny:26b-a4b", group_size=64))
