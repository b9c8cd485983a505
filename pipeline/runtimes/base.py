"""The interface every checked runtime implements, and the machine facts it decides on.

A runtime first says whether it can run an export here (`why_not`, from the plan, the config and the
machine: decided before anything starts), then runs it (`running`, a context manager that always stops
what it started) and answers for held-out token windows (`Session.score`) and one chat turn.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Protocol

import torch

from pipeline.plan import Plan
from pipeline.runtimes.scores import Scores


@dataclass(frozen=True)
class Machine:
    avx512: bool  # the CPU has AVX-512F (vLLM's CPU build has its int4 kernel only there)
    gpu: str | None  # the first NVIDIA GPU's name; None where there is none

    @property
    def cpu(self) -> str:
        return "CPU (AVX-512)" if self.avx512 else "CPU (AVX2, no AVX-512)"


@cache
def this_machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> Machine:
    try:
        flags = set(re.findall(r"\w+", cpuinfo.read_text()))
    except OSError:
        flags = set()
    gpu = None
    if shutil.which("nvidia-smi"):
        try:
            listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
            gpu = (re.findall(r"GPU \d+: ([^(]+?) \(", listed) or [None])[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return Machine(avx512="avx512f" in flags, gpu=gpu)


@dataclass
class Target:
    """What a runtime is asked to run: the export folder and the facts that decide whether it can."""

    export: Path
    plan: Plan | None  # None: to run a folder without judging it (benchmarks/serving.py)
    config: dict  # the export's config.json
    kv_cache: str | None  # the recipe's kv_cache (fp8: served with an FP8 KV cache)

    @property
    def multimodal(self) -> bool:
        return bool(self.config.get("vision_config") or self.config.get("audio_config"))

    @property
    def chat_template(self) -> bool:
        if (self.export / "chat_template.jinja").is_file():
            return True
        try:
            import json

            return bool(json.loads((self.export / "tokenizer_config.json").read_text()).get("chat_template"))
        except (OSError, ValueError):
            return False


class Session(Protocol):
    command: str  # what was started, as a shell line
    served: str  # what it was given: the export, or a view of it (and why)
    load_seconds: float

    def score(self, windows: torch.Tensor, k: int) -> Scores:
        """Each window's positions 0..L-2 (predicting tokens 1..L-1): top-k and the actual token's log-prob."""

    def chat(self, message: str, max_tokens: int) -> str:
        """One user turn through the export's chat template, greedy."""


class Runtime(Protocol):
    name: str

    def why_not(self, target: Target, machine: Machine) -> str | None:
        """Why this runtime cannot run `target` here (None: it can), before starting anything."""

    def version(self) -> str:
        ...

    def device(self, machine: Machine) -> str:
        ...

    def running(self, target: Target, workdir: Path, log_path: Path, timeout_s: float) -> AbstractContextManager[Session]:
        """The runtime serving `target` (scratch files in `workdir`, its output in `log_path`), stopped on exit,
        whatever ends the block."""


class RuntimeFailed(RuntimeError):
    """The runtime did not start or did not answer; the message names what it said."""
