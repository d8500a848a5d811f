"""What one stage hands to the next: typed records, chained by content digests.

Every JSON file a stage writes for another stage is one of the pydantic records below, read back with
validation (never by string key into a dict). Each record carries ``inputs``: the sha256 of everything it was
made from (the candidate package, the clean or test set, the upstream records, the ``params.yaml`` section it
read). :func:`check_chain` recomputes those digests from the files a stage is about to read and refuses a mixed
or stale set with :class:`~harden.errors.ChainError` (exit 7): a purification of another candidate, an ONNX
file exported from another fold, a blessing edited by hand after the gate wrote it.

Digests: a file's is the sha256 of its bytes; a package directory's (:func:`tree_sha256`) is the sha256 of the
sorted ``{relative path: file sha256}`` map, so it changes when any file in it does; a params section's
(:func:`canonical_sha256`) is the sha256 of its canonical JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from harden.errors import ChainError
from harden.integrity import sha256_file, sha256_tree, write_json_atomic

R = TypeVar("R", bound="Record")

PACKAGE = "package"


def canonical_sha256(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys, no whitespace): equal settings hash equally."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def tree_sha256(root: str | Path) -> str:
    """One digest for a directory: the sha256 of its sorted ``{relative path: sha256}`` map."""
    return canonical_sha256(sha256_tree(root))


class Record(BaseModel):
    """A stage output another stage reads. ``FILE`` is its name inside the stage directory."""

    model_config = ConfigDict(extra="forbid")
    FILE: ClassVar[str]

    #: sha256 of each input this record was made from (see the module docstring).
    inputs: dict[str, str]

    @classmethod
    def read(cls: type[R], directory: str | Path) -> R:
        """Read and validate ``directory/FILE``; a missing, unreadable or malformed file raises ChainError."""
        path = Path(directory) / cls.FILE
        try:
            return cls.model_validate_json(path.read_bytes())
        except FileNotFoundError as err:
            raise ChainError(f"{path} is missing: run the stage that writes it first") from err
        except (OSError, ValidationError) as err:
            detail = str(err).splitlines()[0] if isinstance(err, OSError) else _first_error(err)
            raise ChainError(f"{path} is not a valid {cls.__name__} record ({detail}); re-run its stage") from err

    def write(self, directory: str | Path) -> Path:
        """Write ``directory/FILE`` atomically."""
        return write_json_atomic(Path(directory) / self.FILE, self.model_dump(mode="json"))


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "record"
    return f"{where}: {first['msg']}"


class Provenance(Record):
    """Where a pulled package came from (``provenance.json`` beside ``package/``). ``inputs`` is empty: the
    registry is the origin; ``package_sha256`` binds this record to the package it describes."""

    FILE: ClassVar[str] = "provenance.json"
    model_name: str
    version: int
    run_id: str | None
    source_uri: str
    aliases: list[str]
    tracking_uri: str
    files_sha256: dict[str, str]
    package_sha256: str
    pulled_at: str


class ReparamEntry(BaseModel):
    """One reparametrized tensor of the purified model (``nft_core.reparam.Reparam``; its ``kind`` is checked
    against that module's allow-list when the model is rebuilt)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    module: str
    tensor: str
    kind: str
    size: int
    layer_index: int


class MaskedLayerEntry(BaseModel):
    """One layer carrying neuron masks: forward-order ``index``, module ``name``, module ``kind``, mask ``size`` and
    the masks' lower bound mu(l)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    index: int
    name: str
    kind: str
    size: int
    lower_bound: float


class PurifyRecord(Record):
    """What purification did (``purify.json``), whatever the method: the purified model is the candidate's
    architecture with ``reparametrizations`` attached (none for methods that change weights directly), its
    state in ``outputs`` (sha256 of each file written beside the record). ``masked_layers`` lists the layers
    that carry neuron masks (NFT), for the mask statistics and plots."""

    FILE: ClassVar[str] = "purify.json"
    defense: str
    clean_samples: int
    seed: int
    config: dict[str, Any]
    wall_time_s: float
    history: list[dict[str, float]]
    outputs: dict[str, str]
    versions: dict[str, str]
    reparametrizations: list[ReparamEntry] = []
    masked_layers: list[MaskedLayerEntry] = []
    device: str | None = None
    eta: float | None = None
    samples_per_class: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    #: every attempt of the hardening policy, in order; the one written here is ``chosen``
    attempts: list[Attempt] = []
    holdout_samples: int | None = None
    #: the candidate's judged metrics on the same held-out images: the baseline of change checks and what a
    #: check's condition (``when``) reads (None: nothing judged)
    holdout_candidate: dict[str, float] | None = None
    #: ``policy.margin``: each held-out check was passed only with this much to spare (None: nothing judged)
    holdout_margin: float | None = None


class Attempt(BaseModel):
    """One attempt of the hardening policy, as ``purify.json`` lists it."""

    model_config = ConfigDict(extra="forbid")
    defense: str
    config: dict[str, Any]
    #: purification seconds; None when it was skipped
    wall_time_s: float | None = None
    #: why it did not run ("time budget spent"); None when it ran
    skipped: str | None = None
    #: the held-out verdict; None for a single attempt, which nothing judges
    passed: bool | None = None
    #: reasons of the judged checks that failed on the held-out images
    failed: list[str] = []
    #: the held-out metrics the checks were judged on
    holdout: dict[str, float] = {}
    chosen: bool = False

    @property
    def verdict(self) -> str:
        """``passed``, ``failed``, ``skipped`` (time budget) or ``ran`` (a single attempt, not judged)."""
        if self.skipped:
            return "skipped"
        return "ran" if self.passed is None else ("passed" if self.passed else "failed")

    @property
    def word(self) -> str:
        """The attempt in a few words: ``nft failed``, ``ft_sam passed (chosen)``."""
        return f"{self.defense} {self.verdict}" + (" (chosen)" if self.chosen else "")


class FoldRecord(Record):
    """The fold check (``fold.json``); ``hardened_sha256`` is the tree digest of the folded ``package/``."""

    FILE: ClassVar[str] = "fold.json"
    passed: bool
    #: whether the purified model carried reparametrizations to fold (NFT's masks); without, it is passed through
    masks_folded: bool
    #: max |logit difference| before and after folding (exactly 0 when there was nothing to fold)
    max_abs_diff: float
    atol: float
    keys_match: bool
    finite: bool
    hardened_sha256: str


class ParityRecord(Record):
    """ONNX Runtime against PyTorch (``parity.json``) for the ONNX file whose sha256 is ``onnx_sha256``."""

    FILE: ClassVar[str] = "parity.json"
    max_abs_diff: float
    argmax_agreement: float
    batches: dict[str, dict[str, float]]
    provider: str
    passed: bool
    atol: float
    onnx_sha256: str


class ModelTriggers(BaseModel):
    """One model's reconstructed triggers, as ``metrics.json`` summarises them (the masks and patterns are in the
    inversion file): the suspected ``target``, and per class the stamp's L1 ``norms``, MAD ``anomaly`` index and
    ``success`` rate."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    target: int
    norms: list[float]
    anomaly: list[float]
    success: list[float]


