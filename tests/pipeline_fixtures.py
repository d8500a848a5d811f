"""Helpers shared by the pipeline-layer tests (params, CLI, DVC, KFP): a tiny ``params.yaml`` factory, gates that
must bless or must reject, a runner for the real ``nft-harden`` executable, and registry read-back.

Import what a test module needs explicitly (``from pipeline_fixtures import ...``; pytest puts ``tests/`` on
``sys.path``); nothing here is registered as a pytest plugin.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
NFT_HARDEN = VENV_BIN / "nft-harden"

#: Generous per-command limit: a tiny end-to-end run takes well under a minute on 2 cores.
COMMAND_TIMEOUT_S = 600

#: A gate every sane hardened model passes: any accuracy, any ASR, both facts (ONNX parity, fold check) true.
BLESSING_GATE: dict[str, Any] = {
    "metrics": [{"metric": "acc", "min": 0.0}, {"metric": "asr/*", "max": 1.0}],
    "required_facts": ["onnx_parity", "fold_check"],
    "allow_no_probes": False,
    "on_missing": "error",
}

#: A gate no model of the tiny setup can pass: ASR exactly 0 on every probe *and* perfect accuracy.
REJECTING_GATE: dict[str, Any] = {
    "metrics": [{"metric": "asr/*", "max": 0.0}, {"metric": "acc", "min": 1.0}],
    "required_facts": ["onnx_parity", "fold_check"],
    "allow_no_probes": False,
    "on_missing": "error",
}


def deep_update(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in recursively (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_params(tracking_uri: str = "sqlite:///mlflow.db", *, candidate: str = "models:/nft-tiny@candidate",
                promote: str = "nft-tiny-hardened", gate: Mapping[str, Any] | None = None,
                **overrides: Any) -> dict[str, Any]:
    """The repository's ``params.yaml`` shrunk to seconds of CPU work.

    600 synthetic training images / 300 test images, 5 clean images per class, a 2-epoch demo candidate,
    3 NFT epochs on CPU, no policy fallbacks, one badnets probe, a 20-sample, 2-step scan, a 5-step trigger
    reconstruction and 5-step universal perturbations. ``overrides`` are section dicts merged
    in last (``purify={"epochs": 2}``).
    """
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = deep_update(params, {
        "base": {"seed": 0, "device": "cpu", "tracking_uri": tracking_uri},
        "data": {"train": "synthetic:n=600,seed=0", "test": "synthetic:n=300,seed=1", "clean_fraction": None,
                 "clean_per_class": 5},
        "candidate": {"model": candidate, "demo": {"epochs": 2}},
        "purify": {"epochs": 3, "batch_size": 32, "amp": False},
        "policy": {"fallbacks": []},  # one purification on the whole clean set (the policy's tests set their own)
        "export": {"parity_samples": 32},
        "probes": {"attacks": [{"attack": "badnets", "target": 0, "mode": "all2one"}],
                   "scan": {"enabled": True, "samples": 20, "steps": 2},
                   "inversion": {"enabled": True, "samples": 20, "steps": 5, "batch_size": 4},
                   "margin": {"enabled": True, "starts": 2, "steps": 5},
                   "universal": {"enabled": True, "samples": 20, "steps": 5, "batch_size": 4}},
        "gate": dict(gate if gate is not None else BLESSING_GATE),
        "promote": {"name": promote, "alias": "champion"},
    })
    return deep_update(params, overrides)


def write_params(path: Path, params: Mapping[str, Any]) -> Path:
    """Write ``params`` as YAML to ``path`` (a file, or a directory that receives ``params.yaml``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "params.yaml"
    path.write_text(yaml.safe_dump(dict(params), sort_keys=False))
    return path


def venv_env(**extra: str) -> dict[str, str]:
    """The environment with this virtual environment's ``bin`` first on PATH (for ``dvc`` stage commands)."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def run_cli(args: Sequence[str], cwd: Path, *, timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run the installed ``nft-harden`` executable in ``cwd`` and capture its output."""
    return subprocess.run([str(NFT_HARDEN), *args], cwd=cwd, env=venv_env(), capture_output=True, text=True,
                          timeout=timeout)


def describe(proc: subprocess.CompletedProcess) -> str:
    """Exit status and the tail of the output, for assertion messages."""
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


def sqlite_uri(directory: Path) -> str:
    """An absolute embedded-registry URI in ``directory`` (independent of the process's working directory)."""
    return f"sqlite:///{Path(directory).resolve()}/mlflow.db"


def client(tracking_uri: str):
    """An MLflow client on ``tracking_uri`` (tracking and registry)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def versions(tracking_uri: str, name: str) -> list:
    """Every version of registered model ``name``, oldest first (empty if the model does not exist)."""
    return sorted(client(tracking_uri).search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def alias_version(tracking_uri: str, name: str, alias: str) -> int | None:
    """The version ``name@alias`` points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client(tracking_uri).get_registered_model(name).aliases
    except MlflowException:
        return None
    return int(aliases[alias]) if alias in aliases else None


def write_npz_dataset(path: Path, *, num_classes: int, per_class: int, size: int = 32, seed: int = 0) -> Path:
    """A random uint8 N x H x W x 3 dataset with ``per_class`` images of each of ``num_classes`` labels."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    x = rng.integers(0, 256, size=(len(y), size, size, 3), dtype=np.uint8)
    np.savez(path, x=x, y=y)
    return path


def tiny_spec() -> Any:
    """The untrained 10-class, 32 x 32 ``small_cnn`` (width 8) the registry tests package."""
    from harden.package import InputSpec, ModelSpec

    return ModelSpec(builder="small_cnn", kwargs={"width": 8}, num_classes=10,
                     input=InputSpec(channels=3, height=32, width=32, mean=[0.5] * 3, std=[0.25] * 3))


def register_random_candidate(directory: Path, tracking_uri: str, name: str, alias: str = "candidate") -> int:
    """Register an untrained :func:`tiny_spec` package (seconds, no training) as ``name@alias``."""
    import torch

    from harden.package import save_package
    from harden.registry import register_candidate

    spec = tiny_spec()
    torch.manual_seed(0)
    pkg = save_package(spec.build().eval(), spec, Path(directory) / "package")
    return register_candidate(pkg, name, tracking_uri=tracking_uri, alias=alias)


def tiny_hardened(directory: Path, before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, Any]:
    """What :func:`harden.registry.register_hardened` takes for an untrained :func:`tiny_spec` model: its package,
    its ONNX export and that file's sha256, and the gate's ``blessing.json`` for ``before`` -> ``after`` (both facts
    true) as evidence, all written under ``directory``."""
    from harden.gate import evaluate_gate
    from harden.integrity import sha256_file
    from harden.onnx_export import export_onnx
    from harden.package import save_package

    directory = Path(directory)
    spec = tiny_spec()
    net = spec.build().eval()
    pkg = save_package(net, spec, directory / "package")
    onnx_path = export_onnx(spec.wrap(net), (3, 32, 32), directory / "model.onnx")
    evaluate_gate({}, dict(before), dict(after), {"onnx_parity": True, "fold_check": True}).write(directory)
    return {"package_dir": pkg, "onnx_path": onnx_path, "onnx_sha256": sha256_file(onnx_path),
            "evidence": {"blessing": directory / "blessing.json"}}
