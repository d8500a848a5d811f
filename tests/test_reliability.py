"""Reliability and security of the hardening step (issue 7): every foreseen fault, through the real CLI.

One tiny pipeline (random-weight 16x16 candidate in a real sqlite registry, 5 clean images per class, 2 NFT
epochs) is run once per module with the stage functions; each test copies its outputs, breaks one thing, runs
``nft-harden <stage>`` (typer's in-process runner: the real command, its error mapping and exit code, without
paying the import time of a new interpreter per call) and checks the four promises of the issue: a clear error
naming the problem, the documented exit code, earlier outputs byte-identical (nothing half-written), and the
registry unchanged (no alias moved, no version left looking valid). Faults of the registry itself use the real
``mlflow server`` on loopback, through a fault-injecting HTTP proxy where a request must be lost.

The table mapping the twelve cases to these tests is docs/RELIABILITY.md.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from kill import sigkill_after_checkpoint
from harden import stages
from pipeline.cli import app
from harden.integrity import sha256_file
from harden.package import InputSpec, ModelSpec, save_package
from harden.params import load_params
from harden.registry import (MANIFEST_FILE, MANIFEST_TAG, ONNX_SHA_TAG, REASONS_TAG, STATUS_TAG, SUPERSEDED_TAG,
                             move_alias, register_candidate, register_hardened)

REPO = Path(__file__).resolve().parent.parent
CANDIDATE = "rel-candidate"
ALIAS = "champion"
IMAGE = 16
SYNTHETIC = f"synthetic:n=200,n_test=100,seed=0,image_size={IMAGE}"

#: Passed by any sane hardened model (both facts must hold): the faults, not the metrics, decide these tests.
BLESS_GATE: dict[str, Any] = {"metrics": [{"metric": "acc", "min": 0.0}, {"metric": "asr/*", "max": 1.0}],
                              "required_facts": ["onnx_parity", "fold_check"]}


def tiny_params(tracking_uri: str, promote: str) -> dict[str, Any]:
    """A params.yaml mapping that runs every stage in seconds on CPU."""
    return {
        "base": {"seed": 0, "device": "cpu", "tracking_uri": tracking_uri},
        "data": {"train": SYNTHETIC, "test": SYNTHETIC, "clean_fraction": None, "clean_per_class": 5},
        "candidate": {"model": f"models:/{CANDIDATE}@candidate"},
        "purify": {"method": "nft", "epochs": 2, "batch_size": 32, "amp": False},
        "export": {"parity_samples": 16},
        "probes": {"attacks": [{"attack": "badnets", "target": 0}], "scan": {"enabled": False},
                   "margin": {"enabled": False}, "universal": {"enabled": False}},
        "gate": BLESS_GATE,
        "promote": {"name": promote, "alias": ALIAS},
    }


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in recursively (dicts merge, anything else replaces)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (hidden temporaries included, so leftovers show up)."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def registry_state(uri: str, name: str) -> tuple[list[tuple[int, str | None]], int | None]:
    """``([(version, hardening.status)], alias holder)`` of registered model ``name``."""
    client = MlflowClient(uri, uri)
    found = client.search_model_versions(f"name='{name}'")
    versions = sorted((int(mv.version), mv.tags.get(STATUS_TAG)) for mv in found)
    try:
        holder = int(client.get_model_version_by_alias(name, ALIAS).version)
    except MlflowException as err:
        if "not found" not in str(err).lower() and err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        holder = None
    return versions, holder


@dataclass
class Base:
    """The module's reference run: its directory, registry and params."""

    root: Path
    uri: str
    params: dict[str, Any]


@dataclass
class Workspace:
    """A copy of the reference run that one test may break."""

    root: Path
    params: dict[str, Any]

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def name(self) -> str:
        return self.params["promote"]["name"]

    @property
    def uri(self) -> str:
        return self.params["base"]["tracking_uri"]

    def set_params(self, changes: dict[str, Any]) -> None:
        self.params = merge(self.params, changes)
        (self.root / "params.yaml").write_text(yaml.safe_dump(self.params))

    def state(self) -> dict[str, str]:
        """Every output file of every stage, hashed."""
        return {**{f"runs/{k}": v for k, v in tree(self.runs).items()},
                **{f"data/{k}": v for k, v in tree(self.data).items()}}

    def cli(self, command: str, *extra: str) -> Any:
        """Run ``nft-harden <command>`` on this workspace; returns typer's ``Result``."""
        args = [command, "--params", str(self.root / "params.yaml"), "--runs", str(self.runs),
                "--data", str(self.data), *extra]
        return CliRunner().invoke(app, args)


def expect_exit(result: Any, code: int, *patterns: str) -> None:
    """Assert the exit code and that every pattern appears in the one-line error."""
    detail = f"exit {result.exit_code}, output:\n{result.output}\nexception: {result.exception!r}"
    assert result.exit_code == code, detail
    for pattern in patterns:
        assert pattern in result.output, f"{pattern!r} not in the error; {detail}"


def _candidate_spec() -> ModelSpec:
    return ModelSpec(builder="small_cnn", kwargs={"width": 8}, num_classes=10,
                     input=InputSpec(channels=3, height=IMAGE, width=IMAGE, mean=[0.5] * 3, std=[0.25] * 3))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    """Register a random-weight candidate in a fresh sqlite registry and run prepare ... report once."""
    root = tmp_path_factory.mktemp("reliability")
    (root / "registry").mkdir()
    uri = f"sqlite:///{root / 'registry' / 'mlflow.db'}"
    torch.manual_seed(0)
    spec = _candidate_spec()
    register_candidate(save_package(spec.build().eval(), spec, root / "candidate-package"), CANDIDATE,
                       tracking_uri=uri)
    raw = tiny_params(uri, promote="unused")
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    p = load_params(root / "params.yaml")
    layout = stages.Layout(runs=root / "runs", data=root / "data")
    stages.prepare_data(p.data, p.base.seed, layout.clean, layout.test)
    stages.pull_stage(p.candidate, uri, layout.stage("pull"))
    stages.purify_stage(p.purify, p.base, layout.stage("pull"), layout.clean, layout.stage("purify"), progress=False)
    stages.fold_stage(layout.stage("pull"), layout.stage("purify"), layout.clean, layout.stage("fold"))
    stages.export_stage(p.export, p.base.seed, layout.stage("fold"), layout.clean, layout.stage("export"))
    stages.evaluate_stage(p.probes, p.base.seed, layout.stage("pull"), layout.stage("purify"), layout.stage("fold"),
                          layout.stage("export"), layout.test, layout.stage("evaluate"))
    stages.gate_stage(p.gate, layout.stage("evaluate"), layout.stage("fold"), layout.stage("export"),
                      layout.stage("gate"))
    stages.report_stage(p, layout.stage("pull"), layout.stage("purify"), layout.stage("fold"), layout.stage("export"),
                        layout.stage("evaluate"), layout.stage("gate"), layout.stage("report"))
    return Base(root=root, uri=uri, params=raw)


