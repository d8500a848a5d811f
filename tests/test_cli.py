"""``nft-harden`` end to end, as a user runs it: the real executable in a fresh directory with a tiny
``params.yaml``, an embedded sqlite registry, real training, ONNX Runtime and registration.

- ``run --with-candidate`` with a gate that must bless: exit 0, the before/after table, the registered version
  with its lineage tags (ONNX sha256 = the exported file's, params sha256 = the validated params'), a blessing,
  and the serving alias on the new version.
- Re-running ``run --strict`` in the same directory with a gate that must reject: every output is replaced
  (new candidate version pulled, new blessing), the rejected version is registered, exit 10, alias unmoved.
- Documented exit codes: invalid params 2, candidate alias missing 4, 43-class data vs a 10-class model 5.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from harden.params import load_params
from nft_core.maxmargin import margin_pvalue
from pipeline_fixtures import (BLESSING_GATE, REJECTING_GATE, alias_version, client, deep_update, describe,
                               register_random_candidate, run_cli, sqlite_uri, tiny_params, versions, write_npz_dataset,
                               write_params)

CANDIDATE = "nft-tiny"
HARDENED = "nft-tiny-hardened"
ALIAS = "champion"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _params_sha256(params_file: Path) -> str:
    """The contract of ``hardening.params_sha256``: sha256 of the validated params as canonical JSON."""
    canonical = json.dumps(load_params(params_file).model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def registry_with_candidate(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A sqlite registry holding one untrained 10-class candidate ``nft-tiny@candidate``."""
    root = tmp_path_factory.mktemp("cli-registry")
    uri = sqlite_uri(root)
    assert register_random_candidate(root, uri, CANDIDATE) == 1
    return uri


def test_bad_params_exit_2(tmp_path: Path) -> None:
    write_params(tmp_path, tiny_params(purify={"epochs": "ten"}))
    proc = run_cli(["run", "--with-candidate", "--no-progress"], cwd=tmp_path)
    assert proc.returncode == 2, describe(proc)
    assert "purify.epochs" in proc.stderr and "Traceback" not in proc.stderr, describe(proc)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists(), "nothing may run on bad params"


@pytest.mark.slow
def test_missing_candidate_alias_exit_4(tmp_path: Path, registry_with_candidate: str) -> None:
    write_params(tmp_path, tiny_params(registry_with_candidate, candidate=f"models:/{CANDIDATE}@nope"))
    proc = run_cli(["run", "--no-progress"], cwd=tmp_path)
    assert proc.returncode == 4, describe(proc)
    assert f"{CANDIDATE!r} has no alias 'nope'" in proc.stderr and "Traceback" not in proc.stderr, describe(proc)
    assert not (tmp_path / "runs" / "pull").exists(), "a failed pull must not leave an output behind"
    assert not (tmp_path / "runs" / "purify").exists()


@pytest.mark.slow
def test_class_mismatch_exit_5(tmp_path: Path, registry_with_candidate: str) -> None:
    data = write_npz_dataset(tmp_path / "gtsrb_like.npz", num_classes=43, per_class=6)
    write_params(tmp_path, tiny_params(registry_with_candidate, data={"train": f"npz:{data}", "test": f"npz:{data}"}))
    proc = run_cli(["run", "--no-progress"], cwd=tmp_path)
    assert proc.returncode == 5, describe(proc)
    assert "43 classes" in proc.stderr and "10" in proc.stderr and "Traceback" not in proc.stderr, describe(proc)
    assert (tmp_path / "runs" / "pull" / "package").is_dir(), "the failure must come from comparing model and data"
    assert not (tmp_path / "runs" / "purify").exists()
    assert versions(registry_with_candidate, HARDENED) == [], "nothing may be registered"


def _check_registered(root: Path, uri: str, number: int, status: str, source_version: int) -> dict[str, str]:
    """The hardened version ``number`` carries the lineage tags that match this directory's outputs."""
    mv = client(uri).get_model_version(HARDENED, str(number))
    tags = mv.tags
    parity = _read(root / "runs" / "export" / "parity.json")
    assert tags["hardening.status"] == status
    assert tags["hardening.source.name"] == CANDIDATE
    assert tags["hardening.source.version"] == str(source_version)
    assert tags["hardening.onnx_sha256"] == parity["onnx_sha256"] == _sha256(root / "runs" / "export" / "model.onnx")
    assert tags["hardening.params_sha256"] == _params_sha256(root / "params.yaml")
    assert tags["hardening.data.clean_sha256"] == _sha256(root / "data" / "clean.npz")
    assert tags["hardening.defense"] == "nft"
    registered = _read(root / "runs" / "promote" / "registered.json")
    assert (registered["name"], registered["version"], registered["status"]) == (HARDENED, number, status)
    return tags


