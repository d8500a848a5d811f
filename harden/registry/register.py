"""Register model versions: a candidate from its package, and a hardened model with its ONNX flavour and evidence.

Decision: input normalisation is baked into the registered ONNX graph (see :mod:`harden.onnx_export`):
the served model takes [0, 1] float32 NCHW images named ``input`` and returns ``logits``, so a consumer of
the model version needs no mean/std from anywhere else, and the evaluated file is exactly the served one.

A hardened version is created with ``hardening.status=pending``; the status becomes ``blessed`` or
``rejected`` (with ``hardening.reasons``) once everything is logged, and only a blessed version receives
the alias, as the very last step (by the rule of :mod:`harden.registry.aliases`). Any failure after the run
started tags the version ``failed``, leaves the alias where it was (a failed version never keeps it) and raises
:class:`RegistryError`.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
import numpy as np
import onnx
from mlflow.entities import LoggedModel, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from harden.errors import RegistryError
from harden.integrity import sha256_file
from harden.onnx_export import quiet_gpu_provider_probe
from harden.package import load_package
from harden.records import RegisteredVersion
from harden.registry.aliases import claim_alias, mark_failed, sweep_pending
from harden.registry.client import (Client, Deadline, bounded_http, check_store_exists, connect, global_tracking_uri,
                                    wait_reachable)
from harden.registry.manifest import (MANIFEST_FILE, build_manifest, check_blessing_evidence, evidence_file,
                                      manifest_sha)
from harden.registry.tags import (HARDENED_AS_TAG, MANIFEST_TAG, MODEL_VERSIONS_TAG, ONNX_SHA_TAG, REASONS_TAG,
                                  RUN_NOTE_TAG, STATUS_TAG, VERDICT_TAG)

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "nft-hardening"
#: Reasons listed in a version's description (all of them are in ``hardening.reasons`` and the report).
MAX_REASONS_SHOWN = 3
#: MLflow's limits on a tag value and a parameter value (the server refuses longer ones).
MAX_TAG_VALUE = 5000
MAX_PARAM_VALUE = 6000


@dataclass(frozen=True)
class HardenedModel:
    """A hardened model as it is registered: its files, verified (:meth:`verify`) before the registry is touched,
    and the verdict, metrics and lineage tags the version carries."""

    package_dir: Path
    onnx_path: Path
    #: sha256 of ``onnx_path``, equal to the evaluated file's.
    onnx_sha256: str
    #: Artifact files by role, logged under ``evidence/`` (see :func:`~harden.registry.manifest.evidence_file`).
    evidence: dict[str, Path]
    #: sha256 of every file above (:func:`~harden.registry.manifest.build_manifest`), and of the manifest itself.
    manifest: dict[str, Any]
    manifest_sha256: str
    metrics: dict[str, float]
    tags: dict[str, str]
    #: ``"blessed"`` or ``"rejected"``.
    status: str
    #: Why it was rejected; empty when blessed.
    reasons: tuple[str, ...]
    #: The version's readable description (a few lines): verdict, the caller's summary, reasons, served input.
    description: str
    #: The caller's summary as given (its first line goes into the verdict tag of a blessed version).
    summary: str
    input_example: np.ndarray | None

    @classmethod
    def verify(cls, *, package_dir: Path, onnx_path: Path, onnx_sha256: str | None, evidence: dict[str, Path],
               metrics: dict[str, float], tags: dict[str, str], blessed: bool, reasons: list[str] | None,
               description: str, input_example: np.ndarray | None) -> HardenedModel:
        """Check the files (present, package loads, ONNX sha256 equals ``onnx_sha256`` when given, and a blessing
        that says so when ``blessed``) and build what will be registered.

        Raises:
            PackageError: ``package_dir`` does not verify.
            RegistryError: a file is missing, the ONNX hash differs, or a blessed model's blessing does not show it.
        """
        missing = [str(p) for p in [onnx_path, *evidence.values()] if not Path(p).is_file()]
        if missing:
            raise RegistryError(f"cannot register: missing file(s) {missing}")
        load_package(package_dir)
        onnx_sha = sha256_file(onnx_path)
        if onnx_sha256 is not None and onnx_sha != onnx_sha256:
            raise RegistryError(f"ONNX file {onnx_path} has sha256 {onnx_sha}, not the evaluated {onnx_sha256}; "
                                "refusing to register a file other than the one evaluated")
        manifest = build_manifest(package_dir, onnx_path, onnx_sha, evidence)
        if blessed:
            check_blessing_evidence(evidence)
        status = "blessed" if blessed else "rejected"
        why = () if blessed else tuple(reasons or ["not blessed by the gate (no reasons given)"])
        return cls(package_dir=package_dir, onnx_path=onnx_path, onnx_sha256=onnx_sha, evidence=evidence,
                   manifest=manifest, manifest_sha256=manifest_sha(manifest), metrics=metrics, tags=tags,
                   status=status, reasons=why, description=_describe(description, status, onnx_sha, metrics, why),
                   summary=description, input_example=input_example)


def _describe(summary: str, status: str, onnx_sha: str, metrics: dict[str, float], reasons: tuple[str, ...]) -> str:
    """The version's description, short enough to read at a glance (the metrics are on the run): the verdict,
    ``summary`` (the caller's headline numbers), at most three reasons, the served input/output and ONNX hash."""
    lines = [f"**{status.upper()}**", "", summary.strip()]
    if reasons:
        shown = [f"- {r}" for r in reasons[:MAX_REASONS_SHOWN]]
        more = len(reasons) - MAX_REASONS_SHOWN
        lines += ["", "Reasons:", *shown] + ([f"- ... and {more} more (see the report)"] if more > 0 else [])
    lines += ["", f"Serves float32 NCHW images in [0, 1] as 'input' (normalisation inside the graph) -> 'logits'; "
                  f"ONNX sha256 {onnx_sha[:16]}..."]
    return "\n".join(lines)


def _verdict(status: str, summary: str, reasons: tuple[str, ...]) -> str:
    """The one-line verdict tag: ``<status>: <first line of summary>`` (the reasons when there is no summary)."""
    first = summary.strip().splitlines()[0] if summary.strip() else "; ".join(reasons)
    return f"{status}: {first}"[:MAX_TAG_VALUE] if first else status


def _report_line(experiment_id: str, run_id: str, evidence: dict[str, Path]) -> str:
    """A link to the run's HTML report in MLflow's artifact viewer (a relative ``#/...`` link, so it works on
    whichever host serves the UI), or nothing when no HTML report was registered."""
    if "report_html" not in evidence:
        return ""
    path = f"evidence/{evidence_file('report_html', evidence['report_html'])}"
    return f"Report: [{posixpath.basename(path)}](#/experiments/{experiment_id}/runs/{run_id}/artifacts/{path})"


def _flat_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``params`` flattened to ``a.b`` keys with string values (lists as JSON), as MLflow run parameters."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update(_flat_params(value, f"{prefix}{key}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[f"{prefix}{key}"] = text[:MAX_PARAM_VALUE]
    return flat


def _onnx_signature(model: onnx.ModelProto) -> ModelSignature:
    """The served model's signature from the ONNX graph: named tensors, dtype and shape (-1 where dynamic)."""
    def specs(values: Any) -> Schema:
        return Schema([TensorSpec(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)),
                                  tuple(d.dim_value if d.HasField("dim_value") else -1
                                        for d in v.type.tensor_type.shape.dim), v.name) for v in values])

    initializers = {i.name for i in model.graph.initializer}
    return ModelSignature(inputs=specs([v for v in model.graph.input if v.name not in initializers]),
                          outputs=specs(model.graph.output))


