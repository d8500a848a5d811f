"""Where the registry is and how every call to it is bounded: model references, URIs, reachability, deadlines.

Every function of :mod:`harden.registry` takes the tracking URI explicitly (``sqlite:///<dir>/mlflow.db``
embedded, or an ``http://`` server); the registry URI is the same. Nothing global is left changed:
``mlflow.onnx.log_model`` reads the global tracking URI, so it runs inside :func:`global_tracking_uri`, which
restores the previous value.

A registry that stops answering must not hang a stage: :func:`wait_reachable` fails fast on a dead server,
:func:`bounded_http` lowers MLflow's own HTTP retries, and :class:`Deadline` gives every call of one operation
a shared deadline.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from harden.errors import RegistryError
from harden.params import MODEL_REF

logger = logging.getLogger(__name__)

#: Every registration shares one deadline (seconds): a registry that stops answering mid-promote ends it
#: within DEADLINE_S plus one call's bound (below), with a RegistryError that says what the registry holds.
DEADLINE_S = 300.0
#: One HTTP call's bound: MLflow's own retries (default 7 with backoff factor 2, about 8.5 minutes) lowered to
#: 2 retries, backoff factor 1, 10 s timeout, unless the user set these variables; set only while we call MLflow.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
#: The first bytes of every SQLite database file.
SQLITE_MAGIC = b"SQLite format 3\x00"
_NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"


def parse_model_ref(ref: str) -> tuple[str, str | None, int | None]:
    """Split ``models:/name@alias``, ``models:/name/3``, ``name@alias`` or ``name/3``.

    Returns:
        ``(name, alias, version)`` with exactly one of alias/version set.

    Raises:
        RegistryError: ``ref`` has none of these forms.
    """
    match = MODEL_REF.match(ref.strip())
    if match is None:
        raise RegistryError(f"bad model reference {ref!r}: expected 'models:/NAME@ALIAS', 'models:/NAME/VERSION', "
                            "'NAME@ALIAS' or 'NAME/VERSION'")
    version = match["version"]
    return match["name"], match["alias"], int(version) if version is not None else None


def strip_credentials(uri: str) -> str:
    """``uri`` without ``user:password@`` (safe to record in provenance and logs)."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def wait_reachable(tracking_uri: str, *, retries: int = 3, backoff_s: float = 0.5, timeout_s: float = 5.0) -> None:
    """For an ``http(s)`` URI, check the server answers, retrying with exponential backoff.

    Any HTTP response (even 401/404) counts as reachable; refused connections, DNS errors and timeouts do
    not. Other schemes (``sqlite``, ``file``) are local and return at once. This bounds the time lost on a
    dead server (MLflow's own HTTP retries would otherwise wait minutes).

    Raises:
        RegistryError: still unreachable after ``retries`` attempts.
    """
    if urlsplit(tracking_uri).scheme not in ("http", "https"):
        return
    last: Exception | None = None
    for attempt in range(max(1, retries)):
        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as err:
            last = err
            logger.warning("registry %s unreachable (attempt %d/%d): %s", strip_credentials(tracking_uri),
                           attempt + 1, retries, err)
            if attempt + 1 < retries:
                time.sleep(backoff_s * 2 ** attempt)
    raise RegistryError(f"MLflow registry at {strip_credentials(tracking_uri)} is unreachable after "
                        f"{max(1, retries)} attempts: {last}")


def check_store_exists(tracking_uri: str, *, may_create: bool = False) -> None:
    """For a ``sqlite:///PATH`` URI, refuse a database file that does not exist (unless ``may_create``), and
    a file that exists but is not an SQLite database (an empty file included).

    MLflow silently creates a new, empty database (and its directories) for a mistyped path, and writes its
    schema into any empty file; reading from that would fail later with a misleading "model does not exist".
    Other schemes return at once. An environment with MLflow's client only (mlflow-skinny: the container image,
    or an install without the ``[local]`` extra) has no SQL store, and is told so here rather than by MLflow's
    "unsupported URI" deep in a traceback.

    Raises:
        RegistryError: no SQL store in this environment, or the sqlite database file is missing, or is not an
            SQLite database.
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return
    if importlib.util.find_spec("sqlalchemy") is None:  # what MLflow checks before it offers its SQL store
        raise RegistryError(f"tracking URI {tracking_uri}: an sqlite registry needs the full mlflow package "
                            "(pip install 'nft-harden[local]', as `make install` does); this environment has "
                            "MLflow's client only (mlflow-skinny, as in the container image): use an MLflow server")
    db = Path(tracking_uri[len(prefix):])
    if not db.exists():
        if may_create:
            return
        raise RegistryError(f"no MLflow database at {db} (tracking URI {tracking_uri}): wrong base.tracking_uri?")
    try:
        with open(db, "rb") as fh:
            magic = fh.read(len(SQLITE_MAGIC))
    except OSError as err:
        raise RegistryError(f"cannot read the MLflow database {db}: {err}") from err
    if magic != SQLITE_MAGIC:
        raise RegistryError(f"{db} is not an SQLite database ({db.stat().st_size} bytes; tracking URI "
                            f"{tracking_uri}); refusing to let MLflow write its schema into it")


def connect(tracking_uri: str) -> MlflowClient:
    """An MLflow client with ``tracking_uri`` as both its tracking and its registry URI."""
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@contextmanager
def bounded_http() -> Iterator[None]:
    """MLflow's HTTP retries and timeout bounded by :data:`HTTP_BOUNDS` (where the user set none), restored after."""
    added = {k: v for k, v in HTTP_BOUNDS.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class Deadline:
    """An MlflowClient whose every call first checks a shared deadline (RegistryError once it has passed)."""

    def __init__(self, client: MlflowClient, seconds: float, what: str):
        self._client, self._end, self._seconds, self._what = client, time.monotonic() + seconds, seconds, what

    @classmethod
    def on(cls, tracking_uri: str, what: str) -> Deadline:
        """A client on ``tracking_uri`` whose calls for ``what`` share :data:`DEADLINE_S` (read at each call)."""
        return cls(connect(tracking_uri), DEADLINE_S, what)

    def renewed(self, seconds: float, what: str) -> Deadline:
        """The same client with a fresh deadline of its own (for a clean-up after the shared one ran out)."""
        return Deadline(self._client, seconds, what)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if time.monotonic() > self._end:
                raise RegistryError(f"{self._what}: the {self._seconds:.0f} s deadline passed before {name}")
            return attr(*args, **kwargs)
        return call


#: What the registry functions take: a plain client, or one bounded by a :class:`Deadline`.
Client = MlflowClient | Deadline


@contextmanager
def global_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """Temporarily set MLflow's global tracking URI (for fluent-only APIs), then restore the previous one."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # None unsets it; MLflow's annotation omits it


def is_not_found(err: MlflowException) -> bool:
    """Whether ``err`` says the model, version, alias or artifact asked for does not exist."""
    return err.error_code == _NOT_FOUND or "not found" in str(err).lower()
