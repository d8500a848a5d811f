"""Shared fixtures: real MLflow registries (embedded sqlite, and an ``mlflow server`` on loopback), small
model packages, and deselection of GPU tests on machines without CUDA."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

SERVER_START_TIMEOUT_S = 90.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not _healthy(url):
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server not healthy after {SERVER_START_TIMEOUT_S}s: {log.read_text()[-2000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` (sqlite backend, served artifacts) on a free loopback port; yields its URL.

    Started once per session, waited on until ``/health`` answers (bounded), stopped at the end.
    """
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--serve-artifacts",
             "--artifacts-destination", str(root / "mlartifacts"),
             "--uvicorn-opts", "--timeout-graceful-shutdown 3"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
        )
        try:
            _wait_healthy(url, proc, root / "server.log")
            yield url
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


@pytest.fixture(scope="session")
def sqlite_registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An embedded MLflow tracking/registry URI backed by sqlite in a temporary directory.

    Session-scoped (creating the schema takes seconds); tests stay independent by using unique model names. The
    database is created here, so that whichever test uses it first finds a registry (a pull from a sqlite URI
    whose file does not exist is refused, by design).
    """
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow-sqlite')}/mlflow.db"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models(max_results=1)  # creates the schema
    return uri


@pytest.fixture(params=["sqlite", "server"])
def registry_uri(request: pytest.FixtureRequest) -> str:
    """Each registry test runs against the embedded sqlite store and against the real server."""
    return request.getfixturevalue("mlflow_server" if request.param == "server" else "sqlite_registry")


@pytest.fixture
def closed_port_uri() -> str:
    """An ``http://127.0.0.1:<port>`` URI where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


class _Payload:
    """Unpickling this object creates ``marker`` (stands in for arbitrary code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def malicious_pickle() -> Callable[[Path], bytes]:
    """Factory: pickle bytes whose unpickling creates the file ``marker``."""
    return lambda marker: pickle.dumps(_Payload(marker))


@pytest.fixture
def model_name() -> str:
    """A registered model name unique to the test (the server is shared by the session)."""
    return f"test-model-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_package(tmp_path: Path) -> Callable[..., tuple[torch.nn.Module, object, Path]]:
    """Factory: ``make_package(builder="small_cnn", name="pkg", seed=0, **kwargs)`` saves a random-weight
    package under ``tmp_path`` and returns ``(net, spec, path)``."""
    from harden.package import InputSpec, ModelSpec, save_package

    def make(builder: str = "small_cnn", name: str = "pkg", seed: int = 0, **kwargs):
        kwargs = kwargs or ({"width": 8} if builder == "small_cnn" else {})
        spec = ModelSpec(builder=builder, kwargs=kwargs, num_classes=10,
                         input=InputSpec(channels=3, height=32, width=32, mean=[0.5] * 3, std=[0.25] * 3))
        torch.manual_seed(seed)
        net = spec.build().eval()
        return net, spec, save_package(net, spec, tmp_path / name)

    return make
