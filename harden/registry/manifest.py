"""What a hardened version's evidence is, and what makes a version count as blessed.

Every file registered (package, ONNX, each evidence file) is listed with its sha256 in the run's
``manifest.json``, whose own digest is the version's ``hardening.manifest_sha256`` tag.

A version counts as blessed only when its tag says so **and** its registered evidence does
(:func:`blessing_problem`: manifest tag -> manifest -> blessing file -> a blessing that says blessed and follows
from its own checks), so tagging a rejected version ``blessed`` by hand does not win it the alias. Someone who
can also upload a forged run could still forge that chain: the digests bind, they do not sign.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from harden.errors import RegistryError
from harden.records import Blessing
from harden.integrity import sha256_file, sha256_tree
from harden.registry.client import Client, is_not_found
from harden.registry.tags import MANIFEST_TAG

#: Run artifact listing the sha256 of every file registered (package, ONNX, evidence).
MANIFEST_FILE = "manifest.json"
#: Evidence roles with this prefix are logged under ``evidence/plots/``, where ``report.md`` links its images.
PLOT_ROLE_PREFIX = "plot_"


def evidence_file(role: str, path: Path) -> str:
    """Where an evidence file is logged, relative to ``evidence/``."""
    return f"plots/{Path(path).name}" if role.startswith(PLOT_ROLE_PREFIX) else Path(path).name


def build_manifest(package_dir: Path, onnx_path: Path, onnx_sha: str, evidence: dict[str, Path]) -> dict[str, Any]:
    """sha256 of every file registered: the package files, the ONNX file and each evidence file by role."""
    return {"package": sha256_tree(package_dir), "onnx": {onnx_path.name: onnx_sha},
            "evidence": {role: {"file": evidence_file(role, path), "sha256": sha256_file(path)}
                         for role, path in sorted(evidence.items())}}


def manifest_sha(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces): the ``hardening.manifest_sha256`` tag."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_blessing_evidence(evidence: dict[str, Path]) -> None:
    """A blessed registration needs a ``blessing`` among its evidence that says blessed and follows from its
    checks: otherwise the alias rule (:func:`blessing_problem`) would not count the version anyway.

    Raises:
        RegistryError: no ``blessing`` role, not a blessing record, or one that does not show a blessing.
    """
    if "blessing" not in evidence:
        raise RegistryError("refusing to register a blessed version without a 'blessing' among its evidence")
    try:
        blessing = Blessing.model_validate_json(Path(evidence["blessing"]).read_bytes())
    except (OSError, ValueError) as err:
        raise RegistryError(f"refusing to register a blessed version: {evidence['blessing']} is not a blessing "
                            f"record ({err})") from err
    problems = ([] if blessing.blessed else ["it says not blessed"]) + blessing.inconsistencies()
    if problems:
        raise RegistryError(f"refusing to register a blessed version: {evidence['blessing']}: {'; '.join(problems)}")


def blessing_problem(client: Client, mv: ModelVersion) -> str | None:
    """Why ``mv``'s registered evidence does not show a blessing, or None when it does.

    The chain: the version's manifest tag -> its run's ``manifest.json`` (sha256 of the canonical JSON) -> the
    blessing file it lists (sha256) -> a :class:`~harden.gate.Blessing` that says blessed and follows from its
    own checks. A tag alone (``hardening.status=blessed`` written by hand) does not make a contender.
    Registry errors other than "not found" are raised.
    """
    if not mv.tags.get(MANIFEST_TAG) or not mv.run_id:
        return "it has no manifest tag or run"
    try:
        with tempfile.TemporaryDirectory(prefix=".verify-") as tmp:
            manifest = json.loads(Path(client.download_artifacts(mv.run_id, MANIFEST_FILE, tmp)).read_text())
            if manifest_sha(manifest) != mv.tags[MANIFEST_TAG]:
                return "its manifest differs from its manifest tag"
            entry = manifest.get("evidence", {}).get("blessing")
            if not entry:
                return "its evidence has no blessing"
            path = Path(client.download_artifacts(mv.run_id, f"evidence/{entry['file']}", tmp))
            if sha256_file(path) != entry["sha256"]:
                return "its blessing file differs from the manifest"
            blessing = Blessing.model_validate_json(path.read_bytes())
    except MlflowException as err:
        if is_not_found(err):
            return f"its evidence is missing ({err})"
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its evidence cannot be read ({type(err).__name__}: {err})"
    if not blessing.blessed:
        return "its registered blessing says not blessed"
    problems = blessing.inconsistencies()
    return "its registered blessing does not follow from its checks: " + "; ".join(problems) if problems else None