@pytest.fixture
def ws(base: Base, tmp_path: Path) -> Workspace:
    """A private copy of the reference run's outputs, promoting to a model name unique to the test."""
    for sub in ("runs", "data"):
        shutil.copytree(base.root / sub, tmp_path / sub)
    workspace = Workspace(root=tmp_path, params=base.params)
    workspace.set_params({"promote": {"name": f"rel-hardened-{uuid.uuid4().hex[:8]}"}})
    return workspace


def _artifact_dir(uri: str, name: str, version: int) -> Path:
    """Local directory of a version's artifacts in the sqlite store (``file://`` source)."""
    source = MlflowClient(uri, uri).get_model_version(name, str(version)).source
    return Path(urllib.parse.urlsplit(source).path)


# ------------------------------------------------------------------------------- 1: hostile pickles ------

def test_cli_pull_refuses_pickled_candidate_and_keeps_previous_pull(ws: Workspace, malicious_pickle, tmp_path):
    marker = tmp_path / "pwned"
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "model.pkl").write_bytes(malicious_pickle(marker))
    name = f"rel-pickled-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(ws.uri, ws.uri)
    run = client.create_run(client.create_experiment(f"exp-{name}", artifact_location=(tmp_path / "a").as_uri()))
    client.log_artifacts(run.info.run_id, str(payload), "model")
    client.create_registered_model(name)
    client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    ws.set_params({"candidate": {"model": f"models:/{name}/1"}})
    before = ws.state()

    expect_exit(ws.cli("pull"), 3, "refusing to unpickle", "model.pkl", "allow_pickle")
    assert not marker.exists(), "the pickle's payload ran"
    assert ws.state() == before


# --------------------------------------------------------------------------------- 2: registry faults ------

@pytest.mark.parametrize("fault", ["no-model", "no-alias", "no-version", "server-down", "wrong-sqlite-path"])
def test_cli_pull_registry_faults_exit_4_and_keep_previous_pull(ws: Workspace, closed_port_uri: str, fault: str):
    changes, pattern = {
        "no-model": ({"candidate": {"model": "models:/rel-nosuch@candidate"}}, "'rel-nosuch' does not exist"),
        "no-alias": ({"candidate": {"model": f"models:/{CANDIDATE}@nosuch"}}, "has no alias 'nosuch'"),
        "no-version": ({"candidate": {"model": f"models:/{CANDIDATE}/99"}}, "has no version 99"),
        "server-down": ({"base": {"tracking_uri": closed_port_uri}}, "unreachable after 3 attempts"),
        "wrong-sqlite-path": ({"base": {"tracking_uri": f"sqlite:///{ws.root / 'typo' / 'mlflow.db'}"}},
                              "no MLflow database at"),
    }[fault]
    ws.set_params(changes)
    before = ws.state()
    start = time.monotonic()
    expect_exit(ws.cli("pull"), 4, pattern)
    assert time.monotonic() - start < 30, "retries must be bounded"
    assert ws.state() == before
    assert not (ws.root / "typo").exists(), "a mistyped sqlite path must not create an empty registry"


# ---------------------------------------------------------------------- 3: corrupt weights in the registry ------

@pytest.mark.parametrize("damage", ["truncated", "bit-flipped"])
def test_cli_pull_refuses_weights_corrupted_in_the_registry(ws: Workspace, damage: str):
    name = f"rel-corrupt-{uuid.uuid4().hex[:8]}"
    torch.manual_seed(1)
    spec = _candidate_spec()
    version = register_candidate(save_package(spec.build().eval(), spec, ws.root / "pkg"), name, tracking_uri=ws.uri)
    weights = _artifact_dir(ws.uri, name, version) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2:]
    else:
        data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    ws.set_params({"candidate": {"model": f"models:/{name}@candidate"}})
    before = ws.state()

    expect_exit(ws.cli("pull"), 3, "sha256")
    assert ws.state() == before


# ------------------------------------------------------------------------- 4, 5: data the model refuses ------

def _write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    np.savez(path, x=x, y=y)


