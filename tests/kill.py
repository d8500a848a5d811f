"""Kill a process with SIGKILL once its checkpoint shows progress: the crash the resume tests recover from.

Import it explicitly (``from kill import sigkill_after_checkpoint``; pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import torch


def sigkill_after_checkpoint(cmd: Sequence[str], checkpoint: Path, *, min_epoch: int = 1, timeout_s: float = 180,
                             quiet: bool = False) -> int:
    """Start ``cmd`` in its own session, SIGKILL its whole process group as soon as ``checkpoint`` records
    ``min_epoch`` epochs (or the run ends, or ``timeout_s`` passes), and return the epochs the checkpoint holds.
    ``quiet`` discards the child's output.

    One thread (``OMP_NUM_THREADS=1``) keeps the child's numbers equal to an in-process rerun's."""
    out = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(list(cmd), start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=out, stderr=out)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if checkpoint.exists() and _epoch(checkpoint) >= min_epoch:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return _epoch(checkpoint)


def _epoch(checkpoint: Path) -> int:
    try:
        return int(torch.load(checkpoint, weights_only=True)["epoch"])
    except (OSError, RuntimeError, EOFError):  # replaced between exists() and the read: not a finished write
        return 0
