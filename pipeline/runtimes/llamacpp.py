"""llama.cpp, from PyPI's `llama-cpp-python` (built from source by `make llama-setup`), and the GGUF converter
of the same llama.cpp commit, taken from that package's sdist into `.llama-cpp/` (PyPI's `gguf` does not match
it: the Gemma converter needs enum members `gguf` 0.19 lacks).

Three things, all llama.cpp's own code: `convert` (its `convert_hf_to_gguf.py`, a Hugging Face folder to a
16-bit GGUF), `quantize` (`llama_model_quantize`, with per-tensor type overrides and an importance matrix
handed over in memory), and `LlamaCpp`, the runtime that loads a GGUF and returns its logits for held-out
windows (`Llama(..., logits_all=True)`).
"""

from __future__ import annotations

import ctypes
import importlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.runtimes.base import Machine, RuntimeFailed, Target
from pipeline.runtimes.scores import Scores, scores_from_logits

ENV = "GEMMA_QUANT_LLAMA_CPP"  # the folder holding the converter (default .llama-cpp beside pipeline/)
DEFAULT_DIR = Path(__file__).resolve().parents[2] / ".llama-cpp"

# GGUF type name → (llama_ftype, ggml_type) as llama.h numbers them.
TYPES = {
    "BF16": (32, 30), "F16": (1, 1), "Q8_0": (7, 8), "Q4_0": (2, 2), "Q4_1": (3, 3), "Q5_0": (8, 6),
    "Q5_K_M": (17, 13), "Q4_K_M": (15, 12), "Q6_K": (18, 14), "IQ4_XS": (30, 23),
}


def converter_dir() -> Path:
    return Path(os.environ.get(ENV) or DEFAULT_DIR)


def why_missing() -> str | None:
    """Why llama.cpp cannot be used here (None: it can)."""
    if not (converter_dir() / "convert_hf_to_gguf.py").is_file():
        return f"llama.cpp's GGUF converter is not in {converter_dir()}: `make llama-setup` puts it there"
    try:
        importlib.import_module("llama_cpp")
    except ImportError as err:
        return f"llama-cpp-python is not installed ({err}): `make llama-setup` builds it"
    return None


