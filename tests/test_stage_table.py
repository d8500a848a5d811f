"""The stage table is the one description of the stage graph: dvc.yaml, the CLI and the Kubeflow pipeline
must say what it says (issue 11: a dvc.yaml that had drifted did not re-run purify when its code changed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from harden.stage_table import STAGE_BY_NAME, STAGES

REPO = Path(__file__).resolve().parent.parent


def _path(entry: str | dict[str, Any]) -> str:
    return entry if isinstance(entry, str) else next(iter(entry))


def _uncached(entries: list[Any]) -> set[str]:
    return {_path(e) for e in entries if isinstance(e, dict) and next(iter(e.values())).get("cache") is False}


def test_dvc_yaml_says_what_the_stage_table_says() -> None:
    dvc_stages: dict[str, dict[str, Any]] = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(dvc_stages) == [s.name for s in STAGES]
    for stage in STAGES:
        entry = dvc_stages[stage.name]
        assert entry["cmd"] == stage.dvc_cmd, stage.name
        assert stage.headline is None or stage.headline in stage.metrics, f"{stage.name}: headline is no metric"
        assert sorted(entry["deps"]) == sorted(stage.deps), f"{stage.name}: deps differ from the stage table"
        assert sorted(entry.get("params", [])) == sorted(stage.params), f"{stage.name}: params differ"
        outs, metrics = entry.get("outs", []), entry.get("metrics", [])
        assert sorted(map(_path, outs + metrics)) == sorted(stage.writes), f"{stage.name}: outputs differ"
        assert sorted(map(_path, metrics)) == sorted(stage.metrics), f"{stage.name}: metrics differ"
        assert _uncached(outs + metrics) == set(stage.uncached), f"{stage.name}: cache flags differ"


def _covers(output: str, read: str) -> bool:
    return read == output or read.startswith(output + "/")


def test_every_stage_reads_only_what_an_earlier_stage_wrote_and_existing_code() -> None:
    written: list[str] = []
    for stage in STAGES:
        for read in stage.reads:
            assert any(_covers(out, read) for out in written), f"{stage.name} reads {read}, which no earlier stage writes"
        for code in stage.deps[len(stage.reads):]:
            assert (REPO / code).exists(), f"{stage.name} depends on {code}, which does not exist"
        written += stage.writes


def test_every_section_of_params_yaml_is_read_by_some_stage() -> None:
    sections = set(yaml.safe_load((REPO / "params.yaml").read_text()))
    read = {p.split(".")[0] for s in STAGES for p in s.params}
    assert sections - read == set(), f"params.yaml sections no stage declares: {sorted(sections - read)}"


def test_the_cli_has_one_command_per_stage_with_the_tables_help() -> None:
    runner = CliRunner()
    for stage in STAGES:
        result = runner.invoke(app, [stage.command, "--help"])
        assert result.exit_code == 0, result.output
        assert " ".join(stage.summary.split()[:4]) in " ".join(result.output.split()), result.output
        assert ("--strict" in result.output) == (stage.verdict is not None), stage.command
        assert ("--progress" in result.output) == stage.progress, stage.command
        assert ("--headline" in result.output) == (stage.headline is not None), stage.command


def _kfp_upstream(spec: dict[str, Any]) -> dict[str, set[str]]:
    """Each task's upstream tasks, from its artifact inputs and its explicit dependencies (nested DAGs too)."""
    graph: dict[str, set[str]] = {}

    def walk(dag: dict[str, Any]) -> None:
        for name, task in dag["tasks"].items():
            ups = set(task.get("dependentTasks", []))
            for value in task.get("inputs", {}).get("artifacts", {}).values():
                if "taskOutputArtifact" in value:
                    ups.add(value["taskOutputArtifact"]["producerTask"])
            graph[name] = ups
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                walk(component["dag"])

    walk(spec["root"]["dag"])
    return graph


@pytest.fixture(scope="module")
def kfp_graph(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    from pipeline.harden_pipeline import compile_pipeline

    out = compile_pipeline(tmp_path_factory.mktemp("kfp") / "pipeline.yaml", params_yaml=(REPO / "params.yaml").read_text(),
                           tracking_uri="http://mlflow.example:5000")
    return _kfp_upstream(next(yaml.safe_load_all(Path(out).read_text())))


@pytest.mark.parametrize("stage", [s.name for s in STAGES if s.kfp_task])
def test_the_kubeflow_task_graph_follows_the_stage_table(stage: str, kfp_graph: dict[str, set[str]]) -> None:
    graph = kfp_graph
    entry = STAGE_BY_NAME[stage]
    producers = {s.kfp_task for s in STAGES for read in entry.reads if any(_covers(w, read) for w in s.writes)}
    assert graph[entry.kfp_task] - {"validate-params-op"} == producers - {None}
