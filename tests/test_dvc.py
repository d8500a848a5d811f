"""``dvc repro`` end to end in a temporary clone of the repository, with the tiny ``params.yaml``.

Every stage that ``dvc.yaml`` lists runs and leaves its declared outputs and registers the hardened version;
``dvc metrics show`` reads the headline metrics (``metrics.json``: flat numbers); the before/after plot has a
number on its x axis; ``dvc status`` is clean; a second ``dvc repro`` runs nothing; two experiments
(``dvc exp run -S purify.epochs=2``, then ``=1``) re-run purify but neither data preparation nor the candidate,
register nothing, and ``dvc exp show`` has each one's headline metrics (not errors); a change to the purify
stage's code re-runs purify and every stage after it, and that plain ``dvc repro`` registers again. The gate here
rejects the model, and ``dvc repro`` still succeeds (the blessing records the rejection; only ``--strict`` fails
a run).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline_fixtures import (REJECTING_GATE, REPO, VENV_BIN, COMMAND_TIMEOUT_S, describe, sqlite_uri, tiny_params,
                               venv_env, versions, write_params)

HARDENED = tiny_params()["promote"]["name"]
#: Headline metrics every run of the tiny setup has (one badnets probe, scan and inversion on).
HEADLINE = ("acc", "asr/badnets", "inverted/asr", "scan/backdoor_score", "blessed", "purify_s", "candidate/acc",
            "candidate/asr/badnets")

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=venv_env(**GIT_IDENTITY), capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)


def _ok(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = _run(args, cwd)
    assert proc.returncode == 0, f"{' '.join(args)}: {describe(proc)}"
    return proc


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return _ok([str(VENV_BIN / "dvc"), *args], cwd)


def _path(entry: str | dict[str, Any]) -> str:
    """The path of a ``outs``/``deps``/``metrics``/``plots`` entry (a string, or ``{path: {options}}``)."""
    return entry if isinstance(entry, str) else next(iter(entry))


def declared_outputs(stage: dict[str, Any]) -> list[str]:
    return [_path(e) for key in ("outs", "metrics", "plots") for e in stage.get(key, [])]


def ran(output: str) -> set[str]:
    """Stages DVC ran, from its log (``Running stage 'NAME':``)."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def downstream(stages: dict[str, dict[str, Any]], start: str) -> set[str]:
    """``start`` and every stage that depends (transitively) on one of its outputs."""
    produced = {name: declared_outputs(s) for name, s in stages.items()}

    def feeds(outs: list[str], deps: list[str]) -> bool:
        return any(d == o or d.startswith(o.rstrip("/") + "/") or o.startswith(d.rstrip("/") + "/")
                   for o in outs for d in deps)

    found, frontier = {start}, [start]
    while frontier:
        current = frontier.pop()
        for name, stage in stages.items():
            if name not in found and feeds(produced[current], [_path(d) for d in stage.get("deps", [])]):
                found.add(name)
                frontier.append(name)
    return found


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A git + DVC working copy of the repository's tracked files (as they are now), tiny params committed."""
    root = tmp_path_factory.mktemp("dvc") / "repo"
    tracked = _ok(["git", "ls-files", "-z"], REPO).stdout.split("\0")
    for rel in [*tracked, ".dvc/config"]:
        if rel and (REPO / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    assert (root / "dvc.yaml").is_file() and (root / ".dvc" / "config").is_file()
    write_params(root / "params.yaml", tiny_params("sqlite:///mlflow.db", gate=REJECTING_GATE))
    _ok(["git", "init", "-q"], root)
    _ok(["git", "add", "-A"], root)
    _ok(["git", "commit", "-q", "-m", "clone for the dvc test"], root)
    yield root


@pytest.mark.slow
def test_dvc_repro_end_to_end(clone: Path) -> None:
    stages: dict[str, dict[str, Any]] = yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]
    assert {"prepare", "candidate", "purify"} <= set(stages), f"dvc.yaml stages: {sorted(stages)}"
    uri = sqlite_uri(clone)  # the params' relative sqlite:///mlflow.db, seen from the clone's root

    # 1. the whole pipeline, in order, every declared output present
    first = dvc("repro", cwd=clone)
    assert ran(first.stdout) == set(stages), describe(first)
    for name, stage in stages.items():
        for out in declared_outputs(stage):
            assert (clone / out).exists(), f"stage {name!r} declares {out} but it is missing"
    assert (clone / "dvc.lock").is_file()
    assert [int(v.version) for v in versions(uri, "nft-tiny")] == [1], "the candidate stage registers once"
    assert [int(v.version) for v in versions(uri, HARDENED)] == [1], "plain `dvc repro` registers"
    assert json.loads((clone / "runs" / "promote" / "registered.json").read_text())["registered"] is True
    if "gate" in stages:  # a rejected model does not fail `dvc repro`; the blessing records it
        assert json.loads((clone / "runs" / "gate" / "blessing.json").read_text())["blessed"] is False

    # 2. the headline metrics are DVC's one metrics file (flat numbers), the plots have numbers on their value
    #    axis, the workspace matches dvc.lock
    metric_files = [_path(m) for s in stages.values() for m in s.get("metrics", [])]
    assert metric_files == ["metrics.json"], metric_files
    shown = json.loads(dvc("metrics", "show", "--json", cwd=clone).stdout)
    headline = shown[""]["data"]["metrics.json"]["data"]
    assert set(HEADLINE) <= set(headline), headline
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in headline.values()), headline
    assert headline["blessed"] == 0 and 0.0 <= headline["acc"] <= 1.0
    table = dvc("metrics", "show", cwd=clone).stdout
    assert "metrics.json" in table and "blessed" in table and "!" not in table, table
    plots = json.loads(dvc("plots", "show", "--json", cwd=clone).stdout)
    bars = plots["data"]["runs/report/plots/before_after.json"][0]["content"]
    assert bars["encoding"]["x"] == {**bars["encoding"]["x"], "field": "value", "type": "quantitative"}
    assert bars["encoding"]["y"]["field"] == "bar"
    rows = bars["data"]["values"]
    assert {"acc (candidate)", "acc (hardened)"} <= {r["bar"] for r in rows}
    assert all(isinstance(r["value"], float) for r in rows), rows[:4]
    assert json.loads(dvc("status", "--json", cwd=clone).stdout) == {}
    _ok(["git", "add", "dvc.lock", "metrics.json", "data/.gitignore"], clone)  # the baseline experiments compare to
    _ok(["git", "commit", "-q", "-m", "dvc repro"], clone)

    # 3. nothing changed: nothing runs
    lock = (clone / "dvc.lock").read_text()
    again = dvc("repro", cwd=clone)
    assert ran(again.stdout) == set(), describe(again)
    for name in stages:
        assert f"Stage '{name}' didn't change, skipping" in again.stdout, describe(again)
    assert (clone / "dvc.lock").read_text() == lock

    # 4. an NFT hyper-parameter changes, twice: purify (and what follows) re-run, data and candidate do not;
    #    experiments register nothing; `dvc exp show` has the headline metrics of each experiment
    written: dict[int, dict[str, Any]] = {}
    for epochs in (2, 1):
        exp = dvc("exp", "run", "-S", f"purify.epochs={epochs}", cwd=clone)
        rerun = ran(exp.stdout)
        assert "purify" in rerun, describe(exp)
        assert rerun <= downstream(stages, "purify"), f"re-ran {sorted(rerun)}: {describe(exp)}"
        assert not rerun & {"prepare", "candidate", "pull"}, describe(exp)
        assert yaml.safe_load((clone / "params.yaml").read_text())["purify"]["epochs"] == epochs
        assert json.loads((clone / "runs" / "purify" / "purify.json").read_text())["config"]["epochs"] == epochs
        registered = json.loads((clone / "runs" / "promote" / "registered.json").read_text())
        assert registered["registered"] is False and "promote.register_experiments" in registered["reason"]
        assert "registered nothing, moved no alias" in exp.stdout, describe(exp)
        written[epochs] = json.loads((clone / "metrics.json").read_text())
        assert json.loads(dvc("status", "--json", cwd=clone).stdout) == {}
    assert [int(v.version) for v in versions(uri, "nft-tiny")] == [1], "the candidate was not rebuilt"
    assert [int(v.version) for v in versions(uri, HARDENED)] == [1], "experiments registered a version"
    rows = json.loads(dvc("exp", "show", "--json", cwd=clone).stdout)
    baseline = next(r for r in rows if r["rev"] != "workspace")
    experiments = {e["revs"][0]["data"]["params"]["params.yaml"]["data"]["purify"]["epochs"]: e["revs"][0]
                   for e in baseline["experiments"] or []}
    assert sorted(experiments) == [1, 2], f"experiments of the baseline: {sorted(experiments)}"
    for row in (baseline, *experiments.values()):
        metrics = row["data"]["metrics"]["metrics.json"]
        assert "error" not in metrics and set(HEADLINE) <= set(metrics["data"]), f"{row['name']}: {metrics}"
        assert isinstance(metrics["data"]["acc"], float) and metrics["data"]["blessed"] == 0, metrics
    for epochs, row in experiments.items():  # each experiment's row holds the headline that experiment wrote
        assert row["data"]["metrics"]["metrics.json"]["data"] == written[epochs], row["name"]

    # 5. the purify stage's code changes: purify and every stage after it re-run, nothing before it
    code = clone / "nft_core" / "purify.py"
    code.write_text(code.read_text() + "\n# touched by the test\n")
    touched = dvc("repro", cwd=clone)
    assert ran(touched.stdout) == downstream(stages, "purify"), describe(touched)
    assert json.loads(dvc("status", "--json", cwd=clone).stdout) == {}
    assert [int(v.version) for v in versions(uri, HARDENED)] == [1, 2], "plain `dvc repro` registers"
