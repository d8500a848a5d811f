"""MLflow model registry adapter: pull a candidate package, register candidates and hardened versions.

Conventions: aliases (``@candidate``, ``@champion``) and tags only, never stages. Every
call takes the tracking URI explicitly (``sqlite:///<dir>/mlflow.db`` embedded, or an ``http://`` server);
the registry URI is the same. Nothing global is left changed: ``mlflow.onnx.log_model`` reads the global
tracking URI, so it runs inside :func:`_global_tracking_uri`, which restores the previous value.

Decision: input normalisation is baked into the registered ONNX graph (see :mod:`harden.onnx_export`):
the served model takes [0, 1] float32 NCHW images named ``input`` and returns ``logits``, so a consumer of
the model version needs no mean/std from anywhere else, and the evaluated file is exactly the served one.

A hardened version is created with ``hardening.status=pending``; the status becomes ``blessed`` or
``rejected`` (with ``hardening.reasons``) once everything is logged, and only a blessed version receives
the alias, as the very last step. Any failure after the run started tags the version ``failed``, leaves the
alias where it was (a failed version never keeps it) and raises :class:`RegistryError`.

Concurrent promotions (rule): **the highest blessed version number holds the alias.** Version numbers are
assigned by the registry in creation order, so this is "the newest blessed hardening wins", whatever order
the alias writes land in. MLflow has no compare-and-set on aliases, so every promoter converges instead
(:func:`_claim_alias`): it reads the blessed versions and the alias holder, points the alias at the highest
blessed version when the two differ, and repeats until a read after its last write agrees. Because a version
is tagged ``blessed`` before it touches the alias and the set of blessed versions only grows, the last writer's
check sees every contender, so the alias ends on the highest blessed version. Every lower blessed version is
then tagged ``hardening.superseded_by=<winner>`` (the loser of a race, and the previous champion), so no
blessed version is silently lost. To roll back, set the bad version's ``hardening.status`` to ``revoked``
(it then no longer counts as blessed) and move the alias by hand.

A version counts as blessed only when its tag says so **and** its registered evidence does
(:func:`blessing_problem`: manifest tag -> manifest -> blessing file -> a blessing that says blessed and follows
from its own checks), so tagging a rejected version ``blessed`` by hand does not win it the alias. Someone who
can also upload a forged run could still forge that chain: the digests bind, they do not sign.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import random
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
import numpy as np
import onnx
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, Metric, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from harden.errors import RegistryError
from harden.integrity import atomic_dir, sha256_file, sha256_tree
from harden.package import SPEC_FILE, WEIGHTS_FILE, ModelSpec, find_pickles, load_package, save_package
from harden.params import MODEL_REF
from harden.records import Provenance, RegisteredVersion, tree_sha256

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "nft-hardening"
STATUS_TAG = "hardening.status"
REASONS_TAG = "hardening.reasons"
ONNX_SHA_TAG = "hardening.onnx_sha256"
SUPERSEDED_TAG = "hardening.superseded_by"
MANIFEST_TAG = "hardening.manifest_sha256"
#: Run artifact listing the sha256 of every file registered (package, ONNX, evidence).
MANIFEST_FILE = "manifest.json"
#: Bound on read/write rounds while concurrent promoters converge on one alias holder.
CLAIM_ROUNDS = 20
#: Failed alias writes tolerated while claiming (concurrent first writes of an alias collide in MLflow's store).
ALIAS_WRITE_ATTEMPTS = 3
_NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
_REF = MODEL_REF
#: Every registration shares one deadline (seconds): a registry that stops answering mid-promote ends it
#: within DEADLINE_S plus one call's bound (below), with a RegistryError that says what the registry holds.
DEADLINE_S = 300.0
#: One HTTP call's bound: MLflow's own retries (default 7 with backoff factor 2, about 8.5 minutes) lowered to
#: 2 retries, backoff factor 1, 10 s timeout, unless the user set these variables; set only while we call MLflow.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
#: A version left ``pending`` longer than this by an interrupted promote is tagged failed by the next one.
PENDING_STALE_S = 3600.0


def parse_model_ref(ref: str) -> tuple[str, str | None, int | None]:
    """Split ``models:/name@alias``, ``models:/name/3``, ``name@alias`` or ``name/3``.

    Returns:
        ``(name, alias, version)`` with exactly one of alias/version set.

    Raises:
        RegistryError: ``ref`` has none of these forms.
    """
    match = _REF.match(ref.strip())
    if match is None:
        raise RegistryError(f"bad model reference {ref!r}: expected 'models:/NAME@ALIAS', 'models:/NAME/VERSION', "
                            "'NAME@ALIAS' or 'NAME/VERSION'")
    version = match["version"]
    return match["name"], match["alias"], int(version) if version is not None else None


def strip_credentials(uri: str) -> str:
    """``uri`` without ``user:password@`` (safe to record in provenance and logs)."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def wait_reachable(tracking_uri: str, *, retries: int = 3, backoff_s: float = 0.5, timeout_s: float = 5.0) -> None:
    """For an ``http(s)`` URI, check the server answers, retrying with exponential backoff.

    Any HTTP response (even 401/404) counts as reachable; refused connections, DNS errors and timeouts do
    not. Other schemes (``sqlite``, ``file``) are local and return at once. This bounds the time lost on a
    dead server (MLflow's own HTTP retries would otherwise wait minutes).

    Raises:
        RegistryError: still unreachable after ``retries`` attempts.
    """
    if urlsplit(tracking_uri).scheme not in ("http", "https"):
        return
    last: Exception | None = None
    for attempt in range(max(1, retries)):
        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as err:
            last = err
            logger.warning("registry %s unreachable (attempt %d/%d): %s", strip_credentials(tracking_uri),
                           attempt + 1, retries, err)
            if attempt + 1 < retries:
                time.sleep(backoff_s * 2 ** attempt)
    raise RegistryError(f"MLflow registry at {strip_credentials(tracking_uri)} is unreachable after "
                        f"{max(1, retries)} attempts: {last}")


