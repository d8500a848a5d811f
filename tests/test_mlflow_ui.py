"""What a reviewer sees in the MLflow UI: a hardened version registered on a real ``mlflow server``, its version page
and its run page rendered by a real browser (headless Chromium, the UI is a JavaScript app), plus the REST answers
those pages read (description, tags, parameters, the logged model's signature and its link to the version).

Chromium is required: a missing browser fails these tests instead of skipping them."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from harden.integrity import sha256_file
from harden.registry import register_candidate, register_hardened
from harden.registry.tags import HARDENED_AS_TAG, MODEL_VERSIONS_TAG, RUN_NOTE_TAG, STATUS_TAG, VERDICT_TAG
from pipeline_fixtures import tiny_hardened

BROWSER_TIMEOUT_S = 120
SUMMARY = "Hardened from cand version 1 with nft on 50 clean images; candidate -> hardened:\n- ACC: 0.9100 -> 0.5000"
REASONS = ["acc dropped 0.41 > 0.02", "asr/badnets 0.50 > 0.05"]


def render(url: str) -> str:
    """The DOM of ``url`` after Chromium ran its JavaScript (virtual time, so the app's requests complete)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed to render the MLflow UI (Debian package `chromium`)"
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                               f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom", url],
                              capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    """A candidate and a rejected hardened version of it, registered through the real server."""
    tmp = tmp_path_factory.mktemp("ui")
    files = tiny_hardened(tmp, {"acc": 0.91, "asr/badnets": 0.98, "asr_lift/badnets": 0.98},
                          {"acc": 0.5, "asr/badnets": 0.5, "asr_lift/badnets": 0.5})
    pkg, onnx_path = files["package_dir"], files["onnx_path"]
    (tmp / "report.html").write_text("<html><body><h1>Backdoor hardening report</h1></body></html>")
    candidate, hardened = "ui-cand", "ui-cand-hardened"
    register_candidate(pkg, candidate, tracking_uri=mlflow_server)
    result = register_hardened(
        hardened, tracking_uri=mlflow_server, package_dir=pkg, onnx_path=onnx_path,
        onnx_sha256=sha256_file(onnx_path), evidence={"blessing": tmp / "blessing.json",
                                                      "report_html": tmp / "report.html"},
        metrics={f"m{i}": float(i) for i in range(47)}, tags={"hardening.source.name": candidate},
        description=f"Rejected: 2 of 5 checks failed.\n\n{SUMMARY}", blessed=False, reasons=REASONS,
        input_example=np.random.rand(1, 3, 32, 32).astype(np.float32),
        run_params={"purify": {"method": "nft", "epochs": 3, "lr": 0.2}, "seed": 0},
        run_name=f"harden-{candidate}-v1-rejected", source=(candidate, 1))
    return {"uri": mlflow_server, "name": hardened, "candidate": candidate, "result": result}


def test_version_page_shows_the_verdict_and_a_short_description(registered):
    uri, name, version = registered["uri"], registered["name"], registered["result"].version
    mv = MlflowClient(uri, uri).get_model_version(name, str(version))
    assert mv.tags[STATUS_TAG] == "rejected" and mv.tags[VERDICT_TAG] == "rejected: Rejected: 2 of 5 checks failed."
    assert len(mv.description.splitlines()) <= 14 and "m46" not in mv.description, mv.description
    assert mv.description.startswith("**REJECTED**")
    run_id = registered["result"].run_id
    assert f"runs/{run_id}/artifacts/evidence/report.html)" in mv.description

    dom = render(f"{uri}/#/models/{name}/versions/{version}")
    assert f"Version {version}" in dom, dom[-3000:]
    for text in ("REJECTED", "Rejected: 2 of 5 checks failed.", "ACC: 0.9100 -> 0.5000", REASONS[0],
                 VERDICT_TAG, f"harden-{registered['candidate']}-v1-rejected"):
        assert html.escape(text, quote=False) in dom, f"{text!r} not on the version page"
    assert 'href="#/experiments/' in dom and "evidence/report.html" in dom  # the report link is a link


def test_run_page_carries_name_params_verdict_and_description(registered):
    uri, run_id = registered["uri"], registered["result"].run_id
    run = MlflowClient(uri, uri).get_run(run_id)
    assert run.info.run_name == f"harden-{registered['candidate']}-v1-rejected"
    assert run.data.params == {"purify.method": "nft", "purify.epochs": "3", "purify.lr": "0.2", "seed": "0"}
    assert run.data.tags[VERDICT_TAG].startswith("rejected: ") and "**REJECTED**" in run.data.tags[RUN_NOTE_TAG]

    dom = render(f"{uri}/#/experiments/{run.info.experiment_id}/runs/{run_id}")
    for text in (run.info.run_name, "purify.epochs", "REJECTED", REASONS[1], VERDICT_TAG):
        assert html.escape(text, quote=False) in dom, f"{text!r} not on the run page"


def test_logged_model_has_a_signature_an_example_and_its_version(registered, tmp_path):
    uri, name, version = registered["uri"], registered["name"], registered["result"].version
    client = MlflowClient(uri, uri)
    mv = client.get_model_version(name, str(version))
    model_id = mv.source.rstrip("/").split("/")[-2]  # .../models/<model id>/artifacts (the store keeps no model_id)
    assert json.loads(client.get_logged_model(model_id).tags[MODEL_VERSIONS_TAG]) == [
        {"name": name, "version": str(version)}]
    mlmodel = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"{mv.source}/MLmodel", dst_path=str(tmp_path), tracking_uri=uri)).read_text())
    inputs = json.loads(mlmodel["signature"]["inputs"])
    outputs = json.loads(mlmodel["signature"]["outputs"])
    assert inputs == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 3, 32, 32]},
                       "name": "input"}], inputs
    assert outputs[0]["name"] == "logits" and outputs[0]["tensor-spec"]["shape"][-1] == 10
    assert "saved_input_example_info" in mlmodel


def test_the_candidate_points_at_its_hardened_version(registered):
    uri = registered["uri"]
    candidate = MlflowClient(uri, uri).get_model_version(registered["candidate"], "1")
    assert candidate.tags[HARDENED_AS_TAG] == f"{registered['name']}/{registered['result'].version}"
