"""The model card: metadata that round-trips, and a body made only of what the run measured."""

import contextlib
import hashlib
import io
import json
import re
from collections import Counter

import pytest
import yaml
from huggingface_hub import ModelCard

from pipeline.card import write_card
from pipeline.cli import main
from pipeline.plan import Plan

TAGS = ["gemma4", "quantized", "w4a16", "int4", "compressed-tensors", "rtn", "vllm", "gemma-quant"]


def _card(run) -> ModelCard:
    return ModelCard.load(run / "export" / "README.md")


def _edit_manifest(run, edit) -> None:
    path = run / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_metadata_round_trips_and_the_manifest_records_the_card(validated_run):
    card = _card(validated_run)
    # A tiny random source: no Hub id to name as base_model, no card to take a license from.
    assert card.data.to_dict() == {"library_name": "transformers", "pipeline_tag": "image-text-to-text", "tags": TAGS}
    recorded = json.loads((validated_run / "manifest.json").read_text())["card"]
    assert recorded["sha256"] == hashlib.sha256((validated_run / "export" / "README.md").read_bytes()).hexdigest()
    assert recorded["repo_id"] is None


def test_body_quotes_the_measured_numbers(validated_run):
    text = _card(validated_run).text
    report = json.loads((validated_run / "eval.json").read_text())
    q, served, floor, s = report["quality"], report["served"], report["bf16_floor"], report["sizes"]
    assert (q["dtype"], served["dtype"]) == ("float32", "bfloat16")  # a tiny model fits in float32
    for row in (f"| KL divergence, mean (unquantized ‖ quantized, nats per token) | {q['kl_mean']:.5f} | "
                f"{served['kl_mean']:.5f} | {floor['kl_mean']:.5f} |",
                f"| KL divergence, p99 | {q['kl_p99']:.5f} | {served['kl_p99']:.5f} | {floor['kl_p99']:.5f} |",
                f"| top-1 agreement | {q['top1_agreement']:.4f} | {served['top1_agreement']:.4f} | "
                f"{floor['top1_agreement']:.4f} |",
                f"| perplexity, unquantized | {q['ppl_reference']:.3f} | {served['ppl_reference']:.3f} | |",
                f"| perplexity, quantized | {q['ppl_quantized']:.3f} | {served['ppl_quantized']:.3f} | |",
                f"| perplexity ratio (quantized / unquantized; floor: bf16 / float32) | {q['ppl_ratio']:.4f} | "
                f"{served['ppl_ratio']:.4f} | {floor['ppl_ratio']:.4f} |",
                f"| weights on disk | {s['export_weights_bytes'] / 1e6:.2f} MB |",
                f"| BF16 source weights | {s['source_weights_bytes'] / 1e6:.2f} MB |",
                f"| bits per quantized parameter | {s['bits_per_quantized_param']:.3f} (int4 plus a BF16 scale per 128"):
        assert row in text
    assert "2 windows of 64 tokens (128 tokens scored)" in text and "built-in held-out text" in text
    assert "**quantization error**, both models computing in float32" in text
    assert "- none set in the recipe" in text and "**Validation: passed**" in text
    assert "| calibration | none (RTN is data-free) |" in text
    assert "one BF16 scale per group of 128 input features" in text
    assert "pending" not in text.lower()
    assert (report["serving"]["status"], report["serving"]["reason"]) == ("not_run", "turned off (GEMMA_QUANT_VLLM=off)")
    assert "Not checked in vLLM: turned off (GEMMA_QUANT_VLLM=off)." in text