def _client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@contextmanager
def bounded_http() -> Iterator[None]:
    """MLflow's HTTP retries and timeout bounded by :data:`HTTP_BOUNDS` (where the user set none), restored after."""
    added = {k: v for k, v in HTTP_BOUNDS.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class _Deadline:
    """An MlflowClient whose every call first checks a shared deadline (RegistryError once it has passed)."""

    def __init__(self, client: MlflowClient, seconds: float, what: str):
        self._client, self._end, self._seconds, self._what = client, time.monotonic() + seconds, seconds, what

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if time.monotonic() > self._end:
                raise RegistryError(f"{self._what}: the {self._seconds:.0f} s deadline passed before {name}")
            return attr(*args, **kwargs)
        return call


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_store_exists(tracking_uri: str, *, may_create: bool = False) -> None:
    """For a ``sqlite:///PATH`` URI, refuse a database file that does not exist (unless ``may_create``), and
    a file that exists but is not an SQLite database (an empty file included).

    MLflow silently creates a new, empty database (and its directories) for a mistyped path, and writes its
    schema into any empty file; reading from that would fail later with a misleading "model does not exist".
    Other schemes return at once.

    Raises:
        RegistryError: the sqlite database file is missing, or is not an SQLite database.
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return
    db = Path(tracking_uri[len(prefix):])
    if not db.exists():
        if may_create:
            return
        raise RegistryError(f"no MLflow database at {db} (tracking URI {tracking_uri}): wrong base.tracking_uri?")
    try:
        with open(db, "rb") as fh:
            magic = fh.read(len(SQLITE_MAGIC))
    except OSError as err:
        raise RegistryError(f"cannot read the MLflow database {db}: {err}") from err
    if magic != SQLITE_MAGIC:
        raise RegistryError(f"{db} is not an SQLite database ({db.stat().st_size} bytes; tracking URI "
                            f"{tracking_uri}); refusing to let MLflow write its schema into it")


@contextmanager
def _global_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """Temporarily set MLflow's global tracking URI (for fluent-only APIs), then restore the previous one."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _is_not_found(err: MlflowException) -> bool:
    return err.error_code == _NOT_FOUND or "not found" in str(err).lower()


def _resolve(client: MlflowClient, name: str, alias: str | None, version: int | None):
    """The :class:`ModelVersion` for ``name@alias`` or ``name/version``; RegistryError naming what is missing."""
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if _is_not_found(err):
            raise RegistryError(f"registered model {name!r} does not exist") from err
        raise RegistryError(f"cannot read registered model {name!r}: {err}") from err
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        what = f"alias {alias!r}" if alias is not None else f"version {version}"
        if _is_not_found(err):
            raise RegistryError(f"registered model {name!r} has no {what}") from err
        raise RegistryError(f"cannot resolve {what} of model {name!r}: {err}") from err


def _locate_package(root: Path) -> Path:
    """The directory under ``root`` holding ``model.json`` + ``model.safetensors`` (shallowest), else the
    directory of the first pickle (so that :func:`load_package` refuses or, with opt-in, loads it)."""
    for spec in sorted(root.rglob(SPEC_FILE), key=lambda p: len(p.parts)):
        if (spec.parent / WEIGHTS_FILE).is_file():
            return spec.parent
    pickles = find_pickles(root)
    if pickles:
        return pickles[0].parent
    raise RegistryError(f"no model package ({SPEC_FILE} + {WEIGHTS_FILE}) in the downloaded artifacts "
                        f"{sorted(p.relative_to(root).as_posix() for p in root.rglob('*') if p.is_file())[:20]}")


def _download_version(client: MlflowClient, tracking_uri: str, mv, into: Path) -> tuple[Path, str]:
    """Download the version's source artifacts into ``into``; fall back to the run's ``package/``."""
    source = client.get_model_version_download_uri(mv.name, mv.version)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(into / "source"),
                                                         tracking_uri=tracking_uri, registry_uri=tracking_uri))
    except ImportError as err:  # an artifact store whose client library is not installed (boto3 for s3://)
        raise RegistryError(f"{mv.name} version {mv.version} is stored at {source!r}, and this environment lacks "
                            f"the library that artifact store needs ({err.name or err}); install it (s3: boto3, "
                            "gs: google-cloud-storage, azure: azure-storage-blob)") from err
    except (MlflowException, OSError):
        raise
    except Exception as err:  # the artifact store's own client failed (botocore, google.api_core, ...)
        raise RegistryError(f"cannot download {mv.name} version {mv.version} from {source!r}: "
                            f"{type(err).__name__}: {err}") from err
    has_package = any((p.parent / WEIGHTS_FILE).is_file() for p in local.rglob(SPEC_FILE)) if local.is_dir() else False
    if not has_package and not find_pickles(local) and mv.run_id:
        try:
            local = Path(client.download_artifacts(mv.run_id, "package", str(into / "run")))
            source = f"runs:/{mv.run_id}/package"
        except (MlflowException, OSError) as err:
            logger.info("run %s has no 'package' artifact: %s", mv.run_id, err)
    return local, source


