"""Stage-level behaviour not covered through the CLI tests."""

import json

from harden.params import parse_params
from harden.stages import library_versions, make_demo_candidate


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
