"""The Kubeflow pipeline: what the compiled IR YAML asks a cluster for (run parameters, image, CPU and memory
on every task, GPU on purify only, node placement, secrets, retries and no caching on registry steps, the gate
condition on move-alias), the ``pipeline compile`` command, and the whole pipeline run with ``kfp.local``
against a real sqlite registry."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from harden.errors import ParamsError
from harden.params import OVERRIDES
from pipeline.terminal import BAR
from pipeline.harden_pipeline import DEFAULT_RESOURCES, RESOURCES, GpuPlacement, Secrets, compile_pipeline, run_local
from pipeline_fixtures import (BLESSING_GATE, REJECTING_GATE, REPO, alias_version, client, describe,
                               register_random_candidate, run_cli, sqlite_uri, tiny_params, versions)

IMAGE = "registry.example/nft-harden:1.2.3"
TOLERATION = {"key": "gpu-pool", "operator": "Equal", "value": "h100", "effect": "NoSchedule"}
NODE_SELECTOR = {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}

#: Tasks that talk to the registry (outside KFP's view): retried, never cached.
REGISTRY_TASKS = ("pull-candidate", "register", "move-alias")
PARAMS_TEXT = (REPO / "params.yaml").read_text()
SERVER = "http://mlflow.example:5000"
SECRETS = Secrets(mlflow="mlflow-creds", storage="store-creds")


def _load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pipeline spec and the platform (Kubernetes) spec of a compiled IR YAML."""
    docs = list(yaml.safe_load_all(Path(path).read_text()))
    assert len(docs) == 2, "expected the pipeline spec followed by the kubernetes platform spec"
    return docs[0], docs[1]


def _all_tasks(spec: dict[str, Any]) -> dict[str, tuple[dict[str, Any], str]]:
    """Every task of the root DAG and of nested DAGs (dsl.If), by display name: (task, name of its DAG)."""
    dags = {"root": spec["root"], **{name: c for name, c in spec["components"].items() if "dag" in c}}
    tasks: dict[str, tuple[dict[str, Any], str]] = {}
    for dag_name, comp in dags.items():
        for task in comp["dag"]["tasks"].values():
            display = task["taskInfo"]["name"]
            assert display not in tasks, f"two tasks named {display!r}"
            tasks[display] = (task, dag_name)
    return tasks