@pytest.mark.parametrize("measured, why", [
    ("served", "Both models computing in bf16: the model does not fit in float32 within the memory budget, so these "
     "figures include bf16 arithmetic's own rounding, and the quantization error alone was not measured."),
    ("quality", "Both models computing in float32 from their BF16 weights: the quantization error, without bf16 "
     "arithmetic's own rounding. The quality as served in bf16 was not measured (the recipe sets "
     "`eval.served: false`)."),
])
def test_a_card_with_one_figure_shows_it_and_says_which_it_is(validated_copy, measured, why):
    """One figure: bf16 only (the model does not fit in float32), or float32 only (`eval.served: false`)."""
    from pipeline.card import render_card

    path = validated_copy / "eval.json"
    report = json.loads(path.read_text())
    q = report["quality"] = report[measured] | {"kl_mean": 0.0123}
    report["served"] = report["bf16_floor"] = None
    path.write_text(json.dumps(report))
    text = render_card(validated_copy).text
    assert "| KL divergence, mean (unquantized ‖ quantized, nats per token) | 0.01230 |" in text
    assert f"| perplexity ratio (quantized / unquantized) | {q['ppl_ratio']:.4f} |" in text
    assert why in text and "bf16's own floor" not in text


def test_kept_modules_are_counted_by_component(validated_run):
    text = _card(validated_run).text
    plan = Plan.load(validated_run / "plan.json")
    kept = Counter(m.reason.split(":")[0].split(" (")[0] for m in plan.modules if not m.quantize)
    assert kept == {"Per-Layer-Embedding": 22, "audio tower": 24, "vision tower": 15, "multimodal projector": 2,
                    "embedding table": 1, "lm_head": 1}
    for label, count in kept.items():
        assert re.search(rf"^\| {label} \| {count} \| ", text, re.M), label
    assert "| lm_head | 1 | tied to the embedding table, stored once |" in text
    assert "60 of 123 Linear layers, all in the text decoder" in text
    assert "model.language_model" not in text  # counts, not a wall of module names


def test_description_states_the_variant_facts(validated_run):
    text = _card(validated_run).text
    assert "The model is dense (no Mixture-of-Experts)." in text and "Mixture-of-Experts:" not in text
    assert "It has 15.41 M parameters (1.15 M of them in the Per-Layer-Embedding tables)" in text
    assert "10 decoder layers: 8 with sliding-window attention (32-token window) and 2 with full attention" in text
    assert "It has Per-Layer Embeddings (PLE), a vision tower and an audio tower." in text
    assert "Random weights: this is a tiny model built by gemma-quant to test the toolchain." in text


def test_usage_reproduction_and_the_snippet_runs(validated_run):
    text = _card(validated_run).text
    export = validated_run / "export"
    assert f"vllm serve {export} --max-model-len 4096" in text
    assert f"python -m sglang.launch_server --model-path {export} --context-length 4096" in text
    recipe = (validated_run.parent / "tiny-card.yaml").read_text()
    assert f"```yaml\n{recipe}```" in text and "gemma-quant quantize tiny-card.yaml" in text
    # The transformers snippet, as printed, loads this folder and generates (fewer tokens, for speed).
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "AutoModelForImageTextToText" in code and "AutoTokenizer" in code  # no processor files in tiny sources
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(code.replace("max_new_tokens=64", "max_new_tokens=3"), namespace)
    # It rendered the chat template, generated 3 new tokens, and printed their decoding.
    assert namespace["output"].shape[1] == namespace["inputs"]["input_ids"].shape[1] + 3


def test_text_only_model_gets_text_generation(validated_copy):
    path = validated_copy / "export" / "config.json"
    config = json.loads(path.read_text())
    config.pop("vision_config"), config.pop("audio_config")
    path.write_text(json.dumps(config))
    write_card(validated_copy)
    card = _card(validated_copy)
    assert card.data.pipeline_tag == "text-generation"
    assert "AutoModelForCausalLM.from_pretrained" in card.text and "AutoModelForImageTextToText" not in card.text
    assert "It has Per-Layer Embeddings (PLE)." in card.text


@pytest.mark.parametrize("state, expected", [
    ("skipped", "**Not measured:** this checkpoint was not validated (quantized with `--no-validate`, or validation "
                "did not finish), so its quality was not measured."),
    ("report missing", "**Not measured:** the validation report (eval.json) is missing from the run, so no numbers "
                       "can be quoted."),
])
def test_unmeasured_quality_is_said_so(validated_copy, state, expected):
    (validated_copy / "eval.json").unlink()
    if state == "skipped":
        _edit_manifest(validated_copy, lambda m: (m.pop("validation"), m.update(status="exported")))
    write_card(validated_copy)
    text = _card(validated_copy).text
    assert expected in text
    assert "KL divergence" not in text and "pending" not in text.lower()
    assert ("**Validation: not run.**" if state == "skipped" else "**Validation: passed**") in text
    if state == "skipped":
        assert "| bits per quantized parameter | not measured |" in text