def _experiment_id(client: Client, tracking_uri: str, experiment: str) -> str:
    """Get or create ``experiment``; for a sqlite store its artifacts go next to the database file."""
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    location = None
    parts = urlsplit(tracking_uri)
    if parts.scheme == "sqlite":
        db = Path(tracking_uri[len("sqlite:///"):])
        location = (db.parent / "mlartifacts" / experiment).resolve().as_uri()
    try:
        return client.create_experiment(experiment, artifact_location=location)
    except MlflowException as err:
        found = client.get_experiment_by_name(experiment) if err.error_code == "RESOURCE_ALREADY_EXISTS" else None
        if found is None:
            raise
        return found.experiment_id


def _ensure_registered_model(client: Client, name: str) -> None:
    """Create the registered model ``name`` unless it exists."""
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def register_candidate(pkg_dir: str | Path, name: str, *, tracking_uri: str, alias: str | None = "candidate",
                       tags: dict | None = None, experiment: str = DEFAULT_EXPERIMENT) -> int:
    """Log a package as run artifacts (``package/``) and create a model version from it.

    The package is verified with :func:`load_package` first. Used by demos, tests and users who start from
    a state dict. Returns the new version number; ``alias`` (if not None) is moved to it.

    Raises:
        PackageError: the package does not verify.
        RegistryError: the registry is unreachable or refuses an operation.
    """
    pkg_dir = Path(pkg_dir)
    load_package(pkg_dir)
    check_store_exists(tracking_uri, may_create=True)
    wait_reachable(tracking_uri)
    client = connect(tracking_uri)
    try:
        run = client.create_run(_experiment_id(client, tracking_uri, experiment), run_name=f"candidate-{name}",
                                tags={k: str(v) for k, v in (tags or {}).items()})
        run_id = run.info.run_id
        client.log_artifacts(run_id, str(pkg_dir), "package")
        _ensure_registered_model(client, name)
        mv = client.create_model_version(name, f"{run.info.artifact_uri}/package", run_id=run_id,
                                         tags={k: str(v) for k, v in (tags or {}).items()})
        if alias is not None:
            client.set_registered_model_alias(name, alias, mv.version)
        client.set_terminated(run_id)
    except MlflowException as err:
        raise RegistryError(f"cannot register candidate {name!r} from {pkg_dir}: {err}") from err
    return int(mv.version)