@pytest.mark.slow
def test_run_blesses_then_strict_rerun_rejects(tmp_path: Path) -> None:
    uri = sqlite_uri(tmp_path)  # what the relative default sqlite:///mlflow.db resolves to in tmp_path
    params = write_params(tmp_path, tiny_params(candidate=f"models:/{CANDIDATE}@candidate", gate=BLESSING_GATE))
    assert load_params(params).base.tracking_uri == "sqlite:///mlflow.db"

    # 1. a gate that must bless: exit 0, table, registered + tagged, blessing, alias on the new version
    first = run_cli(["run", "--with-candidate", "--no-progress"], cwd=tmp_path)
    assert first.returncode == 0, describe(first)
    out = first.stdout
    stages = ["prepare", "make-candidate", "pull", "purify", "fold", "export", "evaluate", "gate", "report", "promote"]
    for stage in stages:
        assert f"== {stage}\n" in out, describe(first)
    timed = re.search(r"(?m)^stage wall times: (.*) \(total [\d.]+s\)$", out)  # parsed by benchmarks/stage_times.py
    assert timed and [part.rsplit(" ", 1)[0] for part in timed.group(1).split(", ")] == stages, describe(first)
    for row in (r"metric\s+candidate\s+hardened", r"acc\s+[\d.]+ %\s+[\d.]+ %", r"asr/badnets\s+[\d.]+ %\s+[\d.]+ %",
                r"asr_lift/badnets\s+-?[\d.]+ %\s+-?[\d.]+ %", r"inverted/asr\s+[\d.]+ %\s+[\d.]+ %",
                r"scan/backdoor_score\s+[\d.]+\s+[\d.]+"):
        assert re.search(rf"(?m)^{row}$", out), f"before/after row {row!r} missing: {describe(first)}"
    assert "gate: BLESSED" in out and f"registered: models:/{HARDENED}/1" in out, describe(first)
    assert f"alias: @{ALIAS} -> version 1" in out, describe(first)
    assert (tmp_path / "mlflow.db").is_file(), "the relative registry URI resolves against the working directory"

    blessing = _read(tmp_path / "runs" / "gate" / "blessing.json")
    assert blessing["blessed"] is True
    evaluated = _read(tmp_path / "runs" / "evaluate" / "metrics.json")  # MM-BD on both models, one class each
    candidate, hardened = evaluated["candidate"], evaluated["hardened"]
    assert len(candidate["margin/values"]) == len(hardened["margin/values"]) == 10
    assert candidate["margin/suspect_pvalue"] == candidate["margin/pvalue"]
    assert hardened["margin/suspect_pvalue"] == margin_pvalue(hardened["margin/values"], label=candidate["margin/target"])
    assert candidate["margin/suspect"] == hardened["margin/suspect"] == candidate["margin/target"]
    assert [int(v.version) for v in versions(uri, HARDENED)] == [1]
    first_tags = _check_registered(tmp_path, uri, 1, "blessed", source_version=1)
    assert alias_version(uri, HARDENED, ALIAS) == 1

    # 2. same directory, a gate that must reject, --strict: outputs replaced, registered rejected, exit 10,
    #    alias unmoved
    write_params(tmp_path, tiny_params(candidate=f"models:/{CANDIDATE}@candidate", gate=REJECTING_GATE))
    second = run_cli(["run", "--with-candidate", "--no-progress", "--strict"], cwd=tmp_path)
    assert second.returncode == 10, describe(second)
    assert "gate: REJECTED" in second.stdout and f"alias: @{ALIAS} -> version 1" in second.stdout, describe(second)
    assert "error:" in second.stderr and "Traceback" not in second.stderr, describe(second)

    assert [int(v.version) for v in versions(uri, CANDIDATE)] == [1, 2]
    assert _read(tmp_path / "runs" / "candidate" / "candidate.json")["version"] == 2
    assert _read(tmp_path / "runs" / "pull" / "provenance.json")["version"] == 2, "pull output not replaced"
    blessing = _read(tmp_path / "runs" / "gate" / "blessing.json")
    assert blessing["blessed"] is False
    failed = [c for c in blessing["checks"] if not c["passed"]]
    assert failed and all(c["reason"] for c in failed), blessing
    assert [int(v.version) for v in versions(uri, HARDENED)] == [1, 2]
    second_tags = _check_registered(tmp_path, uri, 2, "rejected", source_version=2)
    assert second_tags["hardening.reasons"], "a rejected version carries the gate's reasons"
    assert second_tags["hardening.params_sha256"] != first_tags["hardening.params_sha256"]
    assert alias_version(uri, HARDENED, ALIAS) == 1, "a rejected version must never receive the serving alias"
    assert not [p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith(".")], "leftover temp dirs"

    # 3. --strict is what turns a rejection into a failure: the same gate without it exits 0
    lenient = run_cli(["gate"], cwd=tmp_path)
    strict = run_cli(["gate", "--strict"], cwd=tmp_path)
    assert lenient.returncode == 0, describe(lenient)
    assert strict.returncode == 10, describe(strict)