def pull(ref: str, dest: str | Path, *, tracking_uri: str, allow_pickle: bool = False, retries: int = 3,
         backoff_s: float = 0.5, spec: ModelSpec | None = None) -> Provenance:
    """Pull a model version's package from the registry, verify it, and record its provenance.

    Writes ``dest/package/`` (``model.json`` + ``model.safetensors``, verified by :func:`load_package`) and
    ``dest/provenance.json``, each atomically; nothing is written when any step fails.

    Args:
        ref: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``NAME@ALIAS`` or ``NAME/VERSION``.
        dest: output directory.
        tracking_uri: MLflow tracking/registry URI.
        allow_pickle: opt in to loading a pickled model (logs a WARNING); it is re-saved as safetensors.
        retries: attempts to reach an ``http(s)`` registry before giving up.
        backoff_s: first wait between attempts (doubles each time).
        spec: architecture to use instead of the package's ``model.json`` (for an opted-in pickle, e.g. an
            ``mlflow.pytorch`` model, which has none).

    Raises:
        RegistryError: bad ref, sqlite database missing, registry unreachable, model/alias/version missing,
            no package found.
        PackageError: the package fails verification (or is a pickle and ``allow_pickle`` is False).
    """
    name, alias, version = parse_model_ref(ref)
    check_store_exists(tracking_uri)
    wait_reachable(tracking_uri, retries=retries, backoff_s=backoff_s)
    client = _Deadline(_client(tracking_uri), DEADLINE_S, f"pulling {ref!r}")
    with bounded_http():
        mv = _resolve(client, name, alias, version)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with bounded_http(), tempfile.TemporaryDirectory(prefix=".pull-", dir=dest) as tmp:
        try:
            local, source = _download_version(client, tracking_uri, mv, Path(tmp))
        except (MlflowException, OSError) as err:
            raise RegistryError(f"cannot download artifacts of {name!r} version {mv.version}: {err}") from err
        files = sha256_tree(local) if local.is_dir() else {local.name: sha256_file(local)}
        pkg = _locate_package(local if local.is_dir() else local.parent)
        net, spec = load_package(pkg, allow_pickle=allow_pickle, spec=spec)
        with atomic_dir(dest / "package") as out:
            if (pkg / WEIGHTS_FILE).is_file():
                shutil.copy2(pkg / SPEC_FILE, out / SPEC_FILE)
                shutil.copy2(pkg / WEIGHTS_FILE, out / WEIGHTS_FILE)
            else:
                save_package(net, spec, out)
    prov = Provenance(
        inputs={}, model_name=name, version=int(mv.version), run_id=mv.run_id, source_uri=source,
        aliases=sorted(mv.aliases or []), tracking_uri=strip_credentials(tracking_uri), files_sha256=files,
        package_sha256=tree_sha256(dest / "package"), pulled_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    prov.write(dest)
    logger.info("pulled %s version %s (%s) into %s", name, mv.version, source, dest)
    return prov


def _experiment_id(client: MlflowClient, tracking_uri: str, experiment: str) -> str:
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
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(experiment).experiment_id


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
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
    client = _client(tracking_uri)
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


def _describe(description: str, status: str, onnx_sha: str, metrics: dict[str, float], reasons: list[str]) -> str:
    lines = [description.strip(), "", f"Hardening status: {status}", f"ONNX sha256: {onnx_sha}",
             "Input: float32 NCHW images in [0, 1] named 'input' (normalisation is inside the graph); "
             "output 'logits'."]
    if metrics:
        lines += ["", "Metrics:"] + [f"- {k}: {v:.4g}" for k, v in sorted(metrics.items())]
    if reasons:
        lines += ["", "Reasons:"] + [f"- {r}" for r in reasons]
    return "\n".join(lines)


def _check_blessing_evidence(evidence: dict[str, Path]) -> None:
    """A blessed registration needs a ``blessing`` among its evidence that says blessed and follows from its
    checks: otherwise the alias rule (:func:`blessing_problem`) would not count the version anyway."""
    from harden.gate import Blessing

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


def _check_inputs(package_dir: Path, onnx_path: Path, evidence: dict[str, Path], onnx_sha256: str | None) -> str:
    """Verify the files before anything is logged; returns the ONNX file's sha256."""
    missing = [str(p) for p in [onnx_path, *evidence.values()] if not Path(p).is_file()]
    if missing:
        raise RegistryError(f"cannot register: missing file(s) {missing}")
    load_package(package_dir)
    actual = sha256_file(onnx_path)
    if onnx_sha256 is not None and actual != onnx_sha256:
        raise RegistryError(f"ONNX file {onnx_path} has sha256 {actual}, not the evaluated {onnx_sha256}; "
                            "refusing to register a file other than the one evaluated")
    return actual


def _log_onnx(client: MlflowClient, tracking_uri: str, experiment_id: str, run_id: str, onnx_path: Path,
              expected_sha: str, input_example: np.ndarray | None) -> LoggedModel:
    """Log the ONNX flavour as a LoggedModel of the run; check the logged file is byte-identical."""
    logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
    with _global_tracking_uri(tracking_uri):
        mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="model", model_id=logged.model_id, run_id=run_id,
                              input_example=input_example, save_as_external_data=False,
                              pip_requirements=mlflow.onnx.get_default_pip_requirements())
    with tempfile.TemporaryDirectory() as tmp:
        got = mlflow.artifacts.download_artifacts(artifact_uri=f"{logged.artifact_location}/model.onnx",
                                                  dst_path=tmp, tracking_uri=tracking_uri)
        logged_sha = sha256_file(got)
    if logged_sha != expected_sha:
        raise RegistryError(f"logged ONNX sha256 {logged_sha} differs from the evaluated file's {expected_sha}")
    return logged


