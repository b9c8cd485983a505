"""The CLI is thin: the same verbs, readable output, exit codes that scripts can rely on."""

import json

from pipeline.cli import main


def test_plan_prints_components_and_writes_plan_json(write_recipe, capsys, tmp_path):
    path = write_recipe("cli-plan", model="tiny:e2b", scheme="W4A16")
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    for text in ("text_decoder", "sliding_attention", "full_attention", "vision tower", "audio tower",
                 "Per-Layer-Embedding", "multimodal projector", "linear layers: 123 (60 quantized, 63 kept)"):
        assert text in out
    plan = json.loads((tmp_path / "runs" / "cli-plan" / "plan.json").read_text())
    assert plan["scheme"] == "W4A16" and len(plan["modules"]) > 100


def test_plan_of_a_real_recipe_works_offline(capsys, tmp_path):
    assert main(["plan", "e2b-w4a16", "--run-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "linear layers: 526 (205 quantized, 321 kept)" in out
    assert "estimated size: 7.570 GB vs 10.209 GB BF16" in out  # group 32


def test_recipe_error_exits_2_with_the_message(write_recipe, capsys):
    path = write_recipe("cli-bad", model="tiny:e2b", scheme="W4A16", group_size=100)
    assert main(["plan", str(path)]) == 2
    out = capsys.readouterr().out
    assert "recipe error" in out and "group_size: got 100" in out.replace("\n", " ")


def test_a_skip_entry_that_matches_nothing_is_refused_with_the_nearest_names(write_recipe, capsys, tmp_path):
    """A typo under skip: would quantize what the recipe meant to keep: plan refuses it, before any write."""
    path = write_recipe("cli-skip", model="tiny:e2b", scheme="W4A16",
                        skip=["model.language_model.layers.0.mlp.gate_prj", "re:.*layers[.]0[.]mlp[.].*"])
    assert main(["plan", str(path)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "skip.0: 'model.language_model.layers.0.mlp.gate_prj' matches no Linear layer of tiny:e2b" in out
    assert "nearest names: model.language_model.layers.0.mlp.gate_proj" in out and "skip.1" not in out
    assert not (tmp_path / "runs" / "cli-skip").exists()


def test_quantize_reports_where_and_how_close(write_recipe, capsys, tmp_path):
    path = write_recipe("cli-quantize", model="tiny:31b", scheme="W8A16")
    assert main(["quantize", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"done: {tmp_path / 'runs' / 'cli-quantize'}/export" in out.replace("\n", "")
    assert "validation: tiny:31b, W8A16 (8×256 held-out tokens)" in out and "top-1 agreement" in out
    manifest = json.loads((tmp_path / "runs" / "cli-quantize" / "manifest.json").read_text())
    assert manifest["status"] == "validated"
    assert set(manifest["timings_s"]) == {"plan", "load", "quantize", "export", "reload_check", "validate"}


def test_a_manifest_this_tool_did_not_write_is_refused_naming_the_file_and_the_field(validated_copy, capsys):
    manifest = json.loads((validated_copy / "manifest.json").read_text())
    manifest["sizes"]["export_bytes"] = "large"
    (validated_copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["card", str(validated_copy)]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "manifest.json is not a manifest this gemma-quant wrote" in out and "sizes.export_bytes" in out


def test_plan_with_the_hub_unreachable_goes_offline_at_once_with_one_warning(tmp_path):
    """No network and HF_HUB_OFFLINE unset: one refused request, then offline for the rest of the run (not
    huggingface_hub's five retries with backoff per file, 52 s before), and one warning saying so."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import pipeline

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # port 9: nothing listens
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "plan", "e2b-w4a16", "--run-dir", str(tmp_path / "run")],
                          cwd=Path(pipeline.__file__).parent.parent, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    out = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 0, out[-2000:]
    assert "linear layers: 526 (205 quantized, 321 kept)" in out
    assert out.count("WARNING") == 1 and "Retrying" not in out
    assert ("google/gemma-4-E2B-it: the Hub (http://127.0.0.1:9) is unreachable (ConnectError: " in out
            and "offline for the rest of this run" in out and "planning from the bundled copy of its config" in out)
    assert seconds < 30  # the interpreter and torch's import take most of it