@pytest.mark.slow
def test_the_policy_falls_back_when_the_first_purifier_fails_on_held_out_clean_data(tmp_path: Path) -> None:
    """Issue 14: the first purifier (fine-tuning at a learning rate that wrecks the model) fails the gate's
    accuracy check on the held-out clean images, so the policy tries the next one (fine-tuning at its paper
    settings), which passes and is the model that ships; both attempts are in purify.json and the report."""
    gate = {"metrics": [{"metric": "acc", "max_drop": 0.4}, {"metric": "asr_lift/*", "max": 1.0},
                        {"metric": "inverted/asr_lift", "max": 1.0},  # judged with the candidate's reconstructed trigger
                        {"metric": "scan/backdoor_score", "max": 1e6}],  # and each attempt's own evidence
            "required_facts": ["onnx_parity", "fold_check"]}
    params = tiny_params(candidate=f"models:/{CANDIDATE}@candidate", gate=gate)
    params = deep_update(params, {"data": {"train": "synthetic:n=2000,seed=0", "clean_per_class": 10},  # a candidate
                                  "candidate": {"demo": {"epochs": 8}},                                # that learned
                                  "policy": {"fallbacks": [{"method": "ft", "epochs": 5}], "holdout": 0.4}})
    params["purify"] = {"method": "ft", "lr": 50.0, "epochs": 5}  # the whole section: ft has none of nft's fields
    write_params(tmp_path, params)
    proc = run_cli(["run", "--with-candidate", "--no-progress"], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    purified = _read(tmp_path / "runs" / "purify" / "purify.json")
    first, second = purified["attempts"]
    assert (first["passed"], first["chosen"], second["passed"], second["chosen"]) == (False, False, True, True)
    assert first["config"]["lr"] == 50.0 and second["config"]["lr"] != 50.0 and purified["config"] == second["config"]
    assert "acc went from" in first["failed"][0] and not second["failed"]
    assert all(0 <= a["holdout"]["inverted/asr"] <= 1 and "inverted/asr_lift" in a["holdout"] for a in (first, second))
    assert all(a["holdout"]["scan/backdoor_score"] > 0 for a in (first, second))
    assert purified["holdout_samples"] and purified["clean_samples"] + purified["holdout_samples"] == 100
    report = (tmp_path / "runs" / "report" / "report.md").read_text()
    assert "Attempts of the hardening policy" in report and "ft (chosen)" in report
    assert "| Held-out backdoor score |" in report
    assert f"| {second['holdout']['scan/backdoor_score']:.4f} |" in report
    # the candidate on the same held-out images, what the attempts were judged against, is recorded and listed first
    baseline = purified["holdout_candidate"]
    assert baseline["acc"] > first["holdout"]["acc"] and {"inverted/asr", "scan/backdoor_score"} <= set(baseline)
    rows = [line for line in report.splitlines() if line.startswith("|  | candidate |") or line.startswith("| 1 | ft |")]
    assert len(rows) == 2 and rows[0].startswith("|  | candidate | — | " + f"{baseline['acc']:.4f}") and "| baseline |" in rows[0]
    assert purified["holdout_margin"] == 0.01
    assert "with a margin of 0.01 on each threshold (`policy.margin`)\n(the test set is not used here)" in report
    version = versions(sqlite_uri(tmp_path), HARDENED)[-1]  # the reviewer sees what was tried on the version page
    assert version.tags["hardening.attempts"] == "ft failed, ft passed (chosen)"
    assert version.tags["hardening.defense"] == "ft"
