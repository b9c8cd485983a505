"""One process at a time in a run directory.

quantize, validate, card and publish each rewrite files of the run directory (the export, the manifest,
the card); two at once would interleave them. Each holds an exclusive `flock` on `<run dir>/.lock`
while it runs, and a second process refuses at once, naming the first. The kernel drops the lock when
its holder exits, however it exits, so a killed run never leaves the directory locked.
"""

from __future__ import annotations

import fcntl
import functools
import os
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

LOCK = ".lock"

# Locks this process holds, by run directory, with how many callers hold each: quantize validates and
# cards inside its own lock, and a second flock on a new descriptor would refuse this same process.
_held: dict[Path, list] = {}


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock."""


@contextmanager
def run_lock(run_dir: Path):
    key = Path(run_dir).resolve()
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    key.mkdir(parents=True, exist_ok=True)
    fd = os.open(key / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunDirBusy(f"{run_dir} is in use by {holder}; wait for it to finish, or use another run directory "
                         "(output_dir or --run-dir)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} ({_command()}, since {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC)\n"
              .encode(), 0)
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        _held[key][1] -= 1
        if not _held[key][1]:
            del _held[key]
            os.close(fd)  # closing the last descriptor releases the flock


def holds_run_lock(function):
    """Run `function(run_dir, ...)` inside the run directory's lock."""

    @functools.wraps(function)
    def locked(run_dir, *args, **kwargs):
        with run_lock(run_dir):
            return function(run_dir, *args, **kwargs)

    return locked


def _command() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return " ".join([name, *sys.argv[1:3]])[:120]
