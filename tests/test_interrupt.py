"""A run killed or interrupted anywhere leaves the previous export, its card and manifest byte for byte;
the next run removes what the killed one left and succeeds. A run that fails validation keeps its own
export in rejected/ and the previous one in place."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.run import quantize_run
from pipeline.rundir import RUN_MARK
from pipeline.runlock import LOCK

ROOT = Path(__file__).resolve().parents[1]
# Ctrl-C as a terminal delivers it: Python's KeyboardInterrupt handler, even where this test runs as a background
# job of a shell without job control (which starts its children with SIGINT ignored, and Python keeps it so).
QUANTIZE = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from pipeline.cli import main; sys.exit(main(['quantize', sys.argv[1]]))")


def _recipe(tmp_path: Path, **extra) -> Path:
    path = tmp_path / "r.yaml"
    fields = {"model": "tiny:31b", "scheme": "W4A16", "output_dir": str(tmp_path / "run"),
              "eval": "{samples: 2, seq_len: 64, max_new_tokens: 2}", **extra}
    path.write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))
    return path


def _state(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of the run that a user reads: the export (card included), manifest, eval, plan."""
    files = [p for p in run_dir.rglob("*") if p.is_file() and p.relative_to(run_dir).parts[0] in
             ("export", "manifest.json", "eval.json", "eval.md", "plan.json", "memory_plan.json", "export_digests.json")]
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _left_behind(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".") and p.name not in (LOCK, RUN_MARK))


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("interrupt")
    recipe = _recipe(tmp_path)
    quantize_run(recipe)
    return recipe, tmp_path / "run"


def _kill_when(recipe: Path, run_dir: Path, reached, sig: int) -> subprocess.CompletedProcess:
    """Start `gemma-quant quantize` and send `sig` once `reached(run_dir)` holds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-c", QUANTIZE, str(recipe)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 300
    while not reached(run_dir):
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.communicate()[0] if proc.poll() is not None else ""
            proc.kill()
            pytest.fail(f"the run ended (or timed out) before the kill point: {out[-2000:]}")
        time.sleep(0.02)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def _stage_started(name: str, logs_before: int):
    """The kill point: the new run's log says the stage has started."""
    def reached(run_dir: Path) -> bool:
        logs = sorted((run_dir / "logs").glob("quantize-*.log"))
        return len(logs) > logs_before and f"stage {name} ..." in logs[-1].read_text()
    return reached


def _validation_writing_logits(logs_before: int):
    """The kill point: the new run's validation has written logits to disk (its log says it has started,
    so what a killed run left is gone by then)."""
    started = _stage_started("validate", logs_before)
    return lambda run_dir: started(run_dir) and any(run_dir.glob(".candidate-*/.eval-*/quantized-*.pt"))


@pytest.mark.parametrize("sig, point", [
    (signal.SIGKILL, "validation"), (signal.SIGINT, "validation"),
    (signal.SIGKILL, "reload_check"), (signal.SIGINT, "quantize"),
], ids=["kill-in-validation", "ctrl-c-in-validation", "kill-in-reload-check", "ctrl-c-in-quantize"])
def test_a_killed_run_leaves_the_previous_export_card_and_manifest(good_run, sig, point):
    recipe, run_dir = good_run
    before = _state(run_dir)
    assert "export/README.md" in before and "manifest.json" in before
    logs_before = len(list((run_dir / "logs").glob("quantize-*.log")))
    reached = (_validation_writing_logits if point == "validation" else partial(_stage_started, point))(logs_before)
    result = _kill_when(recipe, run_dir, reached, sig)
    assert _state(run_dir) == before
    if sig == signal.SIGINT:
        assert result.returncode == 130 and "Traceback" not in result.stdout, result.stdout[-3000:]
        assert "interrupted; the previous export, card and manifest are left as they were" in result.stdout
        assert _left_behind(run_dir) == []  # an interrupted run cleans up after itself
    else:
        assert result.returncode == -signal.SIGKILL
        assert _left_behind(run_dir)  # a killed one cannot: the next run does


def test_the_next_run_removes_what_a_killed_run_left_and_succeeds(good_run):
    recipe, run_dir = good_run
    (run_dir / ".candidate-killed" / "export").mkdir(parents=True)
    (run_dir / ".eval-killed").mkdir()
    quantize_run(recipe)
    assert _left_behind(run_dir) == []
    log = sorted((run_dir / "logs").glob("quantize-*.log"))[-1].read_text()
    assert "removing .candidate-killed, left by an interrupted run" in log
    assert "removing .eval-killed, left by an interrupted run" in log


def test_a_run_that_fails_validation_keeps_the_previous_export(good_run, tmp_path, capsys):
    recipe, run_dir = good_run
    before = _state(run_dir)
    tight = _recipe(tmp_path, output_dir=str(run_dir), gates="{kl_mean_max: 0.000001}")
    assert main(["quantize", str(tight)]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert f"kept in {run_dir / 'rejected'}; the previous export is left in place" in out
    assert _state(run_dir) == before
    rejected = run_dir / "rejected"
    assert "**Validation: failed.**" in (rejected / "export" / "README.md").read_text()
    assert '"status": "failed_validation"' in (rejected / "manifest.json").read_text()
    assert _left_behind(run_dir) == []


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def _run_dir_with_candidate(root: Path) -> tuple[Path, Path]:
    run_dir, candidate = root / "run", root / "run" / ".candidate-new"
    for folder, tag in ((run_dir, "old"), (candidate, "new")):
        (folder / "export").mkdir(parents=True)
        (folder / "export" / "model.safetensors").write_text(tag)
        for name in ("plan.json", "export_digests.json", "manifest.json"):
            (folder / name).write_text(tag)
    (run_dir / "eval.json").write_text("old")  # the new run was not validated: its promotion removes it
    return run_dir, candidate


@pytest.mark.parametrize("cut_at", range(1, 6))
def test_a_promotion_cut_short_at_any_rename_is_finished_by_the_next_run(tmp_path, monkeypatch, cut_at):
    """Between the export's swap and the manifest's, a killed run would leave a new export beside the
    previous manifest: the next run finishes the promotion written down before the first rename."""
    import pipeline.export as export
    import pipeline.run as run

    run_dir, candidate = _run_dir_with_candidate(tmp_path)
    real, calls = os.replace, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == cut_at:
            raise _Killed
        real(src, dst)

    renames = [export.Path.rename]

    def path_rename(self, target):
        calls.append(target)
        if len(calls) == cut_at:
            raise _Killed
        return renames[0](self, target)

    monkeypatch.setattr(run.os, "replace", rename)
    monkeypatch.setattr(export.Path, "rename", path_rename)
    with pytest.raises(_Killed):
        run.promote(candidate, run_dir)
    monkeypatch.undo()
    run.clear_interrupted(run_dir)
    files = {str(p.relative_to(run_dir)): p.read_text() for p in run_dir.rglob("*") if p.is_file()}
    new = {"export/model.safetensors": "new", "plan.json": "new", "export_digests.json": "new", "manifest.json": "new"}
    # Cut 1 is the write of the promotion's own record: nothing moved yet, the previous run stays whole.
    assert files == ({**dict.fromkeys(new, "old"), "eval.json": "old"} if cut_at == 1 else new)
