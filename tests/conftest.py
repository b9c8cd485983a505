import os
from pathlib import Path

import pytest
import yaml

# Tests never reach the network; tiny models are built into a per-session cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A vLLM start costs half a minute or more: validation's serve check runs only in the serve tests
# (tests/test_serve.py), which point it back at vLLM's environment.
os.environ["GEMMA_QUANT_VLLM"] = "off"
# `make test` runs the fast tier on pytest-xdist workers, one per core: each worker computes on one
# thread, so two workers never fight over two cores (set before torch is imported).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

VARIANTS = ["e2b", "e4b", "31b", "26b-a4b"]
SLOW_TIMEOUT_S = 2400  # the slowest real-weight test takes minutes: only a hang should reach this


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.fixture(autouse=True)
def torch_global_state():
    """A test leaves torch's process-wide settings as it found them: the next test (and its timing)
    must not inherit another's thread count, default dtype, grad mode or deterministic mode."""
    import torch

    def state():
        return (torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled(),
                torch.are_deterministic_algorithms_enabled())

    before = state()
    yield
    after = state()
    torch.set_num_threads(before[0])
    torch.set_default_dtype(before[1])
    torch.set_grad_enabled(before[2])
    torch.use_deterministic_algorithms(before[3])
    assert after == before, f"the test changed torch's global state (threads, dtype, grad, deterministic): {before} -> {after}"


def read_tensors(folder: Path) -> dict:
    """Every tensor of a folder's safetensors files, by key."""
    from safetensors import safe_open

    found = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            found.update({k: f.get_tensor(k) for k in f.keys()})
    return found


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("gemma-quant-cache")
    os.environ["GEMMA_QUANT_CACHE"] = str(cache)
    return cache


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe dict to a YAML file in tmp_path, with its run directory in tmp_path."""

    def write(name: str = "test-recipe", **fields) -> Path:
        fields.setdefault("output_dir", str(tmp_path / "runs" / name))
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(fields, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="session")
def validated_run(tmp_path_factory):
    """One tiny E2B W4A16 run, quantized, validated and given its card; tests that change it copy it."""
    from pipeline.run import quantize_run

    root = tmp_path_factory.mktemp("validated")
    recipe = root / "tiny-card.yaml"
    recipe.write_text(f"# a tiny run for the card and publish tests\nmodel: tiny:e2b\nscheme: W4A16\n"
                      f"output_dir: {root / 'run'}\neval: {{samples: 2, seq_len: 64, max_new_tokens: 4}}\n")
    quantize_run(recipe)
    return root / "run"


@pytest.fixture
def validated_copy(validated_run, tmp_path):
    import shutil

    return Path(shutil.copytree(validated_run, tmp_path / "run"))


def gptq_integers(stored: dict, name: str, bits: int):
    """Signed integers [out, in] from the GPTQ layout, unpacked independently of the packer:
    qweight packs 32 / bits values per int32 along the input dim (low bits first), qzeros stores
    zero − 1 along the output dim."""
    import torch

    per_word = 32 // bits
    mask = 2 ** bits - 1
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    qweight = stored[f"{name}.qweight"]
    unsigned = ((qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask).reshape(-1, qweight.shape[1])  # [in, out]
    qzeros = stored[f"{name}.qzeros"]
    zeros = (((qzeros.unsqueeze(-1) >> shifts) & mask).reshape(qzeros.shape[0], -1) + 1)  # [groups, out]
    group = unsigned.shape[0] // zeros.shape[0]
    signed_zero = zeros.repeat_interleave(group, 0)
    return (unsigned - signed_zero).t()


def needs_llama_cpp():
    """Skip where `make llama-setup` has not run, saying why; in CI, which runs it, fail instead."""
    from pipeline.runtimes.llamacpp import why_missing

    if reason := why_missing():
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI runs `make llama-setup` before the tests")
        pytest.skip(reason)


VLLM_PYTHON = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"


def vllm_load(folder: Path, draft: Path | None = None):
    """tests/vllm_loader.py on `folder` in vLLM's environment: skip where `make vllm-setup` has not run; in CI,
    which runs it, fail instead. The completed process: its last stdout line is `RESULT {json}`."""
    import subprocess

    if not VLLM_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{VLLM_PYTHON} is missing: CI runs `make vllm-setup` before the tests")
        pytest.skip("vLLM's venv is not built here (make vllm-setup)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return subprocess.run([str(VLLM_PYTHON), str(Path(__file__).with_name("vllm_loader.py")), str(folder),
                           *(["--draft", str(draft)] if draft else [])],
                          capture_output=True, text=True, timeout=600, cwd=folder, env=env)


def quantize_cli(recipe: Path) -> None:
    """`gemma-quant quantize RECIPE` in a process of its own, as users run it: a real-weight run's speed and
    numbers cannot depend on what earlier tests left in the test process."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "quantize", str(recipe)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
