"""What a person running the pipeline locally sees: one line per task with its status and duration, while every
component's own output (executor input dumps, runner warnings, library logs) goes to a log file.

``kfp.local`` runs each component as a subprocess that inherits this process's stdout and stderr and logs the task
boundaries itself ("Executing task 'X'", "Task 'X' finished with status S"). :func:`tasks_to_log` points both file
descriptors at the log (so the subprocesses write there too) and follows the log from a thread, printing a line
on the real terminal for each task that finishes. On a terminal, the running task's latest progress-bar line
(:mod:`nft_core.progress` writes them to the log) shows below, redrawn in place.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import TextIO

#: kfp.local's task-boundary lines, once its ANSI colours are stripped.
TASK_STARTED = re.compile(r"Executing task '(?P<task>[^']+)'")
TASK_FINISHED = re.compile(r"Task '(?P<task>[^']+)' finished with status (?P<status>\w+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: kfp.local's timestamp at the start of its own log lines (HH:MM:SS.mmm)
STAMP = re.compile(r"^(\d\d):(\d\d):(\d\d(?:\.\d+)?) ")
#: A progress-bar line (nft_core.progress in a log): ``NFT:  45%|####5     | 45/100 [00:20<00:24, 2.21epoch/s]``
BAR = re.compile(r"^\s*(?P<desc>[\w -]{1,40}):\s+\d+%\|.*\|\s*(?P<n>\d+)/(?P<total>\d+)\b")
#: Clears the terminal line the cursor is on.
CLEAR = "\r\x1b[K"


class _Follower(threading.Thread):
    """Reads ``log`` from ``offset`` as it grows; prints a line to ``out`` for every task that finishes."""

    def __init__(self, log: Path, offset: int, out: TextIO) -> None:
        super().__init__(daemon=True)
        self.log, self.offset, self.out = log, offset, out
        self.done = threading.Event()
        self.started: dict[str, float] = {}
        self.live = out.isatty()  # progress redrawn in place only on a terminal (never in a captured output)
        self.status = False  # a progress line is on the terminal now

    def run(self) -> None:
        with open(self.log, encoding="utf-8", errors="replace") as f:
            f.seek(self.offset)
            pending = ""
            while True:
                chunk = f.read()
                if chunk:
                    *lines, pending = (pending + chunk).split("\n")
                    for line in lines:
                        self.handle(ANSI.sub("", line))
                elif self.done.is_set():
                    break
                else:
                    time.sleep(0.1)
        if self.status:  # the run ended with a task's progress on the screen (it failed without a status line)
            self.out.write(CLEAR)
            self.out.flush()

    def handle(self, line: str) -> None:
        if started := TASK_STARTED.search(line):
            self.started[started["task"]] = _when(line)
        elif finished := TASK_FINISHED.search(line):
            task = finished["task"]
            took = (_when(line) - self.started.pop(task, _when(line))) % 86400  # a run may pass midnight
            self.out.write(f"{CLEAR if self.status else ''}  {task:<20} {finished['status']:<8} {took:7.1f}s\n")
            self.status = False
            self.out.flush()
        elif self.live and self.started and (progress := BAR.match(line)):
            task = next(reversed(self.started))  # the task started last and not finished yet
            self.out.write(f"{CLEAR}  {task:<20} running  {progress['desc'].strip()} {progress['n']}/{progress['total']}")
            self.status = True
            self.out.flush()


def _when(line: str) -> float:
    """Seconds since midnight of kfp's timestamp on ``line`` (the time of reading when it has none)."""
    if stamp := STAMP.match(line):
        return 3600 * int(stamp[1]) + 60 * int(stamp[2]) + float(stamp[3])
    now = time.localtime()
    return 3600 * now.tm_hour + 60 * now.tm_min + now.tm_sec + time.time() % 1


@contextmanager
def tasks_to_log(log: Path) -> Iterator[None]:
    """Inside the block, this process's stdout and stderr (the file descriptors, so every subprocess's too, and
    the ``sys`` streams) append to ``log``, and each finished kfp.local task is announced on the terminal in one
    line. Restored on exit, also after an error."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", encoding="utf-8")
    with open(log, "ab") as sink:
        offset = sink.tell()
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
    follower = _Follower(log, offset, terminal)
    follower.start()
    # Python-level writers too: kfp.local's log handler takes whatever ``sys.stdout`` is when the run starts
    stream = open(log, "a", encoding="utf-8", buffering=1)
    try:
        with stream, redirect_stdout(stream), redirect_stderr(stream):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        follower.done.set()
        follower.join()
        terminal.close()