def test_failed_validation_is_on_the_card(validated_copy):
    failure = "gate kl_mean_max failed: kl_mean 0.7 <= 0.0001 required, missed by 0.7 (700000.0%)"

    def fail(manifest):
        manifest.update(status="failed_validation")
        manifest["validation"].update(passed=False, failures=[failure])

    _edit_manifest(validated_copy, fail)
    write_card(validated_copy)
    text = _card(validated_copy).text
    assert f"> **This checkpoint failed its validation:** {failure}" in text
    assert f"**Validation: failed.** {failure}" in text
    assert "This checkpoint FAILED its validation" in text


def _local_source(tmp_path, front_matter: str | None):
    source = tmp_path / "my-gemma"
    source.mkdir()
    if front_matter is not None:
        (source / "README.md").write_text(f"---\n{front_matter}---\n\n# My Gemma\n")
    return source


def _use_source(run, model_id: str, path, **hub):
    def edit(manifest):
        manifest["recipe"]["model"]["id"] = model_id
        manifest["recipe"]["hub"].update(hub)
        manifest["source"].update(id=model_id, path=str(path) if path else None)

    _edit_manifest(run, edit)


def test_license_is_copied_from_the_source_card(validated_copy, tmp_path):
    source = _local_source(tmp_path, "license: other\nlicense_name: gemma\nlicense_link: https://ai.google.dev/gemma/"
                                     "terms\nlanguage:\n- en\n")
    _use_source(validated_copy, str(source), source, license="mit")  # the source's own card wins
    write_card(validated_copy)
    card = _card(validated_copy)
    assert card.data.to_dict() == {"language": ["en"], "license": "other", "license_name": "gemma",
                                   "license_link": "https://ai.google.dev/gemma/terms", "library_name": "transformers",
                                   "pipeline_tag": "image-text-to-text", "tags": TAGS}
    assert f"copied from the card of {source}" in card.text
    assert "This is a local checkpoint folder, `my-gemma`" in card.text  # no Hub id invented for it


def test_license_falls_back_to_the_recipe(validated_copy, tmp_path):
    source = _local_source(tmp_path, "language: en\n")
    _use_source(validated_copy, str(source), source, license="apache-2.0", language=["de"],
                base_model="google/gemma-4-E2B-it")
    write_card(validated_copy)
    card = _card(validated_copy)
    assert card.data.to_dict() == {"base_model": "google/gemma-4-E2B-it", "base_model_relation": "quantized",
                                   "language": ["en"], "license": "apache-2.0", "library_name": "transformers",
                                   "pipeline_tag": "image-text-to-text", "tags": TAGS}
    assert f"set by the recipe (`hub.license`); the card of {source} declares none" in card.text


def test_unknown_license_is_omitted_and_stated(validated_run):
    card = _card(validated_run)
    assert "license" not in card.data.to_dict()
    assert ("Not declared. The license is unknown: a tiny random model has no model card, and the recipe sets no "
            "`hub.license`") in card.text


def test_hub_source_names_its_base_model(validated_copy, tmp_path, monkeypatch):
    import huggingface_hub

    _use_source(validated_copy, "google/gemma-4-E2B-it", None)
    write_card(validated_copy)  # offline, and the card is not cached: the license stays unknown
    card = _card(validated_copy)
    assert card.data.to_dict() == {"base_model": "google/gemma-4-E2B-it", "base_model_relation": "quantized",
                                   "library_name": "transformers", "pipeline_tag": "image-text-to-text", "tags": TAGS}
    assert "the card of google/gemma-4-E2B-it could not be read (offline?)" in card.text
    assert card.text.lstrip().startswith("# gemma-4-E2B-it: W4A16 (RTN, compressed-tensors)")
    assert "This is [google/gemma-4-E2B-it](https://huggingface.co/google/gemma-4-E2B-it)" in card.text

    hub_card = tmp_path / "hub-README.md"
    hub_card.write_text("---\nlicense: apache-2.0\n---\n")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, revision=None: str(hub_card))
    write_card(validated_copy)
    assert _card(validated_copy).data.license == "apache-2.0"