#: Evidence roles with this prefix are logged under ``evidence/plots/``, where ``report.md`` links its images.
PLOT_ROLE_PREFIX = "plot_"


def _evidence_file(role: str, path: Path) -> str:
    """Where an evidence file is logged, relative to ``evidence/``."""
    return f"plots/{Path(path).name}" if role.startswith(PLOT_ROLE_PREFIX) else Path(path).name


def _manifest(package_dir: Path, onnx_path: Path, onnx_sha: str, evidence: dict[str, Path]) -> dict[str, Any]:
    """sha256 of every file registered: the package files, the ONNX file and each evidence file by role."""
    return {"package": sha256_tree(package_dir), "onnx": {onnx_path.name: onnx_sha},
            "evidence": {role: {"file": _evidence_file(role, path), "sha256": sha256_file(path)}
                         for role, path in sorted(evidence.items())}}


def register_hardened(name: str, *, tracking_uri: str, package_dir: str | Path, onnx_path: str | Path,
                      evidence: dict[str, Path], metrics: dict[str, float], tags: dict[str, str],
                      description: str, blessed: bool, alias: str = "champion", onnx_sha256: str | None = None,
                      input_example: np.ndarray | None = None, reasons: list[str] | None = None,
                      experiment: str = DEFAULT_EXPERIMENT, set_alias: bool = True) -> RegisteredVersion:
    """Register the hardened model with its evidence; move ``alias`` only when ``blessed``.

    Order: verify inputs (files present, package loads, ONNX sha256 equals ``onnx_sha256``) → run with
    tags and metrics → package (``package/``) and evidence (``evidence/``), ``manifest.json``
    (the sha256 of every registered file) artifacts → ONNX flavour (checked byte-identical after upload)
    → model version with lineage ``tags``, ``hardening.onnx_sha256``, ``hardening.manifest_sha256``, status
    ``pending`` and a readable description → status ``blessed``/``rejected`` (+ reasons) → alias (blessed
    only, last, by the rule in the module docstring: a concurrently registered higher blessed version keeps
    it, and this one is tagged ``hardening.superseded_by``).

    Args:
        name: registered model name.
        tracking_uri: MLflow tracking/registry URI.
        package_dir: the hardened model package.
        onnx_path: the evaluated ONNX file.
        evidence: artifact files by role (``metrics``, ``blessing``, ``report_md``...), logged under ``evidence/``;
            roles starting with ``plot_`` under ``evidence/plots/``, where the Markdown report links its images.
        metrics: logged on the run.
        tags: lineage tags (source model/version, data and params hashes, code version), on run and version.
        description: human-readable summary for the version (status, ONNX hash, metrics are appended).
        blessed: whether the gate blessed this model.
        alias: serving alias moved to the new version when blessed.
        onnx_sha256: sha256 of the evaluated ONNX file; registration is refused when the file differs.
        input_example: optional example batch (float32 NCHW in [0, 1]) stored with the ONNX model.
        reasons: why the model was rejected (tagged ``hardening.reasons``).
        experiment: MLflow experiment of the run.
        set_alias: move ``alias`` here when blessed; False leaves it to a later :func:`move_alias` (the Kubeflow
            pipeline moves it in its own step, inside a ``dsl.If`` on the gate).

    Raises:
        PackageError: ``package_dir`` does not verify (checked before anything is logged).
        RegistryError: a file is missing, the ONNX hash differs, the registry is unreachable, or any later
            step fails (then the version, if created, is tagged ``hardening.status=failed``, the run is
            marked FAILED and the alias does not point at it).
    """
    package_dir, onnx_path = Path(package_dir), Path(onnx_path)
    onnx_sha = _check_inputs(package_dir, onnx_path, evidence, onnx_sha256)
    manifest = _manifest(package_dir, onnx_path, onnx_sha, evidence)
    manifest_sha = _manifest_sha(manifest)
    if blessed:
        _check_blessing_evidence(evidence)
    status = "blessed" if blessed else "rejected"
    reasons = [] if blessed else (reasons or ["not blessed by the gate (no reasons given)"])
    check_store_exists(tracking_uri, may_create=True)
    wait_reachable(tracking_uri)
    with bounded_http():
        return _register_hardened(name, tracking_uri, package_dir, onnx_path, onnx_sha, evidence, metrics, tags,
                                  description, blessed, alias, manifest, manifest_sha, status, reasons, set_alias,
                                  experiment, input_example)


