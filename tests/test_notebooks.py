"""The exploration notebooks in notebooks/: committed clean, parameterised papermill-style, and
executed here with nbclient on their offline defaults (and with a parameter injected the way
papermill injects one), each in its own kernel whose working directory and temporary files stay
inside the test's tmp dir."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from traitlets import default

from pipeline.recipe import parse_recipe
from pipeline.run import make_plan

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
COMMITTED = sorted(NOTEBOOKS.glob("*.ipynb"))
PARAMETERS = "parameters"


def _code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def _python(cell) -> str:
    """A code cell's source without IPython magics and shell escapes."""
    return "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))


# ---------------------------------------------------------------- the committed files


def test_the_issue_notebooks_are_there():
    assert {"01_inspect_model.ipynb", "02_compare_schemes.ipynb", "03_kv_cache.ipynb",
            "04_ple_cache.ipynb"} <= {p.name for p in COMMITTED}


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_with_outputs_cleared_and_null_execution_counts(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [(i, len(cell.outputs), cell.execution_count) for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{path.name}: cells (index, outputs, execution_count) not cleared: {dirty}; " \
                      "clear them (Jupyter: Edit > Clear Outputs of All Cells) before committing"


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_one_parameters_cell_first_holding_only_assignments(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [cell for cell in nb.cells if PARAMETERS in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged {PARAMETERS!r}, want exactly 1"
    assert _code_cells(nb)[0] is tagged[0], f"{path.name}: the {PARAMETERS!r} cell must be the first code cell"
    # Papermill overrides parameters by assigning after this cell: plain assignments only.
    statements = ast.parse(tagged[0].source).body
    assert statements and all(isinstance(s, (ast.Assign, ast.AnnAssign)) for s in statements)


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_cells_use_only_the_public_api(path):
    nb = nbformat.read(path, as_version=4)
    private = []
    for cell in _code_cells(nb):
        for node in ast.walk(ast.parse(_python(cell))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pipeline":
                private += [f"{node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") or any(p.startswith("_") for p in node.module.split("."))]
    assert not private, f"{path.name} imports private names: {private}"


# ---------------------------------------------------------------- executed


class _ThisInterpreter(AsyncKernelManager):
    """A kernel on the interpreter running the tests (ipykernel's built-in spec), whatever
    other `python3` kernelspecs the machine has installed."""

    @default("kernel_spec_manager")
    def _kernel_spec_manager_default(self):
        return KernelSpecManager(kernel_dirs=[])


@pytest.fixture(scope="session")
def matplotlib_config(tmp_path_factory):
    return tmp_path_factory.mktemp("matplotlib")  # its font cache is built once per session


@pytest.fixture
def run_notebook(tmp_path, tiny_cache, matplotlib_config, monkeypatch):
    """Execute a notebook in a fresh kernel: cwd, TMPDIR, HF cache, matplotlib and IPython state
    in tmp_path; offline; the checkout under test first on the path."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    work, scratch = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    scratch.mkdir()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "GEMMA_QUANT_CACHE": str(tiny_cache),
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": str(matplotlib_config),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "TMPDIR": str(scratch),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }

    def run(name: str, real_weights: bool = False, **parameters):
        """`real_weights`: every core for the kernel's torch. Otherwise one thread unless told: on a loaded
        machine, OpenMP threads waiting on each other make small-tensor work (AutoRound on a tiny model)
        several times slower, while a real model's matmuls gain from every core."""
        threads = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() if real_weights else 1))
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        if parameters:  # as papermill does: a cell of assignments right after the `parameters` cell
            index = next(i for i, c in enumerate(nb.cells) if PARAMETERS in c.metadata.get("tags", []))
            injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
            injected.metadata["tags"] = ["injected-parameters"]
            nb.cells.insert(index + 1, injected)
        client = NotebookClient(nb, kernel_manager_class=_ThisInterpreter, timeout=600,
                                allow_errors=False, resources={"metadata": {"path": str(work)}})
        client.execute(env={**env, "OMP_NUM_THREADS": threads})
        errors = [o for cell in _code_cells(nb) for o in cell.outputs if o.output_type == "error"]
        assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
        assert all(cell.execution_count is not None for cell in _code_cells(nb))
        return nb, scratch

    return run


def _text(nb) -> str:
    """Everything the notebook showed: streams, results and displays (plain text, HTML, markdown)."""
    parts = []
    for cell in _code_cells(nb):
        for out in cell.outputs:
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                parts += [out.data[kind] for kind in ("text/plain", "text/html", "text/markdown") if kind in out.data]
    return "\n".join(parts)


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in _code_cells(nb) for out in cell.outputs)


def _expected_plans(model_id: str) -> dict:
    plans = {}
    for scheme, group_size in (("W4A16", 128), ("W8A16", None)):
        recipe = parse_recipe({"name": "t", "model": model_id, "scheme": scheme, "group_size": group_size})
        plans[scheme] = make_plan(recipe, "<test>")[2]
    return plans


@pytest.mark.parametrize("model_id", [None, "google/gemma-4-E2B-it"], ids=["default-tiny-e2b", "hub-id-offline"])
def test_inspect_model_shows_the_plan_tables_and_chart(model_id, run_notebook):
    expected = _expected_plans(model_id or "tiny:e2b")  # also builds the tiny source the kernel reuses
    nb, _ = run_notebook("01_inspect_model.ipynb", **({"MODEL_ID": model_id} if model_id else {}))
    shown = _text(nb)
    for label, plan in (("W4A16 (group 128)", expected["W4A16"]), ("W8A16 (per-channel)", expected["W8A16"])):
        c = plan.counts()
        assert f"{label}: {c['quantized']} of {c['linear']} Linear layers quantized, {c['kept']} kept in BF16" in shown
        assert f"{plan.export_bytes / plan.bf16_bytes:.1%})" in shown  # the size line, vs BF16
    for row in ("text_decoder", "sliding_attention", "full_attention", "q_proj", "down_proj",
                "vision tower", "audio tower", "Per-Layer-Embedding", "tied, stored once", "norms and scalars"):
        assert row in shown, row
    assert "W4A16, group 128" in shown and "W8A16, per-channel" in shown  # the `stored as` column
    assert "Mixed policies" in "".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert _images(nb) == 1  # the size-by-component bar chart
    if model_id:
        assert model_id in shown and "hidden size" in shown


def test_compare_schemes_quantizes_three_ways_and_reads_eval_json(run_notebook):
    nb, scratch = run_notebook("02_compare_schemes.ipynb")
    roots = list(scratch.glob("gemma-quant-compare-*"))
    assert len(roots) == 1, "runs go to one new folder under TMPDIR"
    root = roots[0]
    runs = ("rtn-w8a16", "rtn-w4a16", "autoround-w4a16")
    reports = {name: json.loads((root / name / "eval.json").read_text()) for name in runs}
    manifests = {name: json.loads((root / name / "manifest.json").read_text()) for name in runs}
    assert {name: (m["recipe"]["model"]["id"], m["recipe"]["algorithm"], m["recipe"]["scheme"])
            for name, m in manifests.items()} == {"rtn-w8a16": ("tiny:31b", "rtn", "W8A16"),
                                                  "rtn-w4a16": ("tiny:31b", "rtn", "W4A16"),
                                                  "autoround-w4a16": ("tiny:31b", "autoround", "W4A16")}
    ar = manifests["autoround-w4a16"]["recipe"]
    assert ar["autoround"]["iters"] == 8 and (ar["calibration"]["samples"], ar["calibration"]["seq_len"]) == (4, 64)
    assert all(r["passed"] and (r["quality"]["samples"], r["quality"]["seq_len"]) == (4, 128) for r in reports.values())

    # The notebook's table is the runs' eval.json, row for row.
    table = (root / "comparison.csv").read_text().splitlines()
    assert table[0].split(",")[:4] == ["run", "algorithm", "scheme", "group"]
    rows = {line.split(",")[0]: line.split(",") for line in table[1:]}
    header = table[0].split(",")
    for name, report in reports.items():
        row = dict(zip(header, rows[name]))
        assert float(row["KL mean"]) == pytest.approx(report["quality"]["kl_mean"])
        assert float(row["top-1"]) == pytest.approx(report["quality"]["top1_agreement"])
        assert float(row["weights MB"]) == pytest.approx(report["sizes"]["export_weights_bytes"] / 1e6)
    # 4-bit exports are smaller than the 8-bit one, which is smaller than BF16.
    sizes = {name: r["sizes"]["export_weights_bytes"] for name, r in reports.items()}
    assert sizes["rtn-w4a16"] == sizes["autoround-w4a16"] < sizes["rtn-w8a16"] < reports["rtn-w8a16"]["sizes"]["source_weights_bytes"]

    shown = _text(nb)
    assert all(name in shown for name in runs) and str(root) in shown
    for generation in reports["autoround-w4a16"]["generations"]:  # the side-by-side generations table
        assert generation["prompt"] in shown
    assert _images(nb) == 1  # KL / top-1 / size


@pytest.mark.slow
def test_compare_schemes_on_real_gemma3_270m(run_notebook):
    # the smallest budgets that still tell 8 from 4 bits on real weights (0.97 vs 0.8 top-1 on 8k tokens): the
    # real-weight path through the notebook is what this adds to the tiny run above
    nb, scratch = run_notebook("02_compare_schemes.ipynb", real_weights=True, MODEL_ID="gguf:gemma3-270m",
                               AUTOROUND_ITERS=2, CALIBRATION_SAMPLES=2, EVAL_SAMPLES=2, MAX_NEW_TOKENS=4)
    root = next(scratch.glob("gemma-quant-compare-*"))
    quality = {name: json.loads((root / name / "eval.json").read_text())["quality"]
               for name in ("rtn-w8a16", "rtn-w4a16", "autoround-w4a16")}
    assert quality["rtn-w8a16"]["kl_mean"] < quality["rtn-w4a16"]["kl_mean"]
    assert quality["rtn-w8a16"]["top1_agreement"] >= 0.9
    assert "gguf:gemma3-270m" in _text(nb)


@pytest.mark.slow  # real weights: minutes of BF16 decoding (the cache is measured in the dtype it is served in)
def test_kv_cache_notebook_generates_on_gemma3_270m_and_tabulates_memory_and_quality(run_notebook):
    import csv

    nb, scratch = run_notebook("03_kv_cache.ipynb", real_weights=True)
    shown = _text(nb)
    assert "gguf:gemma3-270m: 18 layers" in shown and "4-bit, Hadamard:" in shown
    with (scratch.parent / "work" / "kv_cache_table.csv").open() as f:  # the kernel's working directory
        table = list(csv.DictReader(f))
    assert len(table) == 6  # BITS × ROTATIONS of the parameters cell
    by = {(int(r["bits"]), r["rotation"]): r for r in table}
    for rotation in ("none", "quaternion", "hadamard"):
        two, four = by[(2, rotation)], by[(4, rotation)]
        assert float(two["vs DynamicCache"]) < float(four["vs DynamicCache"]) < 0.5  # packed bits, real memory
        assert float(four["kl_mean"]) < float(two["kl_mean"])
        assert f"{int(four['KV bytes']):,}" in shown
    # ~0.043-0.051 measured, by CPU (bf16 kernels differ); without a rotation ~0.2
    assert float(by[(4, "hadamard")]["kl_mean"]) < 0.08 and float(by[(4, "hadamard")]["top1"]) >= 0.8
    assert float(by[(4, "hadamard")]["kl_mean"]) < 0.5 * float(by[(4, "none")]["kl_mean"])


@pytest.mark.parametrize("text", [None, "Guten Tag! Der Cache liest die seltenen Zeilen aus der Datei."],
                         ids=["04-default-text", "04-typed-text"])
def test_ple_cache_notebook_shows_memory_hit_rates_and_bit_identical_output(text, run_notebook):
    import csv
    import re

    nb, scratch = run_notebook("04_ple_cache.ipynb", **({"text": text} if text else {}))
    shown = _text(nb)
    assert "logits bit-identical to the whole table: True; greedy tokens identical: True" in shown
    tokens = int(re.search(r"your text is (\d+) tokens", shown).group(1))
    assert "whole, float32" in shown and "PLECache, 64 hot rows" in shown and "RssAnon MiB" in shown
    with (scratch.parent / "work" / "ple_cache_hits.csv").open() as f:  # the kernel's working directory
        rows = {r["policy"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"static", "lru"}
    for row in rows.values():
        assert row["same tokens as the whole table"] == "True"
        # generate: the prompt's tokens, then one per new token after the first (fewer if it stops at EOS)
        assert tokens <= int(row["tokens looked up"]) <= tokens + 7
        assert 0 <= int(row["hits"]) < int(row["tokens looked up"]) and int(row["hot rows"]) == 64
        # 64 of 1,024 rows, held in the notebook's float32; the table's bytes as stored, in BF16
        assert int(row["hot rows' bytes"]) * 1024 == 64 * int(row["table bytes (stored)"]) * 2
    assert int(rows["static"]["hits"]) > 0  # the calibration text's frequent ids are in any text
