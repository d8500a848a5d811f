"""Load: harden several candidates at once against one real ``mlflow server`` on loopback (issue 7).

1. Start ``mlflow server`` (sqlite backend, served artifacts) on a free 127.0.0.1 port and wait for ``/health``.
2. Start ``--runs`` worker processes at once, each ``nft-harden run --with-candidate`` in its own directory: it
   trains a tiny backdoored candidate (synthetic 16x16 images, 2 epochs), registers it as its own model
   (``load-candidate-<i>@candidate``), purifies, folds, exports, evaluates, gates, and registers the hardened
   model under ONE shared name, so every promotion races for the same alias. Even-numbered runs use a gate
   that blesses, odd-numbered ones a gate no model can pass (accuracy must be 1.0).
3. Check from the registry and from each run's own files that no run corrupted another's:
   every worker exits 0; the shared model has exactly one version per run; each run's version carries its own
   status (``blessed``/``rejected`` as its ``blessing.json`` says), its own ONNX sha256 (its ``parity.json``),
   its own source candidate; the alias ends on the highest blessed version; every other blessed version is
   tagged ``hardening.superseded_by`` with it; no rejected version holds the alias.
4. Print a table (runs, blessed, rejected, failures, wall time) and stop the server.

Bounded: at most 8 runs, and a hard deadline (``--timeout``) after which every worker and the server are killed.

    .venv/bin/python benchmarks/load.py --runs 4 --timeout 900
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from harden.integrity import sha256_file
from harden.registry import ONNX_SHA_TAG, STATUS_TAG, SUPERSEDED_TAG

SHARED_NAME = "load-hardened"
ALIAS = "champion"
MAX_RUNS = 8
SERVER_START_S = 90.0
BIN = Path(sys.executable).parent
SYNTHETIC = "synthetic:n=400,n_test=200,seed={seed},image_size=16"
BLESS_GATE = {"metrics": [{"metric": "acc", "min": 0.0}, {"metric": "asr/*", "max": 1.0}],
              "required_facts": ["onnx_parity", "fold_check"]}
REJECT_GATE = {"metrics": [{"metric": "acc", "min": 1.0}], "required_facts": ["onnx_parity", "fold_check"]}


@dataclass
class Run:
    """One worker: its directory, expectation, and what it ended with."""

    index: int
    directory: Path
    expect_blessed: bool
    exit_code: int | None = None
    seconds: float | None = None
    version: int | None = None
    status: str | None = None
    problems: list[str] = field(default_factory=list)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow server`` on loopback and wait until it answers (bounded)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "wb")  # noqa: SIM115 - kept open for the server's lifetime
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--serve-artifacts",
         "--artifacts-destination", str(root / "mlartifacts"), "--uvicorn-opts", "--timeout-graceful-shutdown 3"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    deadline = time.monotonic() + SERVER_START_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it after 5 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def params(index: int, url: str, blessed: bool) -> dict[str, Any]:
    """A tiny params.yaml for run ``index``: its own seed and candidate, the shared promotion target."""
    return {
        "base": {"seed": index, "device": "cpu", "tracking_uri": url},
        "data": {"train": SYNTHETIC.format(seed=index), "test": SYNTHETIC.format(seed=index),
                 "clean_fraction": None, "clean_per_class": 5},
        "candidate": {"model": f"models:/load-candidate-{index}@candidate", "demo": {"epochs": 2}},
        "purify": {"method": "nft", "epochs": 3, "batch_size": 32, "amp": False},
        "export": {"parity_samples": 32},
        "probes": {"attacks": [{"attack": "badnets", "target": 0}], "scan": {"enabled": False}},
        "gate": BLESS_GATE if blessed else REJECT_GATE,
        "promote": {"name": SHARED_NAME, "alias": ALIAS},
    }


def check(runs: list[Run], url: str) -> list[str]:
    """Verify every run's registered version against its own files, and the shared alias; fill ``runs``."""
    client = MlflowClient(url, url)
    problems: list[str] = []
    versions = {int(mv.version): mv for mv in client.search_model_versions(f"name='{SHARED_NAME}'")}
    if len(versions) != len(runs):
        problems.append(f"{len(versions)} versions of {SHARED_NAME} for {len(runs)} runs")
    for run in runs:
        registered = run.directory / "runs" / "promote" / "registered.json"
        if run.exit_code != 0 or not registered.is_file():
            run.problems.append(f"exit {run.exit_code}, see {run.directory / 'log.txt'}")
            continue
        reg = json.loads(registered.read_text())
        run.version = reg["version"]
        mv = versions.get(run.version)
        if mv is None:
            run.problems.append(f"version {run.version} is not in the registry")
            continue
        run.status = mv.tags.get(STATUS_TAG)
        blessing = json.loads((run.directory / "runs" / "gate" / "blessing.json").read_text())
        parity = json.loads((run.directory / "runs" / "export" / "parity.json").read_text())
        expected = {STATUS_TAG: "blessed" if blessing["blessed"] else "rejected",
                    ONNX_SHA_TAG: parity["onnx_sha256"],
                    "hardening.source.name": f"load-candidate-{run.index}",
                    "hardening.seed": str(run.index),
                    "hardening.data.clean_sha256": sha256_file(run.directory / "data" / "clean.npz")}
        run.problems += [f"{k}={mv.tags.get(k)!r}, expected {v!r}" for k, v in expected.items() if mv.tags.get(k) != v]
        if blessing["blessed"] != run.expect_blessed:
            run.problems.append(f"gate said blessed={blessing['blessed']}, expected {run.expect_blessed}")
        if sha256_file(run.directory / "runs" / "export" / "model.onnx") != parity["onnx_sha256"]:
            run.problems.append("model.onnx differs from the hash in parity.json")
    blessed = sorted(v for v, mv in versions.items() if mv.tags.get(STATUS_TAG) == "blessed")
    try:
        holder: int | None = int(client.get_model_version_by_alias(SHARED_NAME, ALIAS).version)
    except MlflowException:
        holder = None
    if blessed and holder != blessed[-1]:
        problems.append(f"@{ALIAS} is on version {holder}, not on the highest blessed version {blessed[-1]}")
    if not blessed and holder is not None:
        problems.append(f"@{ALIAS} is on version {holder} although no version is blessed")
    for number, mv in versions.items():
        superseded = mv.tags.get(SUPERSEDED_TAG)
        if number in blessed and number != holder and superseded != str(holder):
            problems.append(f"blessed version {number} lost the alias but is tagged superseded_by={superseded!r}")
        if number not in blessed and superseded is not None:
            problems.append(f"non-blessed version {number} is tagged superseded_by={superseded}")
    return problems + [f"run {r.index}: {p}" for r in runs for p in r.problems]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4, help=f"concurrent hardening runs (1..{MAX_RUNS})")
    parser.add_argument("--timeout", type=float, default=900.0, help="hard deadline in seconds for the whole load")
    parser.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: a temp dir, removed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= MAX_RUNS:
        parser.error(f"--runs must be in [1, {MAX_RUNS}], got {args.runs}")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="nft-load-"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + args.timeout
    server, url = start_server(root)
    runs = [Run(index=i, directory=root / f"run-{i}", expect_blessed=i % 2 == 0) for i in range(args.runs)]
    procs: dict[int, subprocess.Popen] = {}
    began: dict[int, float] = {}
    ended: dict[int, float] = {}
    timed_out = False
    try:
        for run in runs:
            run.directory.mkdir(parents=True, exist_ok=True)
            (run.directory / "params.yaml").write_text(yaml.safe_dump(params(run.index, url, run.expect_blessed)))
            with open(run.directory / "log.txt", "wb") as log:
                procs[run.index] = subprocess.Popen(
                    [str(BIN / "nft-harden"), "run", "--with-candidate", "--no-progress"], cwd=run.directory,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    env={**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": url})
            began[run.index] = time.monotonic()
        while True:
            for index, proc in procs.items():
                if index not in ended and proc.poll() is not None:
                    ended[index] = time.monotonic()
            if len(ended) == len(procs):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.5)
        for run in runs:
            proc = procs[run.index]
            stop(proc)
            run.exit_code = proc.returncode
            if run.index in ended:
                run.seconds = round(ended[run.index] - began[run.index], 1)
        problems = check(runs, url)
    finally:
        for proc in procs.values():
            stop(proc)
        stop(server)
    wall = time.monotonic() - start
    if timed_out:
        problems.insert(0, f"hard deadline of {args.timeout:.0f}s reached: workers killed")
    figures = {"runs": len(runs), "blessed": sum(r.status == "blessed" for r in runs),
               "rejected": sum(r.status == "rejected" for r in runs),
               "failures": sum(bool(r.problems) for r in runs), "wall_s": round(wall, 1),
               "problems": problems, "per_run": [{**asdict(r), "directory": str(r.directory)} for r in runs]}
    print(f"{'runs':>5} {'blessed':>8} {'rejected':>9} {'failures':>9} {'wall (s)':>9}")
    print(f"{figures['runs']:>5} {figures['blessed']:>8} {figures['rejected']:>9} {figures['failures']:>9} "
          f"{figures['wall_s']:>9}")
    for r in runs:
        print(f"  run {r.index}: exit {r.exit_code}, version {r.version}, {r.status or '-'} "
              f"(expected {'blessed' if r.expect_blessed else 'rejected'}), {r.seconds}s")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    if args.workdir is None and not problems:
        shutil.rmtree(root, ignore_errors=True)
    elif problems:
        print(f"outputs kept in {root}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