def _register_hardened(name: str, tracking_uri: str, package_dir: Path, onnx_path: Path, onnx_sha: str,
                       evidence: dict[str, Path], metrics: dict[str, float], tags: dict[str, str], description: str,
                       blessed: bool, alias: str, manifest: dict[str, Any], manifest_sha: str, status: str,
                       reasons: list[str], set_alias: bool, experiment: str, input_example: Any) -> RegisteredVersion:
    client = _Deadline(_client(tracking_uri), DEADLINE_S, f"registering {name!r}")
    run_id, version, claiming, winner = None, None, False, None
    status_written = False
    try:
        _sweep_pending(client, name)
        experiment_id = _experiment_id(client, tracking_uri, experiment)
        run_id = client.create_run(experiment_id, run_name=f"harden-{name}").info.run_id
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                         tags=[RunTag(k, str(v)) for k, v in {**tags, ONNX_SHA_TAG: onnx_sha}.items()])
        client.log_artifacts(run_id, str(package_dir), "package")
        for role, path in evidence.items():
            client.log_artifact(run_id, str(path), posixpath.dirname(f"evidence/{_evidence_file(role, path)}"))
        client.log_dict(run_id, manifest, MANIFEST_FILE)
        logged = _log_onnx(client, tracking_uri, experiment_id, run_id, onnx_path, onnx_sha, input_example)
        _ensure_registered_model(client, name)
        # source = the artifact location, not models:/<id>: the sqlite store resolves the latter through the
        # *global* tracking URI (an MLflow TODO), which would break explicit-URI use.
        mv = client.create_model_version(
            name, logged.artifact_location, run_id=run_id, model_id=logged.model_id,
            tags={**{k: str(v) for k, v in tags.items()}, ONNX_SHA_TAG: onnx_sha, MANIFEST_TAG: manifest_sha,
                  STATUS_TAG: "pending"},
            description=_describe(description, status, onnx_sha, metrics, reasons))
        version = mv.version
        if reasons:
            client.set_model_version_tag(name, version, REASONS_TAG, "; ".join(reasons)[:5000])
        client.set_model_version_tag(name, version, STATUS_TAG, status)
        status_written = True
        client.set_terminated(run_id)
        if blessed and set_alias:
            claiming = True
            winner = _claim_alias(client, name, alias, int(version))
    except (MlflowException, RegistryError, OSError) as err:
        # the clean-up gets its own (short) deadline: the shared one may be what just ran out
        cleanup = _Deadline(client._client, 60.0, f"marking {name!r} version {version} failed")
        if _mark_failed(cleanup, name, version, run_id, err, alias if claiming else None):
            raise RegistryError(f"registering hardened model {name!r} failed"
                                f"{f' (version {version} tagged failed)' if version else ''}: {err}",
                                state={"version": int(version) if version else None, "status": "failed",
                                       "alias_moved": False, "confirmed": True}) from err
        held = status if status_written else "pending"
        raise RegistryError(
            f"registering hardened model {name!r} failed: {err}. The registry did not answer the clean-up either, "
            f"so its state is unconfirmed: version {version} exists tagged {STATUS_TAG}={held}"
            + (f", and @{alias} may point at it (the alias write was sent)" if claiming else "")
            + ". Check the registry before serving from the alias; the next promote tags stale pending versions "
            "failed.",
            state={"version": int(version), "status": held, "alias_moved": "unknown" if claiming else False,
                   "confirmed": False}) from err
    moved = winner == int(version)
    superseded = winner if winner is not None and not moved else None
    logger.info("registered %s version %s: %s%s", name, version, status,
                f", @{alias} moved" if moved else f", superseded by version {superseded}" if superseded else "")
    return RegisteredVersion(name=name, version=int(version), run_id=run_id, alias_moved=moved, status=status,
                             superseded_by=superseded)