def _executor(spec: dict[str, Any], task: dict[str, Any]) -> str:
    return spec["components"][task["componentRef"]["name"]]["executorLabel"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    out = tmp_path_factory.mktemp("kfp") / "nested" / "pipeline.yaml"
    gpu = GpuPlacement(accelerator="nvidia.com/gpu", count=2, node_selector=NODE_SELECTOR, tolerations=[TOLERATION])
    assert compile_pipeline(out, image=IMAGE, gpu=gpu, params_yaml=PARAMS_TEXT, tracking_uri=SERVER,
                            secrets=SECRETS) == out
    return _load(out)


def test_run_parameters_the_form_shows(compiled) -> None:
    """params_yaml comes pre-filled with the params.yaml it was compiled from (the run form is no empty box);
    beside it, each override is optional, typed and described, the registry defaulting to the server given."""
    spec, _ = compiled
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert set(inputs) == {"params_yaml", *OVERRIDES}
    assert inputs["params_yaml"]["defaultValue"] == PARAMS_TEXT
    assert inputs["tracking_uri"]["defaultValue"] == SERVER
    assert inputs["max_acc_drop"]["parameterType"] == "NUMBER_DOUBLE" and inputs["candidate_model"]["parameterType"] == "STRING"
    for name in OVERRIDES:
        assert inputs[name]["isOptional"] and inputs[name]["description"], name
    unset = {n: inputs[n]["defaultValue"] for n in OVERRIDES if n != "tracking_uri"}
    assert unset == {n: -1.0 if n.startswith("max_") else "" for n in unset}, "unset: params_yaml decides"


def test_every_task_requests_cpu_and_memory(compiled) -> None:
    spec, _ = compiled
    for display, (task, _) in _all_tasks(spec).items():
        if display == "blessed":  # the dsl.If group, not a container
            continue
        want = RESOURCES.get(display, DEFAULT_RESOURCES)
        res = spec["deploymentSpec"]["executors"][_executor(spec, task)]["container"]["resources"]
        assert (res["resourceCpuRequest"], res["resourceMemoryRequest"], res["resourceMemoryLimit"]) == \
            (want.cpu, want.memory, want.memory), display
    assert RESOURCES["purify"].memory == "16G"


def test_secrets_reach_only_the_tasks_that_need_them(compiled) -> None:
    spec, platform = compiled
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = _all_tasks(spec)

    def secrets_of(display: str) -> dict[str, set[str]]:
        placed = executors.get(_executor(spec, tasks[display][0]), {})
        return {s["secretName"]: {k["envVar"] for k in s["keyToEnv"]} for s in placed.get("secretAsEnv", [])}

    mlflow, store = set(SECRETS.mlflow_keys), set(SECRETS.storage_keys)
    for display in set(tasks) - {"blessed"}:  # the dsl.If group is not a container
        want = {}
        if display in REGISTRY_TASKS:
            want["mlflow-creds"] = mlflow
        if display in (*REGISTRY_TASKS, "prepare-data"):
            want["store-creds"] = store
        assert secrets_of(display) == want, display


def test_compiling_for_a_cluster_refuses_a_local_registry(tmp_path: Path) -> None:
    """An sqlite registry is a file on one machine: every pod would open its own empty one."""
    out = tmp_path / "pipeline.yaml"
    with pytest.raises(ParamsError, match=r"sqlite:///mlflow.db.*every pod.*--tracking-uri"):
        compile_pipeline(out, params_yaml=PARAMS_TEXT)
    with pytest.raises(ParamsError, match=r"params_yaml is invalid"):
        compile_pipeline(out, params_yaml="purify: {method: magic}\n", tracking_uri=SERVER)
    assert not out.exists()
    proc = run_cli(["pipeline", "compile", "--out", str(out), "--params", str(REPO / "params.yaml")], cwd=tmp_path)
    assert proc.returncode == 2 and "every pod" in proc.stderr, describe(proc)
    assert not out.exists()


def test_validate_params_refuses_an_sqlite_registry_inside_a_pod(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The run may override the compiled registry; inside a cluster (KUBERNETES_SERVICE_HOST is set in every
    pod) the resolved one must still be a server."""
    from types import SimpleNamespace

    from components import validate_params_op

    out = SimpleNamespace(path=str(tmp_path / "params.json"), metadata={})
    run = validate_params_op.python_func
    run(params_yaml=PARAMS_TEXT, params=out, tracking_uri="", max_acc_drop=0.02)  # empty: params_yaml's
    resolved = yaml.safe_load(Path(out.path).read_text())
    assert resolved["base"]["tracking_uri"] == "sqlite:///mlflow.db"
    assert [c for c in resolved["gate"]["metrics"] if c["metric"] == "acc"][0]["max_drop"] == 0.02
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    with pytest.raises(ParamsError, match=r"inside this pod"):
        run(params_yaml=PARAMS_TEXT, params=out)
    run(params_yaml=PARAMS_TEXT, params=out, tracking_uri=SERVER)
    assert yaml.safe_load(Path(out.path).read_text())["base"]["tracking_uri"] == SERVER


def test_every_executor_uses_the_image(compiled) -> None:
    spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == 11  # validate, prepare, pull, purify, fold, export, evaluate, gate, report, register, move
    assert {name: e["container"]["image"] for name, e in executors.items()} == {name: IMAGE for name in executors}


def test_gpu_request_on_purify_only(compiled) -> None:
    spec, _ = compiled
    tasks = _all_tasks(spec)
    purify = _executor(spec, tasks["purify"][0])
    for name, executor in spec["deploymentSpec"]["executors"].items():
        accelerator = executor["container"].get("resources", {}).get("accelerator")
        if name == purify:
            assert accelerator is not None, "purify must request an accelerator"
            assert accelerator.get("resourceType", accelerator.get("type")) == "nvidia.com/gpu"
            assert str(accelerator.get("resourceCount", accelerator.get("count"))) == "2"
        else:
            assert accelerator is None, f"{name} must not request an accelerator"


def test_node_selector_and_tolerations_on_purify_only(compiled) -> None:
    spec, platform = compiled
    purify = _executor(spec, _all_tasks(spec)["purify"][0])
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    placed = {name for name, e in executors.items() if "nodeSelector" in e or "tolerations" in e}
    assert placed == {purify}, "only purify is placed on the GPU pool"
    assert executors[purify]["nodeSelector"]["labels"] == NODE_SELECTOR
    assert executors[purify]["tolerations"] == [TOLERATION]


def test_registry_tasks_retry_and_skip_the_cache(compiled) -> None:
    spec, _ = compiled
    tasks = _all_tasks(spec)
    for name in REGISTRY_TASKS:
        task, _ = tasks[name]
        assert task.get("retryPolicy", {}).get("maxRetryCount", 0) >= 1, f"{name} must retry"
        assert task["retryPolicy"].get("backoffDuration"), f"{name} must back off between retries"
        assert not task.get("cachingOptions", {}).get("enableCache", False), f"{name} must not be cached"
    # the compute steps are cacheable and not retried blindly
    for name in ("purify", "evaluate"):
        task, _ = tasks[name]
        assert task.get("cachingOptions", {}).get("enableCache") is True
        assert "retryPolicy" not in task


def test_move_alias_runs_only_when_the_gate_blessed(compiled) -> None:
    spec, _ = compiled
    tasks = _all_tasks(spec)
    move, dag = tasks["move-alias"]
    assert dag != "root", "move-alias must sit inside a dsl.If branch"
    branch = [t for t, d in tasks.values() if d == "root" and t["componentRef"]["name"] == dag]
    assert len(branch) == 1
    condition = branch[0]["triggerPolicy"]["condition"]
    gate_task = [k for k, t in spec["root"]["dag"]["tasks"].items() if t["taskInfo"]["name"] == "gate"][0]
    assert f"pipelinechannel--{gate_task}-Output" in condition and condition.replace(" ", "").endswith("==true")
    for name in ("gate", "register"):
        assert [k for k, t in spec["root"]["dag"]["tasks"].items() if t["taskInfo"]["name"] == name][0] in \
            branch[0]["dependentTasks"], f"the branch must wait for {name}"
    # the version moved is the one register returned
    assert move["inputs"]["parameters"]["version"]["componentInputParameter"].endswith("register-op-Output")


def test_pipeline_output_is_the_gate_decision(compiled) -> None:
    spec, _ = compiled
    assert spec["root"]["outputDefinitions"]["parameters"]["Output"]["parameterType"] == "BOOLEAN"
    source = spec["root"]["dag"]["outputs"]["parameters"]["Output"]["valueFromParameter"]
    assert spec["root"]["dag"]["tasks"][source["producerSubtask"]]["taskInfo"]["name"] == "gate"


def test_compile_cli(tmp_path: Path) -> None:
    out = tmp_path / "out" / "pipeline.yaml"
    proc = run_cli(["pipeline", "compile", "--out", str(out), "--image", IMAGE, "--node-selector", "a=b",
                    "--gpu-count", "4", "--params", str(REPO / "params.yaml"), "--tracking-uri", SERVER,
                    "--mlflow-secret", "mlflow-creds"], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    spec, platform = _load(out)
    purify = _executor(spec, _all_tasks(spec)["purify"][0])
    placed = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][purify]
    assert placed["nodeSelector"]["labels"] == {"a": "b"}
    assert placed["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    accelerator = spec["deploymentSpec"]["executors"][purify]["container"]["resources"]["accelerator"]
    assert str(accelerator.get("resourceCount", accelerator.get("count"))) == "4"
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {IMAGE}

    assert "mlflow-creds" in out.read_text()
    bad = run_cli(["pipeline", "compile", "--out", str(tmp_path / "bad.yaml"), "--node-selector", "no-equals",
                   "--params", str(REPO / "params.yaml"), "--tracking-uri", SERVER], cwd=tmp_path)
    assert bad.returncode == 2, describe(bad)
    assert not (tmp_path / "bad.yaml").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Task .* have no effect in the current local runner:UserWarning")
def test_run_local_moves_alias_only_when_blessed(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The fleet pipeline over two candidates (each the whole hardening pipeline, in a dsl.ParallelFor, each into
    its own hardened model), then the single pipeline with a rejecting gate."""
    from pipeline.harden_pipeline import fleet_models

    uri = sqlite_uri(tmp_path)
    alias = "champion"
    for name in ("kfp-a", "kfp-b"):
        assert register_random_candidate(tmp_path / name, uri, name) == 1

    def params(gate: dict[str, Any]) -> str:
        return yaml.safe_dump(tiny_params(uri, candidate="models:/kfp-a@candidate", promote="kfp-a-hardened", gate=gate))

    # lenient gate: blessed, registered by `register` (which never moves the alias), moved by the dsl.If branch
    fleet = fleet_models(["models:/kfp-a@candidate", "models:/kfp-b@candidate=b-served"])
    assert [m["promote_name"] for m in fleet] == ["kfp-a-hardened", "b-served"]
    assert run_local(params(BLESSING_GATE), tmp_path / "root-fleet", fleet=fleet) is True
    for name, candidate in (("kfp-a-hardened", "kfp-a"), ("b-served", "kfp-b")):
        assert [int(v.version) for v in versions(uri, name)] == [1], name
        tags = client(uri).get_model_version(name, "1").tags
        assert (tags["hardening.status"], tags["hardening.source.name"]) == ("blessed", candidate), tags
        assert alias_version(uri, name, alias) == 1, "the dsl.If branch (move-alias) did not run"
    summaries = [f.read_text() for f in (tmp_path / "root-fleet").rglob("summary")]
    assert len(summaries) == 1 and "| models:/kfp-b@candidate | b-served | blessed |" in summaries[0], summaries

    # strict gate: rejected, registered as such, alias untouched; run as the CLI runs it, components' output
    # in a log file and one line per task on the terminal
    capfd.readouterr()
    log = tmp_path / "root-rejected" / "pipeline.log"
    assert run_local(params(REJECTING_GATE), tmp_path / "root-rejected", log=log,
                     overrides={"promote_alias": "served", "max_acc_drop": -1.0}) is False
    terminal = capfd.readouterr()
    rows = [line.split() for line in terminal.out.splitlines() if re.fullmatch(r"  \S+ +\w+ +[0-9.]+s", line)]
    tasks = [row[0] for row in rows]
    assert tasks[:1] == ["validate-params-op"] and tasks[-1:] == ["register-op"] and "purify-op" in tasks, terminal
    assert {row[1] for row in rows} == {"SUCCESS"}, terminal.out
    assert "executor_input" not in terminal.out + terminal.err and "executor_input" in log.read_text()
    bars = {m["desc"] for line in log.read_text().splitlines() if (m := BAR.match(line))}
    assert {"NFT", "scan", "invert"} <= bars, f"purify's, the scan's and the inversion's progress lines: {bars}"
    hardened = "kfp-a-hardened"
    assert [int(v.version) for v in versions(uri, hardened)] == [1, 2]
    rejected = client(uri).get_model_version(hardened, "2").tags
    assert rejected["hardening.status"] == "rejected" and rejected["hardening.reasons"]
    assert alias_version(uri, hardened, alias) == 1, "a rejected version must never receive the serving alias"
    assert list((tmp_path / "root-rejected").rglob("blessing.json")), "the gate's blessing is a pipeline artifact"
    resolved = [json.loads(f.read_text()) for f in (tmp_path / "root-rejected").rglob("params") if f.is_file()]
    assert [r["promote"]["alias"] for r in resolved] == ["served"], "the promote_alias run parameter was not applied"
    checks = [{k: v for k, v in c.items() if v is not None} for c in resolved[0]["gate"]["metrics"]]
    assert checks == REJECTING_GATE["metrics"], "an unset (negative) bound changes nothing"


def test_task_lines_take_their_durations_from_kfps_own_timestamps() -> None:
    import io

    from pipeline.terminal import _Follower

    out = io.StringIO()
    follower = _Follower(Path("/dev/null"), 0, out)
    for line in ("17:09:32.508 - INFO - Executing task 'report-op'", "    [KFP Executor ...]: Got executor_input:",
                 "17:09:38.888 - INFO - Task 'report-op' finished with status SUCCESS",
                 "23:59:59.000 - INFO - Executing task 'late-op'",
                 "00:00:01.500 - INFO - Task 'late-op' finished with status FAILURE"):
        follower.handle(line)
    assert out.getvalue().splitlines() == ["  report-op            SUCCESS      6.4s",
                                           "  late-op              FAILURE      2.5s"]


def test_a_terminal_shows_the_running_tasks_progress_in_place() -> None:
    import io

    from pipeline.terminal import CLEAR, _Follower

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for out, shown in ((Terminal(), True), (io.StringIO(), False)):
        follower = _Follower(Path("/dev/null"), 0, out)
        for line in ("17:09:32.508 - INFO - Executing task 'purify-op'",
                     "NFT:  45%|####5     | 45/100 [00:20<00:24, 2.21epoch/s]",
                     "17:09:58.000 - INFO - Task 'purify-op' finished with status SUCCESS"):
            follower.handle(line)
        status = f"{CLEAR}  {'purify-op':<20} running  NFT 45/100"
        finished = f"  {'purify-op':<20} SUCCESS     25.5s\n"
        assert out.getvalue() == (f"{status}{CLEAR}{finished}" if shown else finished), repr(out.getvalue())


def test_the_fleet_pipeline_hardens_each_model_in_a_parallel_for(tmp_path: Path) -> None:
    out = tmp_path / "fleet.yaml"
    proc = run_cli(["pipeline", "compile", "--out", str(out), "--image", IMAGE, "--params", str(REPO / "params.yaml"),
                    "--tracking-uri", SERVER, "--fleet-model", "models:/fraud@candidate",
                    "--fleet-model", "models:/signs/3=signs-served"], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    spec, _ = _load(out)
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["models"]["defaultValue"] == [{"candidate_model": "models:/fraud@candidate", "promote_name": "fraud-hardened"},
                                               {"candidate_model": "models:/signs/3", "promote_name": "signs-served"}]
    assert inputs["params_yaml"]["defaultValue"] == PARAMS_TEXT
    root_tasks = spec["root"]["dag"]["tasks"]
    loop = next(t for t in root_tasks.values() if "parameterIterator" in t)
    assert loop["iteratorPolicy"]["parallelismLimit"] == 2
    summary = next(t for t in root_tasks.values() if t["taskInfo"]["name"] == "fleet-summary")
    assert "blessed" in summary["inputs"]["parameters"]
    nested = {t["taskInfo"]["name"] for c in spec["components"].values() for t in c.get("dag", {}).get("tasks", {}).values()}
    assert {"purify", "gate", "register", "move-alias"} <= nested, "each iteration is the whole hardening pipeline"
    for bad, pattern in ((["models:/x@candidate", "models:/x@staging"], "same hardened model"), (["nope@@"], "is not models:/")):
        proc = run_cli(["pipeline", "compile", "--out", str(tmp_path / "bad.yaml"), "--params", str(REPO / "params.yaml"),
                        "--tracking-uri", SERVER, *[a for m in bad for a in ("--fleet-model", m)]], cwd=tmp_path)
        assert proc.returncode == 2 and pattern in proc.stderr, describe(proc)
    assert not (tmp_path / "bad.yaml").exists()