def _log_onnx(client: Client, tracking_uri: str, experiment_id: str, run_id: str, onnx_path: Path,
              expected_sha: str, input_example: np.ndarray | None) -> LoggedModel:
    """Log the ONNX flavour as a LoggedModel of the run, with the signature of its graph and ``input_example``;
    check the logged file is byte-identical."""
    logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
    proto = onnx.load(str(onnx_path))
    with global_tracking_uri(tracking_uri), quiet_gpu_provider_probe():
        mlflow.onnx.log_model(proto, name="model", model_id=logged.model_id, run_id=run_id,
                              signature=_onnx_signature(proto), input_example=input_example,
                              save_as_external_data=False,
                              pip_requirements=mlflow.onnx.get_default_pip_requirements())
    with tempfile.TemporaryDirectory() as tmp:
        got = mlflow.artifacts.download_artifacts(artifact_uri=f"{logged.artifact_location}/model.onnx",
                                                  dst_path=tmp, tracking_uri=tracking_uri)
        logged_sha = sha256_file(got)
    if logged_sha != expected_sha:
        raise RegistryError(f"logged ONNX sha256 {logged_sha} differs from the evaluated file's {expected_sha}")
    return logged


def _point_candidate(client: Client, source: tuple[str, int], hardened: str) -> None:
    """Tag the candidate's version ``source`` with ``hardening.hardened_as`` = ``hardened`` (``NAME/VERSION``).
    Best effort: the candidate may live elsewhere or be gone; that is logged and the registration goes on."""
    try:
        client.set_model_version_tag(source[0], str(source[1]), HARDENED_AS_TAG, hardened)
    except MlflowException as err:
        logger.warning("could not tag candidate %s version %s %s=%s: %s", source[0], source[1], HARDENED_AS_TAG,
                       hardened, err)