def test_changed_recipe_file_is_reproduced_as_resolved(validated_copy, tmp_path):
    recipe = tmp_path / "moved.yaml"
    recipe.write_text("model: tiny:e2b\nscheme: W8A16\n")
    _edit_manifest(validated_copy, lambda m: m.update(recipe_file=str(recipe)))
    write_card(validated_copy)
    text = _card(validated_copy).text
    assert "The recipe as the run resolved it (the original file has changed or is gone):" in text
    resolved = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    assert resolved == json.loads((validated_copy / "manifest.json").read_text())["recipe"]


def test_card_verb_names_the_repo(validated_copy, capsys):
    assert main(["card", str(validated_copy), "--repo-id", "me/tiny-w4a16"]) == 0
    assert "pipeline_tag: image-text-to-text" in capsys.readouterr().out
    text = _card(validated_copy).text
    assert "vllm serve me/tiny-w4a16 --max-model-len 4096" in text
    assert 'AutoModelForImageTextToText.from_pretrained("me/tiny-w4a16"' in text
    assert json.loads((validated_copy / "manifest.json").read_text())["card"]["repo_id"] == "me/tiny-w4a16"


def _failing_validation(run_dir, serve=True, logs_dir=None):
    from pipeline.validate import ValidationFailed

    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest.update(status="failed_validation", validation={"passed": False, "report": "eval.json", "quality": None,
                                                            "failures": ["gate x failed"], "export_files": {}})
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    raise ValidationFailed("validation failed: gate x failed")


def test_validate_verb_refreshes_the_card(validated_copy, monkeypatch):
    monkeypatch.setattr("pipeline.validate.validate_run", _failing_validation)
    assert main(["validate", str(validated_copy)]) == 1
    assert "**Validation: failed.** gate x failed" in _card(validated_copy).text


@pytest.mark.parametrize("card", [True, False])
def test_quantize_writes_the_card_even_when_validation_fails(tmp_path, monkeypatch, card):
    from pipeline import validate
    from pipeline.run import quantize_run

    monkeypatch.setattr(validate, "validate_run", _failing_validation)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: tiny:31b\nscheme: W8A16\noutput_dir: {tmp_path / 'run'}\n")
    with pytest.raises(validate.ValidationFailed):
        quantize_run(recipe, reload_check=False, card=card)
    readme = tmp_path / "run" / "rejected" / "export" / "README.md"
    assert readme.is_file() == card
    if card:  # the card's usage names the export where it is now
        assert "**Validation: failed.** gate x failed" in readme.read_text()
        assert f"vllm serve {tmp_path / 'run' / 'rejected' / 'export'} " in readme.read_text()


def test_moe_variant_and_its_bf16_experts(validated_copy):
    """The card of a 26B-A4B-shaped run (its plan and config; the card reads nothing else from the model)."""
    from pipeline.recipe import load_recipe
    from pipeline.run import make_plan
    from pipeline.tiny import tiny_config

    recipe = load_recipe("tiny-26b-a4b-w4a16")
    _, _, plan = make_plan(recipe, "tiny-26b-a4b-w4a16")
    plan.save(validated_copy / "plan.json")
    (validated_copy / "export" / "config.json").write_text(json.dumps(tiny_config("26b-a4b")))
    write_card(validated_copy)
    text = _card(validated_copy).text
    assert ("The model is a Mixture-of-Experts: each decoder layer pairs a dense MLP with 8 experts, "
            "2 routed per token.") in text
    assert "It has no Per-Layer Embeddings (PLE) and a vision tower." in text
    experts = [m for m in plan.modules if m.component == "moe_experts"]
    assert re.search(rf"^\| fused MoE experts \| {len(experts)} \| ", text, re.M)
    assert f"The fused MoE experts ({len(experts)} blocks, " in text and "are stored in BF16" in text