def move_alias(name: str, version: int, alias: str, *, tracking_uri: str) -> int:
    """Promote ``version`` of ``name`` (tagged ``hardening.status=blessed``) to ``alias``.

    Follows the rule of the module docstring: when a higher blessed version exists, it keeps (or receives) the
    alias and ``version`` is tagged ``hardening.superseded_by``.

    Returns:
        The version the alias points at afterwards (``version`` unless it was superseded).

    Raises:
        RegistryError: the version does not exist, is not blessed, the sqlite database is missing, or the
            registry is unreachable.
    """
    check_store_exists(tracking_uri)
    wait_reachable(tracking_uri)
    client = _Deadline(_client(tracking_uri), DEADLINE_S, f"moving @{alias} of {name!r}")
    try:
        with bounded_http():
            mv = client.get_model_version(name, str(version))
            status = mv.tags.get(STATUS_TAG)
            if status != "blessed":
                raise RegistryError(f"refusing to move @{alias} to {name} version {version}: its {STATUS_TAG} is "
                                    f"{status!r}, not 'blessed'")
            winner = _claim_alias(client, name, alias, int(version))
    except MlflowException as err:
        raise RegistryError(f"moving @{alias} of {name!r} to version {version} failed: {err}") from err
    if winner == int(version):
        logger.info("@%s of %s -> version %s", alias, name, version)
    else:
        logger.warning("@%s of %s stays on version %s: version %s is superseded by it", alias, name, winner, version)
    return winner


