"""Pull a candidate: resolve a model reference, download its package, verify it and record its provenance."""

from __future__ import annotations

import logging
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from harden.errors import RegistryError
from harden.integrity import atomic_dir, sha256_file, sha256_tree
from harden.package import SPEC_FILE, WEIGHTS_FILE, ModelSpec, find_pickles, load_package, save_package
from harden.records import Provenance, tree_sha256
from harden.registry.client import (Client, Deadline, bounded_http, check_store_exists, is_not_found,
                                    parse_model_ref, strip_credentials, wait_reachable)

logger = logging.getLogger(__name__)


def _resolve(client: Client, name: str, alias: str | None, version: int | None) -> ModelVersion:
    """The :class:`ModelVersion` for ``name@alias`` or ``name/version``; RegistryError naming what is missing."""
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if is_not_found(err):
            raise RegistryError(f"registered model {name!r} does not exist") from err
        raise RegistryError(f"cannot read registered model {name!r}: {err}") from err
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        what = f"alias {alias!r}" if alias is not None else f"version {version}"
        if is_not_found(err):
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


def _download_version(client: Client, tracking_uri: str, mv: ModelVersion, into: Path) -> tuple[Path, str]:
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
    client = Deadline.on(tracking_uri, f"pulling {ref!r}")
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
