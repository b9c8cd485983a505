"""Two processes in one run directory: the second refuses at once, naming the first."""

import subprocess
import sys
import time

import pytest

from pipeline.cli import main
from pipeline.runlock import RunDirBusy, run_lock
from pipeline.validate import validate_run

HOLD = "import sys, time; from pipeline.runlock import run_lock\nwith run_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(60)"


@pytest.fixture
def held(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield tmp_path / "run", holder.pid
    holder.kill()
    holder.wait()


def test_second_process_refused_naming_the_first(held, write_recipe, capsys):
    run_dir, pid = held
    with pytest.raises(RunDirBusy, match=f"is in use by process {pid} "):
        validate_run(run_dir)
    path = write_recipe("locked", model="tiny:e2b", scheme="W4A16")
    assert main(["quantize", str(path), "--run-dir", str(run_dir)]) == 1
    assert f"in use by process {pid}" in capsys.readouterr().out.replace("\n", "")


def test_lock_is_reentrant_and_freed_when_the_holder_dies(held):
    run_dir, pid = held
    subprocess.run(["kill", "-9", str(pid)], check=True)
    for _ in range(50):  # the kernel drops the flock once the process is gone
        try:
            with run_lock(run_dir), run_lock(run_dir):
                break
        except RunDirBusy:
            time.sleep(0.1)
    else:
        pytest.fail("the lock of a killed process was not released")