class InversionSummary(BaseModel):
    """The evaluation's trigger reconstruction: its ``file`` beside ``metrics.json`` and that file's ``sha256``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str
    sha256: str
    candidate: ModelTriggers
    hardened: ModelTriggers


class MetricsRecord(Record):
    """The evaluation (``metrics.json``): flat-or-nested metric trees of the candidate and the hardened model."""

    FILE: ClassVar[str] = "metrics.json"
    candidate: dict[str, Any]
    hardened: dict[str, Any]
    compare: dict[str, Any]
    purify: dict[str, Any]
    versions: dict[str, str]
    masks: Any = None
    inversion: InversionSummary | None = None


class ReportRecord(Record):
    """The report's own record (``report.json``): which evidence it renders, and the sha256 of its files."""

    FILE: ClassVar[str] = "report.json"
    outputs: dict[str, str]


class RegisteredVersion(BaseModel):
    """Outcome of ``harden.registry.register_hardened``; ``status`` is ``"blessed"`` or ``"rejected"``.

    ``superseded_by`` is the version holding the alias instead of this blessed one (a higher blessed version
    registered concurrently), else None.
    """

    model_config = ConfigDict(extra="forbid")
    name: str
    version: int
    run_id: str
    alias_moved: bool
    status: str
    superseded_by: int | None = None


class Registration(Record, RegisteredVersion):
    """What ``promote`` registered (``registered.json``): the registry's outcome plus the verdict it carried."""

    FILE: ClassVar[str] = "registered.json"
    registered: Literal[True] = True
    alias: str
    blessed: bool
    summary: str
    tracking_uri: str


class RegistrationSkipped(Record):
    """What ``promote`` wrote instead of registering (``registered.json``, ``registered: false``): inside a DVC
    experiment with ``promote.register_experiments`` false nothing is registered and no alias moves; ``reason``
    says why, ``experiment`` names the experiment. The verdict is the verified blessing's, as when registering."""

    FILE: ClassVar[str] = "registered.json"
    registered: Literal[False] = False
    reason: str
    experiment: str
    name: str
    alias: str
    blessed: bool
    summary: str
    tracking_uri: str