def _manifest_sha(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def blessing_problem(client: Any, mv: ModelVersion) -> str | None:
    """Why ``mv``'s registered evidence does not show a blessing, or None when it does.

    The chain: the version's manifest tag -> its run's ``manifest.json`` (sha256 of the canonical JSON) -> the
    blessing file it lists (sha256) -> a :class:`~harden.gate.Blessing` that says blessed and follows from its
    own checks. A tag alone (``hardening.status=blessed`` written by hand) does not make a contender.
    Registry errors other than "not found" are raised.
    """
    from harden.gate import Blessing

    if not mv.tags.get(MANIFEST_TAG) or not mv.run_id:
        return "it has no manifest tag or run"
    try:
        with tempfile.TemporaryDirectory(prefix=".verify-") as tmp:
            manifest = json.loads(Path(client.download_artifacts(mv.run_id, MANIFEST_FILE, tmp)).read_text())
            if _manifest_sha(manifest) != mv.tags[MANIFEST_TAG]:
                return "its manifest differs from its manifest tag"
            entry = manifest.get("evidence", {}).get("blessing")
            if not entry:
                return "its evidence has no blessing"
            path = Path(client.download_artifacts(mv.run_id, f"evidence/{entry['file']}", tmp))
            if sha256_file(path) != entry["sha256"]:
                return "its blessing file differs from the manifest"
            blessing = Blessing.model_validate_json(path.read_bytes())
    except MlflowException as err:
        if _is_not_found(err):
            return f"its evidence is missing ({err})"
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its evidence cannot be read ({type(err).__name__}: {err})"
    if not blessing.blessed:
        return "its registered blessing says not blessed"
    problems = blessing.inconsistencies()
    return "its registered blessing does not follow from its checks: " + "; ".join(problems) if problems else None


def _blessed_versions(client: Any, name: str, verified: dict[str, str | None] | None = None) -> list[ModelVersion]:
    """Every version of ``name`` tagged ``hardening.status=blessed`` whose registered evidence shows the blessing
    (:func:`blessing_problem`; results cached in ``verified`` by version). Others are logged and left out."""
    verified = {} if verified is None else verified
    found: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(f"name='{name}'", page_token=token)
        for mv in page:
            if mv.tags.get(STATUS_TAG) != "blessed":
                continue
            key = str(mv.version)
            if key not in verified:
                verified[key] = blessing_problem(client, mv)
                if verified[key]:
                    logger.warning("%s version %s is tagged blessed but does not count: %s", name, key, verified[key])
            if verified[key] is None:
                found.append(mv)
        token = page.token
        if not token:
            return found


def _alias_holder(client: MlflowClient, name: str, alias: str) -> int | None:
    """The version ``alias`` points at, None when it is not set."""
    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if _is_not_found(err):
            return None
        raise


def _claim_alias(client: MlflowClient, name: str, alias: str, version: int) -> int:
    """Converge ``alias`` on the highest blessed version, tag every lower blessed one superseded; return the winner.

    ``version`` must already be tagged blessed. Each round reads the blessed versions and the alias holder
    and, when they disagree, points the alias at the highest blessed version; it stops when a read after the
    last write agrees (see the module docstring for why concurrent promoters end in the same state). A failed
    alias write is retried from a fresh read, up to :data:`ALIAS_WRITE_ATTEMPTS` times.

    Raises:
        RegistryError: ``version`` is no longer blessed, or no agreement after :data:`CLAIM_ROUNDS` rounds.
        MlflowException: a registry call failed.
    """
    write_errors: list[MlflowException] = []
    verified: dict[str, str | None] = {}
    for _ in range(CLAIM_ROUNDS):
        blessed = _blessed_versions(client, name, verified)
        if version not in {int(mv.version) for mv in blessed}:
            why = verified.get(str(version)) or f"it is not tagged {STATUS_TAG}=blessed"
            raise RegistryError(f"{name} version {version} cannot hold @{alias}: {why}; not promoting it")
        best = max(int(mv.version) for mv in blessed)
        if _alias_holder(client, name, alias) == best:
            break
        try:
            client.set_registered_model_alias(name, alias, str(best))
        except MlflowException as err:
            # Two first-time writes of an alias collide in MLflow's store (UNIQUE constraint on the alias row);
            # the next round reads what the other writer left. A write that keeps failing is raised.
            write_errors.append(err)
            if len(write_errors) >= ALIAS_WRITE_ATTEMPTS:
                raise
            logger.warning("writing @%s of %s failed (%s); reading it again", alias, name, err)
            time.sleep(random.uniform(0.05, 0.3))
    else:
        raise RegistryError(f"@{alias} of {name!r} did not settle after {CLAIM_ROUNDS} rounds of concurrent promotion")
    for mv in blessed:
        if int(mv.version) < best and SUPERSEDED_TAG not in mv.tags:
            _tag_superseded(client, name, mv.version, best)
    return best


def _tag_superseded(client: MlflowClient, name: str, version: str, winner: int) -> None:
    """Tag ``version`` superseded by ``winner``; a concurrent promoter writing the same tag first is fine.

    Raises:
        MlflowException: the write failed and the tag is still absent.
    """
    try:
        client.set_model_version_tag(name, version, SUPERSEDED_TAG, str(winner))
    except MlflowException:  # two first writes of one tag collide in MLflow's store (UNIQUE constraint)
        if SUPERSEDED_TAG not in client.get_model_version(name, version).tags:
            raise


def _release_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    """If ``alias`` points at the (now failed) ``version``, move it to the highest blessed version, or drop it."""
    if _alias_holder(client, name, alias) != int(version):
        return
    others = [int(mv.version) for mv in _blessed_versions(client, name) if mv.version != version]
    if others:
        client.set_registered_model_alias(name, alias, str(max(others)))
        logger.warning("@%s of %s moved back from failed version %s to version %s", alias, name, version, max(others))
    else:
        client.delete_registered_model_alias(name, alias)
        logger.warning("@%s of %s removed from failed version %s (no other blessed version)", alias, name, version)


def _mark_failed(client: Any, name: str, version: str | None, run_id: str | None, err: Exception,
                 alias: str | None) -> bool:
    """Best effort: tag the version failed and the run FAILED, and, when ``alias`` may have been written, take
    it off the failed version. Returns whether the version's tag and the alias are confirmed (a second failure
    is logged, not raised)."""
    confirmed = True
    try:
        if version is not None:
            client.set_model_version_tag(name, version, STATUS_TAG, "failed")
            client.set_model_version_tag(name, version, REASONS_TAG, f"registration failed: {err}"[:5000])
        if run_id is not None:
            client.set_terminated(run_id, status="FAILED")
    except (MlflowException, RegistryError, OSError) as second:
        logger.error("could not mark %s version %s as failed: %s", name, version, second)
        confirmed = version is None
    if version is not None and alias is not None:
        try:
            _release_alias(client, name, alias, version)
        except (MlflowException, RegistryError, OSError) as second:
            logger.error("could not check @%s of %s after version %s failed: %s", alias, name, version, second)
            # an alias name the registry refuses cannot point anywhere; anything else leaves it unknown
            confirmed = confirmed and getattr(second, "error_code", None) == "INVALID_PARAMETER_VALUE"
    return confirmed


def _sweep_pending(client: Any, name: str) -> list[str]:
    """Tag ``failed`` every version of ``name`` still ``pending`` (our tag, or MLflow's ``PENDING_REGISTRATION``
    without a verdict) after :data:`PENDING_STALE_S`: an interrupted promote's leftover (a concurrent promote's
    fresh pending version is younger). Returns their numbers."""
    try:
        found = client.search_model_versions(f"name='{name}'")
    except MlflowException as err:
        if _is_not_found(err):
            return []
        raise
    now_ms = time.time() * 1000
    stale = [mv.version for mv in found
             if (mv.tags.get(STATUS_TAG) == "pending" or mv.status == "PENDING_REGISTRATION")
             and mv.tags.get(STATUS_TAG) not in ("blessed", "rejected", "failed")
             and now_ms - (mv.creation_timestamp or 0) > PENDING_STALE_S * 1000]
    for number in stale:
        client.set_model_version_tag(name, number, STATUS_TAG, "failed")
        client.set_model_version_tag(name, number, REASONS_TAG,
                                     f"left pending by an interrupted promote (older than {PENDING_STALE_S:.0f} s)")
        logger.warning("%s version %s was left pending by an interrupted promote; tagged failed", name, number)
    return stale