def register_hardened(name: str, *, tracking_uri: str, package_dir: str | Path, onnx_path: str | Path,
                      evidence: dict[str, Path], metrics: dict[str, float], tags: dict[str, str],
                      description: str, blessed: bool, alias: str = "champion", onnx_sha256: str | None = None,
                      input_example: np.ndarray | None = None, reasons: list[str] | None = None,
                      experiment: str = DEFAULT_EXPERIMENT, set_alias: bool = True,
                      run_params: Mapping[str, Any] | None = None, run_name: str | None = None,
                      source: tuple[str, int] | None = None) -> RegisteredVersion:
    """Register the hardened model with its evidence; move ``alias`` only when ``blessed``.

    Order: verify inputs (files present, package loads, ONNX sha256 equals ``onnx_sha256``) → run with
    tags and metrics → package (``package/``) and evidence (``evidence/``), ``manifest.json``
    (the sha256 of every registered file) artifacts → ONNX flavour (checked byte-identical after upload)
    → model version with lineage ``tags``, ``hardening.onnx_sha256``, ``hardening.manifest_sha256``, status
    ``pending`` and a short description (verdict, ``description``, a link to the HTML report) → status
    ``blessed``/``rejected`` (+ reasons, ``_hardening.verdict``) → the candidate's version ``source`` tagged
    ``hardening.hardened_as`` → alias (blessed
    only, last, by the rule of :mod:`harden.registry.aliases`: a concurrently registered higher blessed version
    keeps it, and this one is tagged ``hardening.superseded_by``).

    Args:
        name: registered model name.
        tracking_uri: MLflow tracking/registry URI.
        package_dir: the hardened model package.
        onnx_path: the evaluated ONNX file.
        evidence: artifact files by role (``metrics``, ``blessing``, ``report_md``...), logged under ``evidence/``;
            roles starting with ``plot_`` under ``evidence/plots/``, where the Markdown report links its images.
        metrics: logged on the run (the version's description stays short: ``description`` carries the
            headline numbers).
        tags: lineage tags (source model/version, data and params hashes, code version), on run and version.
        description: a few human-readable lines for the version and the run (the verdict comes before them;
            reasons, the served input and a link to ``evidence/report.html`` after).
        blessed: whether the gate blessed this model.
        alias: serving alias moved to the new version when blessed.
        onnx_sha256: sha256 of the evaluated ONNX file; registration is refused when the file differs.
        input_example: optional example batch (float32 NCHW in [0, 1]) stored with the ONNX model.
        reasons: why the model was rejected (tagged ``hardening.reasons``).
        experiment: MLflow experiment of the run.
        set_alias: move ``alias`` here when blessed; False leaves it to a later
            :func:`~harden.registry.aliases.move_alias` (the Kubeflow pipeline moves it in its own step, inside a
            ``dsl.If`` on the gate).
        run_params: logged as the run's parameters, flattened to ``a.b`` keys (the purification settings).
        run_name: the run's name; default ``harden-<name>-<status>``.
        source: the candidate's (name, version): that version is tagged ``hardening.hardened_as`` =
            ``<name>/<new version>`` (best effort: a candidate that cannot be tagged is logged, not fatal).

    Raises:
        PackageError: ``package_dir`` does not verify (checked before anything is logged).
        RegistryError: a file is missing, the ONNX hash differs, the registry is unreachable, or any later
            step fails (then the version, if created, is tagged ``hardening.status=failed``, the run is
            marked FAILED and the alias does not point at it).
    """
    model = HardenedModel.verify(package_dir=Path(package_dir), onnx_path=Path(onnx_path), onnx_sha256=onnx_sha256,
                                 evidence=evidence, metrics=metrics, tags=tags, blessed=blessed, reasons=reasons,
                                 description=description, input_example=input_example)
    check_store_exists(tracking_uri, may_create=True)
    wait_reachable(tracking_uri)
    with bounded_http():
        return _register(model, name, tracking_uri=tracking_uri, experiment=experiment,
                         claim=alias if blessed and set_alias else None, params=_flat_params(run_params or {}),
                         run_name=run_name or f"harden-{name}-{model.status}", source=source)


