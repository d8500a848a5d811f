"""Stage-level behaviour not covered through the CLI tests."""

import json
from types import SimpleNamespace

import pytest

from harden.params import parse_params
from harden.stages import dvc_experiment, library_versions, make_demo_candidate


def test_disabled_demo_candidate_registers_nothing(tmp_path):
    registry = tmp_path / "mlflow.db"
    params = parse_params({"base": {"tracking_uri": f"sqlite:///{registry}"},
                           "candidate": {"model": "models:/mine@candidate", "demo": {"enabled": False}},
                           "purify": {"method": "nft"}})
    summary = make_demo_candidate(params, tmp_path / "candidate")
    assert "skipped" in summary
    assert json.loads((tmp_path / "candidate" / "candidate.json").read_text()) == summary
    assert not registry.exists()  # no registry was even opened, let alone written


def test_library_versions_name_the_installed_packages():
    versions = library_versions()
    assert {"python", "torch", "torchvision", "onnxruntime-gpu", "mlflow"} <= set(versions)
    assert all(isinstance(v, str) and v[0].isdigit() for v in versions.values())


def test_library_versions_say_which_onnxruntime_ran_and_never_crash_on_a_missing_package(monkeypatch):
    import importlib.metadata

    import harden.stages as stages

    real = importlib.metadata.version

    def without_gpu_build(name: str) -> str:  # the CPU build installed instead of the GPU one
        if name == "onnxruntime":
            return "1.30.0"
        if name == "onnxruntime-gpu":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", without_gpu_build)
    monkeypatch.setattr(stages, "RECORDED_LIBRARIES", ("onnxruntime-gpu", "no-such-distribution-xyz"))
    versions = stages.library_versions()
    assert versions["onnxruntime-gpu"] == "1.30.0 (onnxruntime)"
    assert versions["no-such-distribution-xyz"] == "not installed"


def test_dvc_experiment_is_read_from_the_variable_dvc_exp_run_sets():
    assert dvc_experiment({"DVC_EXP_NAME": "quare-robe", "DVC_EXP_BASELINE_REV": "abc"}) == "quare-robe"
    assert dvc_experiment({"DVC_ROOT": "/repo"}) is None  # `dvc repro` sets DVC_ROOT and DVC_STAGE, not this
    assert dvc_experiment({"DVC_EXP_NAME": ""}) is None


@pytest.fixture
def promote_spy(monkeypatch, tmp_path):
    """``promote_stage`` with the chain check, the blessing check and registration replaced by recorders."""
    import harden.stages as stages

    calls: list[str] = []
    chain = SimpleNamespace(digest=lambda name: f"sha-of-{name}")
    monkeypatch.setattr(stages, "check_chain", lambda **dirs: calls.append("check_chain") or chain)
    monkeypatch.setattr(stages, "verify_blessing",
                        lambda gate, c: calls.append("verify_blessing") or SimpleNamespace(blessed=True, summary="Blessed"))
    monkeypatch.setattr(stages, "register_stage", lambda params, **dirs: calls.append("register_stage") or "registered")
    dirs = {name: tmp_path / name for name in ("pull_dir", "fold_dir", "export_dir", "clean_npz", "test_npz",
                                               "purify_dir", "evaluate_dir", "gate_dir", "report_dir", "out_dir")}

    def promote(experiment, **promote_params):
        params = parse_params({"base": {"tracking_uri": "sqlite:///mlflow.db"}, "purify": {"method": "nft"},
                               "promote": {"name": "hardened", **promote_params}})
        return stages.promote_stage(params, experiment=experiment, **dirs)

    return SimpleNamespace(promote=promote, calls=calls, out=dirs["out_dir"])


def test_promote_inside_a_dvc_experiment_registers_nothing_and_says_why(promote_spy):
    record = promote_spy.promote("quare-robe")
    assert promote_spy.calls == ["check_chain", "verify_blessing"]  # the evidence is still verified
    written = json.loads((promote_spy.out / "registered.json").read_text())
    assert written["registered"] is False and record.registered is False
    assert written["experiment"] == "quare-robe" and "promote.register_experiments" in written["reason"]
    assert (written["name"], written["alias"], written["blessed"]) == ("hardened", "champion", True)
    from harden.stage_table import STAGE_BY_NAME

    line = STAGE_BY_NAME["promote"].describe(record, None, None)
    assert line.startswith("registered nothing, moved no alias: inside DVC experiment 'quare-robe'"), line


@pytest.mark.parametrize(("experiment", "register_experiments"), [(None, False), ("quare-robe", True)])
def test_promote_registers_outside_experiments_or_when_asked(promote_spy, experiment, register_experiments):
    assert promote_spy.promote(experiment, register_experiments=register_experiments) == "registered"
    assert promote_spy.calls == ["register_stage"]
    assert not (promote_spy.out / "registered.json").exists()
