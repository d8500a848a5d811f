"""Progress bars that suit where they are shown.

On a terminal, :func:`bar` is a plain tqdm bar. Where stderr is not a terminal (a Kubernetes pod's log, the log
file a local pipeline run writes, ``dvc repro`` capturing a stage) tqdm's carriage-return redraws would pile up
into one endless line; there each redraw becomes a line of its own, at most one every :data:`LOG_INTERVAL_S`
seconds, so a log shows ``NFT:  45%|####5     | 45/100 [00:20<00:24, 2.21epoch/s]`` now and then and a reader
(or :mod:`pipeline.terminal`) can follow it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

#: Seconds between two lines of a bar written to a log (not a terminal).
LOG_INTERVAL_S = 5.0


class _Lines:
    """A file for tqdm that writes each redraw (``"\\rstatus"``) as one line and drops blank ones and repeats
    (closing a bar redraws its last state)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm[T]:
    """``tqdm(iterable, **kwargs)``, writing whole lines at most every :data:`LOG_INTERVAL_S` seconds when
    stderr (looked up now, so redirections apply) is not a terminal."""
    stream = sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not kwargs.get("disable") and "file" not in kwargs and not (isatty is not None and isatty()):
        kwargs |= {"file": _Lines(stream), "ascii": True, "ncols": 100, "mininterval": LOG_INTERVAL_S}
    return tqdm(iterable, **kwargs)