def _images(n: int, size: int = IMAGE, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


@pytest.mark.parametrize("case", ["channels", "size", "classes", "label-above-range", "negative-label"])
def test_cli_purify_refuses_clean_data_the_model_cannot_take(ws: Workspace, case: str):
    labels = np.arange(50, dtype=np.int64) % 10
    x, y, pattern = {
        "channels": (_images(50, channels=1), labels, "images are (1, 16, 16) (C, H, W) but the model takes (3, 16, 16)"),
        "size": (_images(50, size=32), labels, "images are (3, 32, 32) (C, H, W) but the model takes (3, 16, 16)"),
        "classes": (_images(50), labels % 5, "data has 5 classes but the model has 10"),
        "label-above-range": (_images(50), np.where(labels == 9, 10, labels), "data has 11 classes but the model has 10"),
        "negative-label": (_images(50), np.where(labels == 9, -1, labels), "labels span [-1, 8]"),
    }[case]
    _write_npz(ws.data / "clean.npz", x, y)
    before = ws.state()
    expect_exit(ws.cli("purify", "--no-progress"), 5, "clean.npz", pattern)
    assert ws.state() == before


def test_cli_evaluate_refuses_a_test_set_of_another_size(ws: Workspace):
    _write_npz(ws.data / "test.npz", _images(20, size=32), np.arange(20, dtype=np.int64) % 10)
    before = ws.state()
    expect_exit(ws.cli("evaluate"), 5, "test set", "(3, 32, 32)", "(3, 16, 16)")
    assert ws.state() == before


@pytest.mark.parametrize("case", ["empty", "missing-class"])
def test_cli_purify_refuses_an_unusable_clean_set(ws: Workspace, case: str):
    if case == "empty":
        _write_npz(ws.data / "clean.npz", _images(0), np.zeros(0, np.int64))
        pattern = "holds no samples"
    else:
        y = np.array([c for c in range(10) if c != 3] * 2, dtype=np.int64)
        _write_npz(ws.data / "clean.npz", _images(len(y)), y)
        pattern = "no sample of class(es) [3]"
    before = ws.state()
    expect_exit(ws.cli("purify", "--no-progress"), 5, pattern)
    assert ws.state() == before


def test_cli_purify_one_sample_per_class_warns_one_shot_and_succeeds(ws: Workspace, caplog):
    _write_npz(ws.data / "clean.npz", _images(10), np.arange(10, dtype=np.int64))
    with caplog.at_level("WARNING", logger="harden.stages"):
        result = ws.cli("purify", "--no-progress")
    expect_exit(result, 0)
    assert "one-shot regime" in caplog.text
    assert json.loads((ws.runs / "purify" / "purify.json").read_text())["clean_samples"] == 10


# ------------------------------------------------------------------------------------- 6: bad params ------

@pytest.mark.parametrize("changes, patterns", [
    ({"purify": {"lr": -0.1}}, ["purify.lr=-0.1 is invalid", "> 0"]),
    ({"gate": {"metrics": [{"metric": "acc", "min": 1.5}]}}, ["gate.metrics.0", "min=1.5", "[0, 1]"]),
], ids=["negative-lr", "gate-threshold-above-1"])
def test_cli_invalid_params_exit_2_before_touching_anything(ws: Workspace, changes, patterns):
    ws.set_params(changes)
    before = ws.state()
    expect_exit(ws.cli("purify", "--no-progress"), 2, "params.yaml is invalid", *patterns)
    assert ws.state() == before


@pytest.mark.parametrize("changes, pattern", [
    ({"base": {"tracking_uri": "TMP"}}, "not a registry URI this step supports"),
    ({"base": {"tracking_uri": "sqlite:///TMP"}}, "points at a directory"),
    ({"base": {"tracking_uri": "file:///TMP/mlruns"}}, "not a registry URI this step supports"),
    ({"base": {"tracking_uri": "ftp://example.invalid/registry"}}, "not a registry URI this step supports"),
    ({"base": {"device": "banana"}}, "'banana' is not a device"),
    ({"candidate": {"model": "models:/rel-candidate@@candidate"}}, "is not a model reference"),
], ids=["uri-directory", "sqlite-directory", "file-scheme", "ftp-scheme", "device-banana", "bad-model-ref"])
def test_check_params_validates_every_value_it_can_without_the_network(ws: Workspace, changes, pattern):
    """Issue 12: these passed check-params and then exited 1 (or 4) in the middle of a run."""
    changes = json.loads(json.dumps(changes).replace("TMP", str(ws.root)))  # an existing directory
    ws.set_params(changes)
    before = ws.state()
    expect_exit(CliRunner().invoke(app, ["check-params", "--params", str(ws.root / "params.yaml")]), 2, pattern)
    expect_exit(ws.cli("pull"), 2, pattern)
    assert ws.state() == before


def test_a_cuda_device_the_machine_lacks_is_refused_before_purification(ws: Workspace):
    ws.set_params({"base": {"device": "cuda:3"}})
    before = ws.state()
    expect_exit(ws.cli("purify", "--no-progress"), 2, "base.device='cuda:3'", "CUDA device(s)")
    assert ws.state() == before


def test_an_sqlite_uri_naming_a_file_that_is_not_a_database_is_refused_untouched(ws: Workspace):
    """Issue 12: MLflow wrote its schema into an empty file named by the tracking URI."""
    for content in (b"", b"not a database"):
        target = ws.root / "registry.db"
        target.write_bytes(content)
        ws.set_params({"base": {"tracking_uri": f"sqlite:///{target}"}})
        before = ws.state()
        expect_exit(ws.cli("pull"), 4, "is not an SQLite database")
        expect_exit(ws.cli("promote"), 4, "is not an SQLite database")
        assert target.read_bytes() == content and ws.state() == before


def test_temporaries_of_a_killed_stage_are_removed_by_its_next_run(ws: Workspace):
    """Issue 12: a stage killed mid-write left ``runs/.export.*.tmp/`` behind forever."""
    leftovers = [ws.runs / ".export.k1ll3d.tmp", ws.runs / ".export.k1ll3d.old", ws.runs / "evaluate" / ".metrics.json.x.tmp"]
    for leftover in leftovers[:2]:
        (leftover / "model.onnx").parent.mkdir(parents=True)
        (leftover / "model.onnx").write_bytes(b"half")
    leftovers[2].write_bytes(b"{")
    for stage in ("export", "evaluate"):
        expect_exit(ws.cli(stage), 0)
    assert not [p for p in leftovers if p.exists()]
    assert not [p for p in ws.runs.rglob(".*") if p.name.endswith((".tmp", ".old"))]


def test_a_data_bomb_is_refused_with_exit_5_before_it_is_read(ws: Workspace):
    """Issue 12: an npz declaring gigabytes (a few hundred bytes on disk) exits 5, naming the array."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (10_000_000, 64, 64, 3)})
    bomb = ws.root / "bomb.npz"
    with zipfile.ZipFile(bomb, "w") as zf:
        zf.writestr("x.npy", header.getvalue())
        zf.writestr("y.npy", b"")
    before = ws.state()
    shutil.copy(bomb, ws.data / "clean.npz")
    expect_exit(ws.cli("purify", "--no-progress"), 5, "clean.npz", "declares", "above the")
    shutil.copy(bomb, ws.data / "test.npz")
    ws.set_params({"data": {"train": f"npz:{bomb}"}})
    expect_exit(ws.cli("prepare"), 5, "bomb.npz", "declares")
    assert {k: v for k, v in ws.state().items() if not k.startswith("data/")} == \
        {k: v for k, v in before.items() if not k.startswith("data/")}


@pytest.mark.parametrize("metric", ["ASR/*", "Robust_acc/*", "accuracy"])
def test_a_gate_check_no_metric_can_match_is_refused_by_check_params(ws: Workspace, metric: str):
    """Issue 12: these used to pass check-params; the patterns then expanded to no check and the gate blessed."""
    ws.set_params({"gate": {"metrics": [{"metric": "acc", "min": 0.0}, {"metric": metric, "max": 0.05}]}})
    before = ws.state()
    for command in ("check-params", "gate"):
        args = [command, "--params", str(ws.root / "params.yaml")] if command == "check-params" else [command]
        result = CliRunner().invoke(app, args) if command == "check-params" else ws.cli(command)
        expect_exit(result, 2, "gate.metrics.1", "no metric of the evaluation can match it")
    assert ws.state() == before


def test_a_gate_check_this_evaluation_cannot_answer_stops_the_gate_with_exit_2(ws: Workspace):
    """A plausible check the evidence cannot answer (no blend probe ran) is never passed by omission."""
    ws.set_params({"gate": {"metrics": [{"metric": "acc", "min": 0.0}, {"metric": "asr/blend*", "max": 0.05}]}})
    before = ws.state()
    expect_exit(ws.cli("gate", "--strict"), 2, "asr/blend*", "missing from the evidence")
    assert ws.state() == before
    ws.set_params({"gate": {"on_missing": "fail"}})
    expect_exit(ws.cli("gate", "--strict"), 10, "asr/blend*")


@pytest.mark.parametrize("text, pattern", [
    ("gate:\n  metrics: [{metric: acc, min: 0.0}]\n", "duplicate key 'gate'"),
    ("laughs:\n  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "  c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n  d: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n", "anchor &a"),
], ids=["duplicate-section", "billion-laughs"])
def test_params_yaml_with_duplicate_keys_or_aliases_is_refused(ws: Workspace, text: str, pattern: str):
    """Issue 12: a second ``gate:`` silently won; a YAML alias bomb passed validation, then aborted later."""
    path = ws.root / "params.yaml"
    path.write_text(path.read_text() + text)
    before = ws.state()
    start = time.monotonic()
    for command in ("check-params", "report"):
        args = [command, "--params", str(path)] + ([] if command == "check-params" else
                                                     ["--runs", str(ws.runs), "--data", str(ws.data)])
        expect_exit(CliRunner().invoke(app, args), 2, "is not valid YAML", pattern)
    assert time.monotonic() - start < 10
    assert ws.state() == before


# ------------------------------------------------------------------------------------ 7: bad probes ------

PROBE_FAULTS = {
    "target-out-of-range": (lambda d: {"attack": "badnets", "target": 10}, "target=10 is outside the labels [0, 10)"),
    "missing-key": (lambda d: {"npz": str(_probe(d, y_target=None))}, "key 'y_target' is missing"),
    "label-out-of-range": (lambda d: {"npz": str(_probe(d, y_target=12))}, "'y_target' spans [12, 12]"),
    "not-an-npz": (lambda d: {"npz": str(_garbage(d))}, "probe file"),
    "missing-file": (lambda d: {"npz": str(d / "nosuch.npz")}, "nosuch.npz"),
}
#: Faults that currently escape as an unexpected error (exit 1); the fix belongs in harden/evaluate.py.


def _probe(directory: Path, y_target: int | None) -> Path:
    arrays = {"x": _images(8), "y_true": np.ones(8, np.int64)}
    if y_target is not None:
        arrays["y_target"] = np.full(8, y_target, np.int64)
    np.savez(directory / "probe.npz", **arrays)
    return directory / "probe.npz"


def _garbage(directory: Path) -> Path:
    (directory / "probe.npz").write_bytes(b"this is not a zip archive")
    return directory / "probe.npz"


@pytest.mark.parametrize("fault", list(PROBE_FAULTS))
def test_cli_evaluate_probe_faults_exit_6_and_keep_previous_metrics(ws: Workspace, fault: str):
    make, pattern = PROBE_FAULTS[fault]
    ws.set_params({"probes": {"attacks": [make(ws.root)]}})
    before = ws.state()
    expect_exit(ws.cli("evaluate"), 6, pattern)
    assert ws.state() == before


# ------------------------------------------------------------------- 8: failed parity or fold check ------

def _promote_blessed(ws: Workspace) -> int:
    """Register the reference run's model as a blessed version holding the alias; returns its number."""
    expect_exit(ws.cli("promote"), 0)
    registered = json.loads((ws.runs / "promote" / "registered.json").read_text())
    assert registered["alias_moved"] and registered["status"] == "blessed"
    return registered["version"]


def test_failed_onnx_parity_is_never_promoted(ws: Workspace):
    champion = _promote_blessed(ws)
    ws.set_params({"export": {"atol": 1e-30}})  # a real parity check ONNX Runtime cannot meet (fp32 rounding)
    expect_exit(ws.cli("export"), 0)
    parity = json.loads((ws.runs / "export" / "parity.json").read_text())
    assert parity["passed"] is False and parity["max_abs_diff"] > 1e-30
    expect_exit(ws.cli("gate"), 7, "metrics.json was made from parity")  # the evaluation is stale: refused
    expect_exit(ws.cli("evaluate"), 0)
    expect_exit(ws.cli("gate", "--strict"), 10, "onnx_parity")
    expect_exit(ws.cli("report"), 0)
    blessing = json.loads((ws.runs / "gate" / "blessing.json").read_text())
    assert blessing["blessed"] is False
    assert [c["reason"] for c in blessing["checks"] if not c["passed"]] == ["onnx_parity did not pass."]

    expect_exit(ws.cli("promote", "--strict"), 10, "onnx_parity")
    versions, holder = registry_state(ws.uri, ws.name)
    assert versions == [(champion, "blessed"), (champion + 1, "rejected")] and holder == champion
    mv = MlflowClient(ws.uri, ws.uri).get_model_version(ws.name, str(champion + 1))
    assert "onnx_parity did not pass" in mv.tags[REASONS_TAG]


def test_failed_fold_check_is_never_promoted(ws: Workspace, monkeypatch):
    monkeypatch.setattr(stages, "FOLD_ATOL", -1.0)  # a real fold check no fold can meet (|diff| >= 0 > -1)
    expect_exit(ws.cli("fold"), 0)
    assert json.loads((ws.runs / "fold" / "fold.json").read_text())["passed"] is False
    for stage in ("export", "evaluate", "gate", "report"):
        expect_exit(ws.cli(stage), 0)
    blessing = json.loads((ws.runs / "gate" / "blessing.json").read_text())
    assert not blessing["blessed"] and "fold_check" in blessing["summary"]
    expect_exit(ws.cli("promote", "--strict"), 10, "fold_check")
    assert registry_state(ws.uri, ws.name) == ([(1, "rejected")], None)


def _nan_masks(ws: Workspace) -> None:
    state = load_file(str(ws.runs / "purify" / "purified.safetensors"))
    first = next(k for k in state if k.endswith(".mask"))  # a neuron mask of the purified model
    state[first][0] = float("nan")
    save_file(state, str(ws.runs / "purify" / "purified.safetensors"))


def test_masks_changed_after_purification_are_refused_by_the_fold(ws: Workspace):
    _nan_masks(ws)
    before = ws.state()
    expect_exit(ws.cli("fold"), 7, "purified.safetensors is sha256", "its stage recorded")
    assert ws.state() == before


def test_non_finite_masks_stop_the_fold_and_keep_the_previous_fold(ws: Workspace):
    _nan_masks(ws)  # as if purification itself had produced them: the recorded hash matches
    record_path = ws.runs / "purify" / "purify.json"
    record = json.loads(record_path.read_text())
    record["outputs"]["purified.safetensors"] = sha256_file(ws.runs / "purify" / "purified.safetensors")
    record_path.write_text(json.dumps(record))
    before = ws.state()
    expect_exit(ws.cli("fold"), 3, "non-finite")
    assert ws.state() == before


# ---------------------------------------------------------------------------- 9: killed purification ------

@pytest.mark.slow
def test_cli_killed_purify_keeps_previous_output_and_resumes_to_the_same_masks(ws: Workspace, base: Base,
                                                                              tmp_path: Path):
    epochs = 100  # the kill comes at epoch >= 3; enough epochs that a loaded machine cannot finish first
    ws.set_params({"purify": {"epochs": epochs}})
    before = ws.state()
    checkpoint = ws.runs / ".purify.0.ckpt"  # the first (here the only) attempt's
    cmd = [str(Path(sys.executable).parent / "nft-harden"), "purify", "--no-progress", "--params",
           str(ws.root / "params.yaml"), "--runs", str(ws.runs), "--data", str(ws.data)]
    done = sigkill_after_checkpoint(cmd, checkpoint, min_epoch=3, quiet=True)
    assert 3 <= done < epochs, "the run finished before it could be killed; raise `epochs`"
    after_kill = ws.state()
    after_kill.pop("runs/.purify.0.ckpt")
    # a kill that lands inside a checkpoint write leaves its temporary beside it; the next save replaces it
    after_kill.pop("runs/.purify.0.ckpt.tmp", None)
    assert after_kill == before, "a killed purify must leave the previous output and no half-written one"

    expect_exit(ws.cli("purify", "--no-progress"), 0)
    assert not checkpoint.exists()
    p = load_params(ws.root / "params.yaml")
    stages.purify_stage(p.purify, p.base, ws.runs / "pull", ws.data / "clean.npz", tmp_path / "uninterrupted",
                        progress=False)
    resumed = load_file(str(ws.runs / "purify" / "purified.safetensors"))
    uninterrupted = load_file(str(tmp_path / "uninterrupted" / "purified.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


# ----------------------------------------------------------------------- 10: registration that fails ------

def test_promote_refuses_an_onnx_file_changed_after_evaluation(ws: Workspace):
    onnx_file = ws.runs / "export" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    expect_exit(ws.cli("promote"), 7, "model.onnx is", "parity.json (onnx_sha256) was made from onnx")
    assert registry_state(ws.uri, ws.name) == ([], None)
    assert not (ws.runs / "promote").exists()


def test_the_report_refuses_reconstructed_triggers_changed_after_evaluation(ws: Workspace):
    before = ws.state()
    triggers = ws.runs / "evaluate" / "inversion.safetensors"
    triggers.write_bytes(triggers.read_bytes() + b" ")
    expect_exit(ws.cli("report"), 7, "inversion.safetensors", "not the file the evaluation wrote")
    assert {k: v for k, v in ws.state().items() if k.startswith("runs/report")} == \
        {k: v for k, v in before.items() if k.startswith("runs/report")}  # the previous report stands


def test_promote_with_the_registry_down_registers_nothing(ws: Workspace, closed_port_uri: str):
    ws.set_params({"base": {"tracking_uri": closed_port_uri}})
    start = time.monotonic()
    expect_exit(ws.cli("promote"), 4, "unreachable after 3 attempts")
    assert time.monotonic() - start < 30
    assert not (ws.runs / "promote").exists()


class _FaultyProxy(ThreadingHTTPServer):
    """A loopback HTTP proxy to a real MLflow server that drops (closes without answering) every request for
    which ``drop(method, path)`` is true: the server never sees it, the client sees a broken connection."""

    daemon_threads = True

    def __init__(self, upstream: str, drop: Callable[[str, str], bool]) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.drop = drop
        self.dropped: list[str] = []
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _FaultyProxy

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        verdict = self.server.drop(self.command, urllib.parse.urlsplit(self.path).path)
        if verdict:
            self.server.dropped.append(f"{self.command} {self.path}")
            if verdict == "hang":  # a server that stopped answering: hold the connection, then close it
                time.sleep(30)
            self.close_connection = True
            return
        upstream = http.client.HTTPConnection(self.server.upstream.hostname, self.server.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
        finally:
            upstream.close()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        """Silence per-request logging."""


@pytest.fixture
def faulty_proxy(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., _FaultyProxy]]:
    """Factory of proxies to the session's real server; MLflow's own HTTP retries are off so a drop is final."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    started: list[_FaultyProxy] = []

    def start(drop: Callable[[str, str], bool]) -> _FaultyProxy:
        proxy = _FaultyProxy(mlflow_server, drop)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.shutdown()
        proxy.server_close()


@pytest.mark.slow
def test_registration_failing_after_artifacts_were_logged_is_tagged_failed_and_a_rerun_succeeds(
        ws: Workspace, mlflow_server: str, faulty_proxy):
    ws.set_params({"base": {"tracking_uri": mlflow_server}})
    champion = _promote_blessed(ws)
    proxy = faulty_proxy(lambda method, path: method == "POST" and path.endswith("/registered-models/alias"))
    ws.set_params({"base": {"tracking_uri": proxy.url}})
    previous = (ws.runs / "promote" / "registered.json").read_bytes()

    expect_exit(ws.cli("promote"), 4, f"version {champion + 1} tagged failed")
    assert proxy.dropped, "the fault was never injected"
    versions, holder = registry_state(mlflow_server, ws.name)
    assert versions == [(champion, "blessed"), (champion + 1, "failed")] and holder == champion
    client = MlflowClient(mlflow_server, mlflow_server)
    failed = client.get_model_version(ws.name, str(champion + 1))
    assert "registration failed" in failed.tags[REASONS_TAG]
    assert client.get_run(failed.run_id).info.status == "FAILED"
    assert {a.path for a in client.list_artifacts(failed.run_id)} >= {"package", "evidence", MANIFEST_FILE}
    assert (ws.runs / "promote" / "registered.json").read_bytes() == previous

    ws.set_params({"base": {"tracking_uri": mlflow_server}})  # the fault is gone: a rerun succeeds
    expect_exit(ws.cli("promote"), 0)
    assert registry_state(mlflow_server, ws.name) == (
        [(champion, "blessed"), (champion + 1, "failed"), (champion + 2, "blessed")], champion + 2)
    superseded = client.get_model_version(ws.name, str(champion)).tags
    assert superseded[SUPERSEDED_TAG] == str(champion + 2)
    assert SUPERSEDED_TAG not in client.get_model_version(ws.name, str(champion + 1)).tags  # failed, not blessed


@pytest.mark.slow
def test_a_registry_that_dies_after_the_alias_write_is_reported_as_unconfirmed(ws: Workspace, mlflow_server: str,
                                                                                faulty_proxy):
    """Issue 12: the server died right after the alias write; the CLI said "tagged failed" while the new version
    was blessed and held @champion. Now it says what the registry may hold, and writes it down."""
    seen = {"alias": False}

    def die_after_alias(method: str, path: str) -> bool:
        if seen["alias"]:
            return True
        seen["alias"] = method == "POST" and path.endswith("/registered-models/alias")
        return False

    ws.set_params({"base": {"tracking_uri": faulty_proxy(die_after_alias).url}})
    start = time.monotonic()
    expect_exit(ws.cli("promote"), 4, "state is unconfirmed", "@champion may point at it")
    assert time.monotonic() - start < 120
    failed = json.loads((ws.runs / "promote" / "failed.json").read_text())
    assert failed["version"] == 1 and failed["alias_moved"] == "unknown" and failed["confirmed"] is False
    assert not (ws.runs / "promote" / "registered.json").exists()
    assert registry_state(mlflow_server, ws.name) == ([(1, "blessed")], 1)  # what the message warned of


@pytest.mark.slow
def test_a_registry_that_stops_answering_mid_promote_ends_within_the_deadline(ws: Workspace, mlflow_server: str,
                                                                             faulty_proxy, monkeypatch):
    """Every registry call shares one deadline; MLflow's own retries (about 8.5 minutes per call) are bounded."""
    import harden.registry.client as registry

    monkeypatch.setattr(registry, "DEADLINE_S", 15.0)
    monkeypatch.setattr(registry, "HTTP_BOUNDS", {**registry.HTTP_BOUNDS, "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
                                                  "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"})
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)  # the fixture's; use ours
    hang_from = {"n": 0}

    def hang_after_the_run_started(method: str, path: str) -> bool | str:
        hang_from["n"] += path.endswith("/runs/create")
        return "hang" if hang_from["n"] and path.endswith("/model-versions/create") else False

    ws.set_params({"base": {"tracking_uri": faulty_proxy(hang_after_the_run_started).url}})
    start = time.monotonic()
    result = ws.cli("promote")
    elapsed = time.monotonic() - start
    expect_exit(result, 4, "registering hardened model")
    assert elapsed < 15 + 2 * (2 + 1) + 60, elapsed  # deadline + one bounded call + the clean-up's bound
    versions, holder = registry_state(mlflow_server, ws.name)
    assert holder is None and all(status != "blessed" for _, status in versions)


def test_stale_pending_versions_are_tagged_failed_by_the_next_promote(ws: Workspace, monkeypatch):
    """A promote killed between creating its version and tagging it leaves it pending; the next one sweeps it."""
    import harden.registry.aliases as registry

    expect_exit(ws.cli("promote"), 0)
    client = MlflowClient(ws.uri, ws.uri)
    client.set_model_version_tag(ws.name, "1", STATUS_TAG, "pending")  # as a killed promote leaves it
    monkeypatch.setattr(registry, "PENDING_STALE_S", 0.0)
    expect_exit(ws.cli("promote"), 0)
    swept = client.get_model_version(ws.name, "1").tags
    assert swept[STATUS_TAG] == "failed" and "left pending" in swept[REASONS_TAG]
    assert registry_state(ws.uri, ws.name) == ([(1, "failed"), (2, "blessed")], 2)


# ------------------------------------------------------------------------------ 11: racing promotions ------

@pytest.fixture(scope="module")
def hardened_files(base: Base) -> dict[str, Any]:
    """The reference run's registrable files, as register_hardened takes them."""
    runs = base.root / "runs"
    return {"package_dir": runs / "fold" / "package", "onnx_path": runs / "export" / "model.onnx",
            "onnx_sha256": json.loads((runs / "export" / "parity.json").read_text())["onnx_sha256"],
            "evidence": {"blessing": runs / "gate" / "blessing.json", "metrics": runs / "evaluate" / "metrics.json"}}


def _register(uri: str, name: str, files: dict[str, Any], **kwargs: Any):
    return register_hardened(name, tracking_uri=uri, metrics={"acc": 0.5}, tags={"test": "race"},
                             description="race test", **{**files, **kwargs})


def test_alias_settles_on_the_highest_blessed_version_whatever_the_write_order(mlflow_server: str, hardened_files):
    """The worst interleaving, replayed deterministically: a stale promoter of version 1 overwrites the alias
    after version 2's promoter finished. Any later promotion step restores the rule and tags the loser."""
    name = f"rel-race-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_server, mlflow_server)
    v1 = _register(mlflow_server, name, hardened_files, blessed=True, set_alias=False).version
    v2 = _register(mlflow_server, name, hardened_files, blessed=True, set_alias=False).version
    assert move_alias(name, v2, ALIAS, tracking_uri=mlflow_server) == v2
    client.set_registered_model_alias(name, ALIAS, str(v1))  # the stale write of v1's promoter
    assert move_alias(name, v1, ALIAS, tracking_uri=mlflow_server) == v2  # ... whose own check repairs it
    assert registry_state(mlflow_server, name)[1] == v2
    assert client.get_model_version(name, str(v1)).tags[SUPERSEDED_TAG] == str(v2)
    assert SUPERSEDED_TAG not in client.get_model_version(name, str(v2)).tags
    rejected = _register(mlflow_server, name, hardened_files, blessed=False, reasons=["asr too high"])
    assert not rejected.alias_moved and registry_state(mlflow_server, name)[1] == v2
    newer = _register(mlflow_server, name, hardened_files, blessed=True)
    assert newer.alias_moved and newer.superseded_by is None
    assert client.get_model_version(name, str(v2)).tags[SUPERSEDED_TAG] == str(newer.version)
    assert SUPERSEDED_TAG not in client.get_model_version(name, str(rejected.version)).tags


RACER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from harden.registry import move_alias, register_hardened
    uri, name, files, go = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
    files["package_dir"], files["onnx_path"] = Path(files["package_dir"]), Path(files["onnx_path"])
    files["evidence"] = {k: Path(v) for k, v in files["evidence"].items()}
    r = register_hardened(name, tracking_uri=uri, metrics={"acc": 0.5}, tags={"test": "race"},
                          description="race", blessed=True, set_alias=False, **files)
    Path(sys.argv[5]).write_text(str(r.version))
    deadline = time.monotonic() + 120
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    print(json.dumps({"version": r.version, "winner": move_alias(name, r.version, "champion", tracking_uri=uri)}))
""")


@pytest.mark.slow
def test_concurrent_promotions_in_separate_processes_end_on_one_blessed_version(mlflow_server: str, hardened_files,
                                                                                tmp_path: Path):
    """Three processes register blessed versions, then move the alias at the same instant (a start file)."""
    name = f"rel-race-{uuid.uuid4().hex[:8]}"
    files = json.dumps({k: ({r: str(p) for r, p in v.items()} if isinstance(v, dict) else str(v))
                        for k, v in hardened_files.items()})
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", RACER, mlflow_server, name, files, str(go), str(r)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for r in ready]
    try:
        deadline = time.monotonic() + 240
        while not all(r.exists() for r in ready) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
            time.sleep(0.1)
        go.touch()
        outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(err[-6000:] for _, err in outputs)
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    top = max(r["version"] for r in results)
    assert {r["winner"] for r in results} == {top}
    versions, holder = registry_state(mlflow_server, name)
    assert holder == top and [s for _, s in versions] == ["blessed"] * 3
    client = MlflowClient(mlflow_server, mlflow_server)
    for r in results:
        tags = client.get_model_version(name, str(r["version"])).tags
        assert tags.get(SUPERSEDED_TAG) == (None if r["version"] == top else str(top))


# ------------------------------------------------------------------ 12 + integrity: the evidence registered ------

@pytest.fixture(scope="module")
def promoted(base: Base, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The reference run promoted once through the CLI (blessed), with where everything landed."""
    root = tmp_path_factory.mktemp("promoted")
    for sub in ("runs", "data"):
        shutil.copytree(base.root / sub, root / sub)
    ws = Workspace(root=root, params=base.params)
    ws.set_params({"promote": {"name": f"rel-promoted-{uuid.uuid4().hex[:8]}"}})
    expect_exit(ws.cli("promote"), 0)
    registered = json.loads((ws.runs / "promote" / "registered.json").read_text())
    mv = MlflowClient(ws.uri, ws.uri).get_model_version(ws.name, str(registered["version"]))
    return {"ws": ws, "registered": registered, "mv": mv}


def test_registered_onnx_is_byte_identical_to_the_evaluated_one(promoted: dict[str, Any], tmp_path: Path):
    ws, mv = promoted["ws"], promoted["mv"]
    evaluated = ws.runs / "export" / "model.onnx"
    parity = json.loads((ws.runs / "export" / "parity.json").read_text())
    served = mlflow.artifacts.download_artifacts(artifact_uri=f"{mv.source}/model.onnx", dst_path=str(tmp_path),
                                                 tracking_uri=ws.uri)
    assert sha256_file(served) == sha256_file(evaluated) == parity["onnx_sha256"] == mv.tags[ONNX_SHA_TAG]
    assert Path(served).read_bytes() == evaluated.read_bytes()


def test_every_file_read_or_registered_is_hashed(promoted: dict[str, Any], base: Base, tmp_path: Path):
    ws, mv = promoted["ws"], promoted["mv"]
    tags = mv.tags
    assert tags["hardening.data.clean_sha256"] == sha256_file(ws.data / "clean.npz")
    assert tags["hardening.data.test_sha256"] == sha256_file(ws.data / "test.npz")
    assert len(tags["hardening.params_sha256"]) == 64
    provenance = json.loads((ws.runs / "pull" / "provenance.json").read_text())
    candidate_package = base.root / "candidate-package"
    assert provenance["files_sha256"] == {f: sha256_file(candidate_package / f)
                                          for f in ("model.json", "model.safetensors")}
    client = MlflowClient(ws.uri, ws.uri)
    manifest = json.loads(Path(client.download_artifacts(mv.run_id, MANIFEST_FILE, str(tmp_path))).read_text())
    assert manifest["package"] == tree(ws.runs / "fold" / "package")
    assert manifest["onnx"] == {"model.onnx": sha256_file(ws.runs / "export" / "model.onnx")}
    evidence = {role: entry["sha256"] for role, entry in manifest["evidence"].items()}
    assert evidence["blessing"] == sha256_file(ws.runs / "gate" / "blessing.json")
    assert evidence["metrics"] == sha256_file(ws.runs / "evaluate" / "metrics.json")
    assert evidence["report_html"] == sha256_file(ws.runs / "report" / "report.html")
    for role, entry in manifest["evidence"].items():  # and what was uploaded is what was hashed
        uploaded = client.download_artifacts(mv.run_id, f"evidence/{entry['file']}", str(tmp_path / role))
        assert sha256_file(uploaded) == entry["sha256"], role
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert tags[MANIFEST_TAG] == hashlib.sha256(canonical).hexdigest()


def test_markdown_report_images_resolve_among_the_registered_evidence(promoted: dict[str, Any], tmp_path: Path):
    ws, mv = promoted["ws"], promoted["mv"]
    client = MlflowClient(ws.uri, ws.uri)
    evidence = Path(client.download_artifacts(mv.run_id, "evidence", str(tmp_path)))
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (evidence / "report.md").read_text())
    assert links, "the Markdown report shows no plots"
    missing = [link for link in links if not (evidence / link).is_file()]
    assert not missing, f"report.md links {missing}, not logged next to it"


def test_seed_and_torch_version_are_recorded_with_the_evidence(promoted: dict[str, Any]):
    ws, tags = promoted["ws"], promoted["mv"].tags
    assert tags["hardening.seed"] == "0" and tags["hardening.torch_version"] == torch.__version__
    assert json.loads((ws.runs / "purify" / "purify.json").read_text())["config"]["seed"] == 0


LIBRARIES = ("torchvision", "numpy", "onnx", "onnxruntime", "mlflow")


def test_library_versions_are_recorded_with_the_evidence(promoted: dict[str, Any]):
    ws, tags = promoted["ws"], promoted["mv"].tags
    recorded = json.dumps({**tags, **json.loads((ws.runs / "purify" / "purify.json").read_text())})
    installed = {lib: importlib.metadata.version("onnxruntime-gpu" if lib == "onnxruntime" else lib)
                 for lib in LIBRARIES}
    missing = [lib for lib, version in installed.items() if version not in recorded]
    assert not missing, f"library versions not recorded: {missing}"


def test_same_inputs_and_seed_give_identical_masks_and_metrics(base: Base, tmp_path: Path):
    p = load_params(base.root / "params.yaml")
    runs, data = base.root / "runs", base.root / "data"
    out = tmp_path / "again"
    stages.purify_stage(p.purify, p.base, runs / "pull", data / "clean.npz", out / "purify", progress=False)
    stages.fold_stage(runs / "pull", out / "purify", data / "clean.npz", out / "fold")
    stages.export_stage(p.export, p.base.seed, out / "fold", data / "clean.npz", out / "export")
    stages.evaluate_stage(p.probes, p.base.seed, runs / "pull", out / "purify", out / "fold", out / "export",
                          data / "test.npz", out / "evaluate")
    assert sha256_file(out / "purify" / "purified.safetensors") == sha256_file(runs / "purify" / "purified.safetensors")
    assert sha256_file(out / "fold" / "package" / "model.safetensors") == \
        sha256_file(runs / "fold" / "package" / "model.safetensors")

    def without_timings(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: without_timings(v) for k, v in value.items() if not k.endswith("time_s")}
        return value

    first = json.loads((runs / "evaluate" / "metrics.json").read_text())
    second = json.loads((out / "evaluate" / "metrics.json").read_text())
    # the records upstream hold wall times, so their digests differ; the data and the candidate do not
    inputs = [doc.pop("inputs") for doc in (first, second)]
    assert {k: inputs[0][k] for k in ("candidate", "test", "onnx", "params")} == \
        {k: inputs[1][k] for k in ("candidate", "test", "onnx", "params")}
    assert without_timings(second) == without_timings(first)
    history = [json.loads((d / "purify" / "purify.json").read_text())["history"] for d in (runs, out)]
    assert without_timings({"h": history[0]}) == without_timings({"h": history[1]})


# ------------------------------------------------------- 13: mixed, stale or forged evidence (issue 11) ------

def _other_candidate(ws: Workspace, tmp_path: Path, seed: int = 1) -> str:
    """Register a second candidate (other weights, same architecture) and point candidate.model at it."""
    torch.manual_seed(seed)
    spec = _candidate_spec()
    name = f"rel-other-{uuid.uuid4().hex[:8]}"
    register_candidate(save_package(spec.build().eval(), spec, tmp_path / "other-package"), name,
                       tracking_uri=ws.uri)
    ws.set_params({"candidate": {"model": f"models:/{name}@candidate"}})
    return name


def test_a_checkpoint_of_the_previous_candidate_is_never_resumed(ws: Workspace, tmp_path: Path, caplog):
    """Attack 1: a purify killed on candidate A leaves its checkpoint; the alias moves to B; purify runs again.
    It must start over on B (not log "resumed" and hand back A's masks) and the chain must name B."""
    from nft_core.purify import purify

    p = load_params(ws.root / "params.yaml")
    old, _ = stages._load_model(ws.runs / "pull" / "package")
    clean = stages.read_npz(ws.data / "clean.npz")
    purify(old, clean.dataset(), p.purify.config(p.base.seed, p.base.device, False), checkpoint=ws.runs / ".purify.0.ckpt")
    assert torch.load(ws.runs / ".purify.0.ckpt", weights_only=True)["epoch"] == p.purify.epochs  # A's finished state
    name = _other_candidate(ws, tmp_path)
    expect_exit(ws.cli("pull"), 0)
    with caplog.at_level("WARNING"):
        expect_exit(ws.cli("purify", "--no-progress"), 0)
    assert "starting over" in caplog.text and "resumed" not in caplog.text
    stages.purify_stage(p.purify, p.base, ws.runs / "pull", ws.data / "clean.npz", tmp_path / "fresh", progress=False)
    assert sha256_file(ws.runs / "purify" / "purified.safetensors") == \
        sha256_file(tmp_path / "fresh" / "purified.safetensors")
    for stage in ("fold", "export", "evaluate", "gate", "report", "promote"):
        expect_exit(ws.cli(stage), 0)
    mv = MlflowClient(ws.uri, ws.uri).get_model_version(ws.name, "1")
    assert mv.tags["hardening.source.name"] == name
    assert mv.tags["hardening.source.package_sha256"] == json.loads(
        (ws.runs / "pull" / "provenance.json").read_text())["package_sha256"]


def test_promote_refuses_outputs_of_another_candidate(ws: Workspace, tmp_path: Path):
    """Attack 2: pull a new candidate, then promote the old candidate's hardening. Nothing is registered."""
    _other_candidate(ws, tmp_path)
    expect_exit(ws.cli("pull"), 0)
    before = ws.state()
    expect_exit(ws.cli("promote"), 7, "do not form one chain", "runs/purify/purify.json was made from candidate")
    assert registry_state(ws.uri, ws.name) == ([], None)
    assert ws.state() == before
    for stage in ("fold", "evaluate", "report"):  # every stage that reads the candidate refuses the mix too
        expect_exit(ws.cli(stage), 7, "was made from candidate")
    assert ws.state() == before


def test_promote_refuses_a_blessing_edited_by_hand(ws: Workspace):
    """Attack 3: the gate rejected the model; blessing.json is edited to say blessed. @champion stays put."""
    champion = _promote_blessed(ws)
    ws.set_params({"gate": {"metrics": [{"metric": "acc", "min": 0.99}]}})  # the random-weight model is far below
    expect_exit(ws.cli("gate"), 0)
    path = ws.runs / "gate" / "blessing.json"
    blessing = json.loads(path.read_text())
    assert blessing["blessed"] is False
    forged = {**blessing, "blessed": True, "summary": "Blessed: all checks passed.",
              "checks": [{**c, "passed": True} for c in blessing["checks"]]}
    path.write_text(json.dumps(forged))
    before = ws.state()
    expect_exit(ws.cli("report"), 7, "does not follow from the recorded checks")  # no report renders it
    expect_exit(ws.cli("promote"), 7, "report.json was made from blessing")  # the report shows the real one
    # a forger who also rebinds the report's record: promote re-derives the verdict and refuses
    report = ws.runs / "report" / "report.json"
    report.write_text(json.dumps(merge(json.loads(report.read_text()), {"inputs": {"blessing": sha256_file(path)}})))
    expect_exit(ws.cli("promote"), 7, "does not follow from the recorded checks", "re-derived not blessed")
    assert {k: v for k, v in ws.state().items() if k != "runs/report/report.json"} == \
        {k: v for k, v in before.items() if k != "runs/report/report.json"}
    assert registry_state(ws.uri, ws.name) == ([(champion, "blessed")], champion)


def test_promote_refuses_a_blessing_made_with_other_gate_settings(ws: Workspace):
    ws.set_params({"gate": {"metrics": [{"metric": "acc", "min": 0.01}]}})  # edited after the gate ran
    expect_exit(ws.cli("promote"), 7, "other gate settings")
    assert registry_state(ws.uri, ws.name) == ([], None)


@pytest.mark.parametrize("record, change, refused_by", [
    ("fold/fold.json", {"passed": True, "max_abs_diff": 0.0}, "gate"),
    ("export/parity.json", {"passed": True, "argmax_agreement": 1.0}, "gate"),
    ("evaluate/metrics.json", {"hardened": {"acc": 0.99}}, "report"),
    ("purify/purify.json", {"clean_samples": 1000}, "evaluate"),
])
def test_a_record_edited_after_its_stage_is_refused_downstream(ws: Workspace, record: str, change: dict,
                                                               refused_by: str):
    path = ws.runs / record
    path.write_text(json.dumps(merge(json.loads(path.read_text()), change)))
    before = ws.state()
    expect_exit(ws.cli(refused_by), 7, f"{record.split('/')[0]}")
    expect_exit(ws.cli("promote"), 7, "do not form one chain")
    assert ws.state() == before
    assert registry_state(ws.uri, ws.name) == ([], None)


@pytest.mark.parametrize("record", ["purify/purify.json", "fold/fold.json", "gate/blessing.json"])
def test_a_record_without_its_chain_or_malformed_is_refused(ws: Workspace, record: str):
    path = ws.runs / record
    data = json.loads(path.read_text())
    data.pop("inputs")
    path.write_text(json.dumps(data))
    expect_exit(ws.cli("promote"), 7, "not a valid", "inputs")
    path.write_text("{not json")
    expect_exit(ws.cli("promote"), 7, "not a valid")
    assert registry_state(ws.uri, ws.name) == ([], None)


# ------------------------------------------------------------------------------------------------ load ------

@pytest.mark.slow
def test_load_two_concurrent_hardening_runs_against_one_server(tmp_path: Path):
    """benchmarks/load.py, reduced: two whole runs (one blessed, one rejected) race for one alias."""
    figures = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "load.py"), "--runs", "2", "--timeout", "540",
                           "--workdir", str(tmp_path / "load"), "--json", str(figures)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(figures.read_text())
    assert (result["runs"], result["blessed"], result["rejected"], result["failures"]) == (2, 1, 1, 0)
    assert result["problems"] == []