# ------------------------------------------------------------------------------------------- the chain ------

@dataclass(frozen=True)
class Artifacts:
    """The stage outputs a stage is about to read (None: not read). Directories, except the two npz files."""

    pull: Path | None = None
    clean: Path | None = None
    test: Path | None = None
    purify: Path | None = None
    fold: Path | None = None
    export: Path | None = None
    evaluate: Path | None = None
    gate: Path | None = None
    report: Path | None = None


#: (record, its input key, the artifact it names): record.inputs[key] must equal the artifact's digest now.
LINKS: tuple[tuple[str, str, str], ...] = (
    ("purify", "candidate", "candidate"), ("purify", "clean", "clean"),
    ("fold", "candidate", "candidate"), ("fold", "purify", "purify"), ("fold", "clean", "clean"),
    ("parity", "hardened", "hardened"), ("parity", "fold", "fold"), ("parity", "clean", "clean"),
    ("metrics", "candidate", "candidate"), ("metrics", "purify", "purify"), ("metrics", "fold", "fold"),
    ("metrics", "parity", "parity"), ("metrics", "onnx", "onnx"), ("metrics", "test", "test"),
    ("blessing", "metrics", "metrics"), ("blessing", "fold", "fold"), ("blessing", "parity", "parity"),
    ("report", "provenance", "provenance"), ("report", "purify", "purify"), ("report", "metrics", "metrics"),
    ("report", "blessing", "blessing"),
)

#: What a gate check compares: a bound, a change against the candidate, a fact, the probes' presence, a pattern
CheckKind = Literal["min", "max", "max_drop", "max_increase", "fact", "probes", "pattern", "condition"]
#: Float slack of every comparison, so that a value equal to its threshold passes despite rounding.
TOLERANCE = 1e-9


class CheckResult(BaseModel):
    """One evaluated check, as it appears in ``blessing.json``."""

    name: str
    kind: CheckKind
    metric: str
    value: float | bool | None
    threshold: float | bool | None
    baseline: float | None = None
    passed: bool
    reason: str


class Blessing(Record):
    """The gate's verdict (``blessing.json``): blessed only when every check passed.

    ``inputs`` binds it to the evaluation, fold and parity records and the gate settings it was made from;
    ``promote`` re-derives the verdict from them and refuses a blessing that does not follow.
    """

    FILE: ClassVar[str] = "blessing.json"
    blessed: bool
    summary: str
    checks: list[CheckResult]
    created_at: str

    @property
    def failed(self) -> list[CheckResult]:
        """The checks that did not pass."""
        return [c for c in self.checks if not c.passed]

    def inconsistencies(self) -> list[str]:
        """What in this blessing does not follow from its own checks (empty when it is consistent).

        Each value or change check is re-judged from its recorded value, threshold and baseline; ``blessed``
        must equal "every check passed" and there must be at least one check. This catches a blessing whose
        verdict or pass flags were edited; it cannot catch edited values (for that, re-derive the verdict from
        the evaluation, as ``promote`` does).
        """
        problems = [] if self.checks else ["it has no checks"]
        for check in self.checks:
            expected = _rejudge(check)
            if expected is not None and expected != check.passed:
                problems.append(f"check {check.name!r} says passed={check.passed}, its value says {expected}")
        if self.blessed != (bool(self.checks) and all(c.passed for c in self.checks)):
            problems.append(f"blessed={self.blessed} but {len(self.failed)} of {len(self.checks)} checks failed")
        return problems


def _rejudge(check: CheckResult) -> bool | None:
    """Whether ``check`` passes, judged again from its recorded numbers (None: nothing to re-judge)."""
    value, threshold, baseline = check.value, check.threshold, check.baseline
    if check.kind == "fact":
        return value is True
    if check.kind in ("probes", "pattern") or isinstance(value, bool) or isinstance(threshold, bool):
        return None
    if check.kind == "condition":  # left out by its condition: passes only with the candidate's value off the bound
        return (value is not None and threshold is not None and math.isfinite(value)
                and abs(value - threshold) > TOLERANCE)
    if value is None or threshold is None or not math.isfinite(value):
        return False
    if check.kind == "min":
        return value >= threshold - TOLERANCE
    if check.kind == "max":
        return value <= threshold + TOLERANCE
    if baseline is None or not math.isfinite(baseline):
        return False
    change = baseline - value if check.kind == "max_drop" else value - baseline
    return change <= threshold + TOLERANCE