def convert(folder: Path, out_file: Path, outtype: str = "bf16", mmproj: bool = False, log_path: Path | None = None,
            metadata: Path | None = None) -> Path:
    """llama.cpp's converter on a Hugging Face checkpoint folder: the text model (or, with `mmproj`, the
    vision/audio projector file) as one GGUF with 16-bit weights; `metadata`: its `general.*` overrides (JSON)."""
    tools = converter_dir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tools / "gguf-py"), str(tools)]), NO_LOCAL_GGUF="")
    argv = [sys.executable, str(tools / "convert_hf_to_gguf.py"), str(folder), "--outtype", outtype,
            "--outfile", str(out_file), *(["--mmproj"] if mmproj else []),
            *(["--metadata", str(metadata)] if metadata else [])]
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as log:
            log.write(f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        tail = " | ".join(line for line in done.stderr.splitlines()[-6:] if line.strip())
        raise RuntimeFailed(f"llama.cpp's converter failed on {folder} (exit {done.returncode}): {tail}")
    return out_file


@dataclass
class Quantization:
    """How llama.cpp's quantizer writes one file: its file type, and types forced on tensors by name."""

    type: str  # a key of TYPES
    overrides: dict[str, str]  # GGUF tensor-name regex → type (llama.cpp's --tensor-type)
    imatrix: dict[str, np.ndarray] | None = None  # GGUF tensor name → mean squared input per column
    pure: bool = False  # every quantizable tensor at `type` unless overridden (no k-quant mix)


def quantize(source: Path, out_file: Path, how: Quantization, threads: int = 0) -> Path:
    """`llama_model_quantize` from a 16-bit GGUF."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, _ = TYPES[how.type]
    params.nthread = threads
    params.pure = how.pure
    keep = []  # ctypes buffers referenced by params, alive until the call returns
    if how.overrides:
        entries = (llama_cpp.llama_model_tensor_override * (len(how.overrides) + 1))()
        for entry, (pattern, kind) in zip(entries, how.overrides.items()):
            entry.pattern = pattern.encode()
            entry.type = TYPES[kind][1]
        params.tt_overrides = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep.append(entries)
    if how.imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(how.imatrix) + 1))()
        for entry, (name, values) in zip(entries, how.imatrix.items()):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(values)
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out_file).encode(), ctypes.byref(params)) != 0:
        raise RuntimeFailed(f"llama.cpp could not quantize {source.name} to {how.type}")
    return out_file


class LlamaCpp:
    name = "llama.cpp"

    def why_not(self, target: Target, machine: Machine) -> str | None:
        return why_missing()

    def version(self) -> str:
        import llama_cpp

        return f"llama-cpp-python {llama_cpp.__version__}"

    def device(self, machine: Machine) -> str:
        return machine.cpu

    @contextmanager
    def running(self, target: Target, workdir: Path, log_path: Path, timeout_s: float) -> Iterator[_Session]:
        """The GGUF file `target.export`, in this process, with the context `target.config` gives (every
        position's logits are kept: n_ctx × vocabulary floats)."""
        session = _Session(target.export, n_ctx=target.config.get("max_position_embeddings", 4096))
        try:
            yield session
        finally:
            session.llm.close()


@contextmanager
def _without_weight_repacking():
    """llama.cpp with `use_extra_bufts = false`: its CPU weight repacking (the AVX-512 / AMX buffer types) ends
    in a segmentation fault at the first quantized matmul on this project's Intel AMX machine, for Q8_0, Q4_0
    and Q4_K alike, with the real 270M too (docs/runtime-findings.md); the plain CPU
    kernels compute the same types. `Llama` has no argument for it (the gap this fills), so its defaults are
    set for the construction."""
    import llama_cpp
    import llama_cpp.llama as high_level

    defaults = llama_cpp.llama_model_default_params

    def patched():
        params = defaults()
        params.use_extra_bufts = False
        return params

    high_level.llama_cpp.llama_model_default_params = patched
    try:
        yield
    finally:
        high_level.llama_cpp.llama_model_default_params = defaults


class _Session:
    """A GGUF loaded in this process (llama.cpp's own code through its C API)."""

    served = "the GGUF file"

    def __init__(self, path: Path, n_ctx: int):
        from llama_cpp import Llama

        started = time.perf_counter()
        try:
            with _without_weight_repacking():
                self.llm = Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False,
                                 n_threads=os.cpu_count())
        except Exception as err:
            raise RuntimeFailed(f"llama.cpp did not load {path.name}: {err}") from err
        self.command = f"Llama({path.name!r}, logits_all=True), use_extra_bufts=False"
        self.load_seconds = round(time.perf_counter() - started, 1)

    def logits(self, window: torch.Tensor) -> torch.Tensor:
        """[1, L, vocab] float32 logits of one window, from a fresh context."""
        ids = window.flatten().tolist()
        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))[None]

    def score(self, windows: torch.Tensor, k: int) -> Scores:
        return Scores.cat([scores_from_logits(self.logits(w[None]), w[None], k) for w in windows])

    def projector(self, mmproj: Path) -> tuple[bool, bool]:
        """Whether llama.cpp's mtmd, given this model and the projector file `mmproj`, encodes images and audio."""
        from llama_cpp import mtmd_cpp

        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.warmup = False, os.cpu_count(), False
        context = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), self.llm._model.model, params)
        if not context:
            raise RuntimeFailed(f"llama.cpp's mtmd did not load {mmproj.name} beside {Path(self.llm.model_path).name}")
        try:
            return bool(mtmd_cpp.mtmd_support_vision(context)), bool(mtmd_cpp.mtmd_support_audio(context))
        finally:
            mtmd_cpp.mtmd_free(context)

    def chat(self, message: str, max_tokens: int) -> str:
        self.llm.reset()
        reply = self.llm.create_chat_completion(messages=[{"role": "user", "content": message}], max_tokens=max_tokens,
                                                temperature=0)
        return reply["choices"][0]["message"]["content"] or ""