def _register(model: HardenedModel, name: str, *, tracking_uri: str, experiment: str, claim: str | None,
              params: dict[str, str], run_name: str, source: tuple[str, int] | None) -> RegisteredVersion:
    """Log ``model`` as a run and a new version of ``name``, write its verdict, then claim the alias ``claim``
    (None: leave the alias alone). Every call shares one deadline; on failure the version is marked failed
    (:func:`~harden.registry.aliases.mark_failed`) and the RegistryError's ``state`` says what the registry holds."""
    client = Deadline.on(tracking_uri, f"registering {name!r}")
    run_id, version, claiming, winner = None, None, False, None
    status_written = False
    try:
        sweep_pending(client, name)
        experiment_id = _experiment_id(client, tracking_uri, experiment)
        run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
        description = "\n".join(filter(None, [model.description, _report_line(experiment_id, run_id, model.evidence)]))
        verdict = _verdict(model.status, model.summary, model.reasons)
        now = int(time.time() * 1000)
        run_tags = {VERDICT_TAG: verdict, **model.tags, ONNX_SHA_TAG: model.onnx_sha256,
                    RUN_NOTE_TAG: f"Registered as {name}, see its version page.\n\n{description}"}
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in model.metrics.items()],
                         params=[Param(k, v) for k, v in params.items()],
                         tags=[RunTag(k, str(v)) for k, v in run_tags.items()])
        client.log_artifacts(run_id, str(model.package_dir), "package")
        for role, path in model.evidence.items():
            client.log_artifact(run_id, str(path), posixpath.dirname(f"evidence/{evidence_file(role, path)}"))
        client.log_dict(run_id, model.manifest, MANIFEST_FILE)
        logged = _log_onnx(client, tracking_uri, experiment_id, run_id, model.onnx_path, model.onnx_sha256,
                           model.input_example)
        _ensure_registered_model(client, name)
        # source = the artifact location, not models:/<id>: the sqlite store resolves the latter through the
        # *global* tracking URI (an MLflow TODO), which would break explicit-URI use.
        mv = client.create_model_version(
            name, logged.artifact_location, run_id=run_id, model_id=logged.model_id,
            tags={**{k: str(v) for k, v in model.tags.items()}, ONNX_SHA_TAG: model.onnx_sha256,
                  MANIFEST_TAG: model.manifest_sha256, STATUS_TAG: "pending"},
            description=description)
        version = mv.version
        client.set_logged_model_tags(logged.model_id, {MODEL_VERSIONS_TAG: json.dumps([{"name": name,
                                                                                         "version": str(version)}])})
        if model.reasons:
            client.set_model_version_tag(name, version, REASONS_TAG, "; ".join(model.reasons)[:MAX_TAG_VALUE])
        client.set_model_version_tag(name, version, VERDICT_TAG, verdict)
        client.set_model_version_tag(name, version, STATUS_TAG, model.status)
        status_written = True
        if source is not None:
            _point_candidate(client, source, f"{name}/{version}")
        client.set_terminated(run_id)
        if claim is not None:
            claiming = True
            winner = claim_alias(client, name, claim, int(version))
    except (MlflowException, RegistryError, OSError) as err:
        # the clean-up gets its own (short) deadline: the shared one may be what just ran out
        cleanup = client.renewed(60.0, f"marking {name!r} version {version} failed")
        number = int(version) if version else None
        if mark_failed(cleanup, name, version, run_id, err, claim if claiming else None):
            raise RegistryError(f"registering hardened model {name!r} failed"
                                f"{f' (version {version} tagged failed)' if version else ''}: {err}",
                                state={"version": number, "status": "failed", "alias_moved": False,
                                       "confirmed": True}) from err
        held = model.status if status_written else "pending"
        raise RegistryError(
            f"registering hardened model {name!r} failed: {err}. The registry did not answer the clean-up either, "
            f"so its state is unconfirmed: version {version} exists tagged {STATUS_TAG}={held}"
            + (f", and @{claim} may point at it (the alias write was sent)" if claiming else "")
            + ". Check the registry before serving from the alias; the next promote tags stale pending versions "
            "failed.",
            state={"version": number, "status": held, "alias_moved": "unknown" if claiming else False,
                   "confirmed": False}) from err
    moved = winner == int(version)
    superseded = winner if winner is not None and not moved else None
    logger.info("registered %s version %s: %s%s", name, version, model.status,
                f", @{claim} moved" if moved else f", superseded by version {superseded}" if superseded else "")
    return RegisteredVersion(name=name, version=int(version), run_id=run_id, alias_moved=moved, status=model.status,
                             superseded_by=superseded)