#: Which stage writes each record or artifact (for the error message: what to re-run).
PRODUCER = {"candidate": "pull", "provenance": "pull", "clean": "prepare", "test": "prepare", "purify": "purify",
            "fold": "fold", "hardened": "fold", "parity": "export", "onnx": "export", "metrics": "evaluate",
            "blessing": "gate", "report": "report"}


class Chain:
    """Lazily computed digests and typed records of the artifacts in :class:`Artifacts`."""

    def __init__(self, artifacts: Artifacts):
        a = artifacts
        self._records: dict[str, tuple[Path | None, type[Record]]] = {
            "provenance": (a.pull, Provenance), "purify": (a.purify, PurifyRecord), "fold": (a.fold, FoldRecord),
            "parity": (a.export, ParityRecord), "metrics": (a.evaluate, MetricsRecord), "blessing": (a.gate, Blessing),
            "report": (a.report, ReportRecord)}
        self._paths: dict[str, Path | None] = {
            "candidate": a.pull / PACKAGE if a.pull else None, "clean": a.clean, "test": a.test,
            "hardened": a.fold / PACKAGE if a.fold else None, "onnx": a.export / "model.onnx" if a.export else None,
            **{name: (d / kind.FILE if d else None) for name, (d, kind) in self._records.items()}}
        self._cache: dict[str, Any] = {}

    def record(self, name: str) -> Any:
        """The typed record ``name`` (provenance, purify, fold, parity, metrics, blessing, report)."""
        if name not in self._cache:
            directory, kind = self._records[name]
            if directory is None:
                raise KeyError(f"{name} is not among this chain's artifacts")
            self._cache[name] = kind.read(directory)
        return self._cache[name]

    def has(self, name: str) -> bool:
        return self._paths.get(name) is not None

    def path(self, name: str) -> Path:
        path = self._paths[name]
        assert path is not None
        return path

    def digest(self, name: str) -> str:
        """sha256 of artifact ``name`` as it is on disk now (tree digest for the package directories)."""
        key = f"sha256:{name}"
        if key not in self._cache:
            path = self.path(name)
            try:
                self._cache[key] = tree_sha256(path) if path.is_dir() else sha256_file(path)
            except OSError as err:
                raise ChainError(f"{path} cannot be read ({err}); run the {PRODUCER[name]} stage first") from err
        return self._cache[key]

    def check(self) -> Chain:
        """Refuse (ChainError) unless every link among the present artifacts holds; returns self."""
        problems: list[str] = []

        def expect(what: str, recorded: str | None, artifact: str) -> None:
            actual = self.digest(artifact)
            if recorded != actual:
                problems.append(f"{what} was made from {artifact} sha256 {_short(recorded)}, but "
                                f"{self.path(artifact)} is {_short(actual)}")

        if self.has("provenance") and self.has("candidate"):
            expect(f"{self.path('provenance')}", self.record("provenance").package_sha256, "candidate")
        if self.has("fold"):
            expect(f"{self.path('fold')} (hardened_sha256)", self.record("fold").hardened_sha256, "hardened")
        if self.has("parity"):
            expect(f"{self.path('parity')} (onnx_sha256)", self.record("parity").onnx_sha256, "onnx")
        for record, key, artifact in LINKS:
            if self.has(record) and self.has(artifact):
                expect(str(self.path(record)), self.record(record).inputs.get(key), artifact)
        for record in ("purify", "report"):  # the records that hash the files written beside them
            if self.has(record):
                directory = self.path(record).parent
                for name, recorded in self.record(record).outputs.items():
                    problems += _output_problem(directory, name, recorded)
        if problems:
            raise ChainError("the stage outputs do not form one chain (mixed or stale outputs, or a file changed "
                             "after its stage wrote it): " + "; ".join(problems)
                             + ". Re-run the stages in order (nft-harden run, or dvc repro).")
        return self


def _output_problem(directory: Path, name: str, recorded: str) -> list[str]:
    path = directory / name
    try:
        actual = tree_sha256(path) if path.is_dir() else sha256_file(path)
    except OSError:
        return [f"{path} is missing"]
    return [] if actual == recorded else [f"{path} is sha256 {_short(actual)}, not the {_short(recorded)} its "
                                          f"stage recorded"]


def _short(digest: str | None) -> str:
    return "(none recorded)" if digest is None else digest[:12]


def check_chain(**artifacts: Path | None) -> Chain:
    """Check the links among the named artifacts (see :class:`Artifacts`); returns the checked chain."""
    return Chain(Artifacts(**artifacts)).check()
