"""The stages of the hardening step: one implementation each, shared by the CLI, ``dvc.yaml`` and the Kubeflow
components (which only translate their inputs and outputs into these calls).

    prepare_data -> (make_demo_candidate) -> pull -> purify -> fold -> export -> evaluate -> gate -> report -> promote

Every stage reads files and a ``params.yaml`` section, and writes its outputs into its own directory
atomically (assembled in a temporary directory, then renamed into place), so an interrupted or failed stage
never leaves a half-written output where a complete one stood. File names inside stage directories are the
constants below; :class:`Layout` says where ``nft-harden run`` and ``dvc.yaml`` put each directory.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from harden.errors import ChainError, DataError, ParamsError, RegistryError
from harden.evaluate import (InvertedTrigger, LayerMasks, backdoor_score, compare, evaluate_onnx, evaluate_torch,
                             finite_metrics, flatten, invert_trigger, layer_masks, margin_metrics, mask_statistics,
                             scan_metrics, suspect_margin_pvalue, universal_metrics)
from harden.gate import Blessing, GateConfig, evaluate_gate
from harden.integrity import atomic_dir, atomic_file, sha256_file, write_json_atomic
from harden.onnx_export import check_parity, export_onnx
from harden.package import InputSpec, ModelSpec, load_package, save_package
from harden.params import (BaseParams, CandidateParams, DataParams, ExportParams, Params, PolicyParams, ProbesParams,
                           PurifyParams)
from harden.records import (Attempt, Chain, FoldRecord, InversionSummary, MaskedLayerEntry, MetricsRecord,
                            ModelTriggers, ParityRecord, Provenance, PurifyRecord, Registration,
                            RegistrationSkipped, ReparamEntry, ReportRecord, canonical_sha256, check_chain,
                            tree_sha256)
from nft_core.data import ImageData, load_dataset, stratified_split
from nft_core.data.npz import load_npz
from nft_core.defenses import run_defense
from nft_core.loop import remove_checkpoint
from nft_core.masks import MaskedLayer, mask_state
from nft_core.models import Normalized
from nft_core.reparam import Reparam, describe, fold, reattach

if TYPE_CHECKING:
    from harden.report import ReportFiles, TriggerView

# harden.registry (MLflow) and harden.report (matplotlib) are imported by the stages that use them: every stage
# runs in a process of its own (DVC, Kubeflow), and the two take a second and a half to import.

log = logging.getLogger(__name__)

PACKAGE = "package"
PROVENANCE = Provenance.FILE
CANDIDATE = "candidate.json"
PURIFIED = "purified.safetensors"
PURIFY = PurifyRecord.FILE
FOLD = FoldRecord.FILE
ONNX = "model.onnx"
PARITY = ParityRecord.FILE
METRICS = MetricsRecord.FILE
INVERSION = "inversion.safetensors"
BLESSING = Blessing.FILE
REPORT = ReportRecord.FILE
REGISTERED = Registration.FILE
#: Written by promote when registration failed part-way: what the registry holds, as far as is known.
PROMOTE_FAILED = "failed.json"

#: Max |masked - folded| on logits for the fold check (fp32, eval mode).
FOLD_ATOL = 1e-5


@dataclass(frozen=True)
class Layout:
    """Where each stage's outputs live for ``nft-harden run`` and ``dvc.yaml`` (paths relative to the repo)."""

    runs: Path = Path("runs")
    data: Path = Path("data")
    #: where the report stage also writes the headline metrics (``dvc.yaml``: ``metrics.json``); None: nowhere
    headline: Path | None = None

    @property
    def clean(self) -> Path:
        return self.data / "clean.npz"

    @property
    def test(self) -> Path:
        return self.data / "test.npz"

    def stage(self, name: str) -> Path:
        """Directory of stage ``name`` (candidate, pull, purify, fold, export, evaluate, gate, report, promote)."""
        return self.runs / name


#: Libraries whose versions are recorded with the evidence (purify.json, metrics.json, the registered version).
RECORDED_LIBRARIES = ("torch", "torchvision", "numpy", "safetensors", "onnx", "onnxscript", "onnxruntime-gpu",
                      "mlflow")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def library_versions() -> dict[str, str]:
    """Python and the versions of :data:`RECORDED_LIBRARIES` that this process runs with."""
    return {"python": platform.python_version(), **{lib: _version(lib) for lib in RECORDED_LIBRARIES}}


#: Distributions that provide the same modules as a recorded library: the CPU build of ONNX Runtime, and
#: mlflow-skinny (MLflow's client without the server, what the container image installs).
_STAND_INS = {"onnxruntime-gpu": ("onnxruntime",), "mlflow": ("mlflow-skinny",)}


def _version(distribution: str) -> str:
    """The installed version, or ``"not installed"`` (a distribution of :data:`_STAND_INS` stands in for the
    recorded one, and the record says which one ran)."""
    for name in (distribution, *_STAND_INS.get(distribution, ())):
        try:
            return importlib.metadata.version(name) + ("" if name == distribution else f" ({name})")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


# ---------------------------------------------------------------------------------------------- data ------

def _load(spec: str, *, train: bool, download: bool = False) -> ImageData:
    try:
        return load_dataset(spec, train=train, download=download)
    except (OSError, ValueError) as err:
        raise DataError(f"dataset {spec!r}: {err}") from err


def read_npz(path: str | Path) -> ImageData:
    """A dataset file written by :func:`prepare_data`; problems raise :class:`DataError`."""
    try:
        return load_npz(path)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: {err}") from err


def check_compatible(spec: ModelSpec, data: ImageData, what: str) -> None:
    """Refuse data the model cannot take: other image shape, other classes, labels out of range."""
    expected = (spec.input.channels, spec.input.height, spec.input.width)
    if tuple(data.x.shape[1:]) != expected:
        raise DataError(f"{what}: images are {tuple(data.x.shape[1:])} (C, H, W) but the model takes {expected}")
    if data.num_classes != spec.num_classes:
        raise DataError(f"{what}: data has {data.num_classes} classes but the model has {spec.num_classes}")
    if len(data) and (data.y.min() < 0 or data.y.max() >= spec.num_classes):
        raise DataError(f"{what}: labels span [{data.y.min()}, {data.y.max()}], outside [0, {spec.num_classes})")


def check_clean_set(clean: ImageData) -> None:
    """A clean set needs at least one sample of every class; exactly one means the one-shot regime (warned)."""
    if len(clean) == 0:
        raise DataError("the clean set is empty: purification needs at least one clean sample per class")
    counts = torch.bincount(clean.y, minlength=clean.num_classes)
    missing = [c for c in range(clean.num_classes) if counts[c] == 0]
    if missing:
        raise DataError(f"the clean set has no sample of class(es) {missing} ({len(clean)} samples in all); "
                        "it needs at least one sample per class")
    if counts.min() == 1:
        log.warning("the clean set has only one sample of some class (%d samples for %d classes): one-shot "
                    "regime; expect a larger accuracy drop than with >= 1%% of the training data", len(clean),
                    clean.num_classes)


def prepare_data(data: DataParams, seed: int, clean_out: Path, test_out: Path) -> dict[str, Any]:
    """Draw the clean set (stratified, from ``data.train``) and load the test set; write both as npz."""
    train = _load(data.train, train=True, download=data.download)
    try:
        clean, _ = stratified_split(train, fraction=data.clean_fraction, per_class=data.clean_per_class, seed=seed)
    except ValueError as err:
        raise DataError(f"cannot draw the clean set from {data.train!r}: {err}") from err
    check_clean_set(clean)
    test = _load(data.test, train=False, download=data.download)
    if test.num_classes != clean.num_classes:
        raise DataError(f"test set has {test.num_classes} classes, clean set {clean.num_classes}")
    for data_set, path in ((clean, Path(clean_out)), (test, Path(test_out))):
        path.parent.mkdir(parents=True, exist_ok=True)
        data_set.save_npz(path)
    return {"clean": {"n": len(clean), "sha256": sha256_file(clean_out)},
            "test": {"n": len(test), "sha256": sha256_file(test_out)}}


# ------------------------------------------------------------------------------------------ candidate ------

def make_demo_candidate(params: Params, out_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Train a backdoored candidate on the offline data and register it as ``candidate.model`` (demo only).

    With ``candidate.demo.enabled: false`` (hardening your own model) it registers nothing and only writes
    ``candidate.json`` saying so, so the DVC chain ``candidate -> pull`` leaves your registry alone.
    """
    from harden.registry import parse_model_ref, register_candidate
    from nft_core.attacks import make_attack
    from nft_core.train import make_backdoored_candidate

    name, alias, version = parse_model_ref(params.candidate.model)
    if version is not None:
        raise ValueError(f"candidate.model={params.candidate.model!r}: the demo candidate is registered under an "
                         "alias (models:/NAME@ALIAS), not a fixed version")
    demo = params.candidate.demo
    if not demo.enabled:
        summary: dict[str, Any] = {"name": name, "alias": alias,
                                   "skipped": "candidate.demo.enabled is false: nothing registered"}
        with atomic_dir(out_dir) as tmp:
            write_json_atomic(tmp / CANDIDATE, summary)
        return summary
    train = _load(params.data.train, train=True, download=params.data.download)
    c, h, w = (int(n) for n in train.x.shape[1:])
    attack = make_attack(demo.attack, target=demo.target, mode=demo.mode, num_classes=train.num_classes,
                         image_shape=(c, h, w), seed=params.base.seed)
    model, info = make_backdoored_candidate(train, attack, builder=demo.builder, poison_rate=demo.poison_rate,
                                            epochs=demo.epochs, seed=params.base.seed, progress=progress)
    spec = ModelSpec(builder=demo.builder, num_classes=train.num_classes,
                     input=InputSpec(channels=c, height=h, width=w, mean=model.mean.flatten().tolist(),
                                     std=model.std.flatten().tolist()),
                     class_names=list(train.class_names) if train.class_names else None)
    with atomic_dir(out_dir) as tmp:
        save_package(model.net, spec, tmp / PACKAGE)
        number = register_candidate(tmp / PACKAGE, name, tracking_uri=params.base.tracking_uri, alias=alias,
                                    tags={"demo.attack": demo.attack, "demo.target": str(demo.target),
                                          "demo.poison_rate": str(demo.poison_rate)})
        summary = {"name": name, "version": number, "alias": alias, "attack": demo.attack,
                   "train_images": len(train), "train_time_s": info.get("wall_time_s")}
        write_json_atomic(tmp / CANDIDATE, summary)
    return summary


def pull_stage(candidate: CandidateParams, tracking_uri: str, out_dir: Path) -> Provenance:
    """Pull ``candidate.model`` from the registry into ``out_dir/package`` with ``out_dir/provenance.json``."""
    from harden.registry import pull

    with atomic_dir(out_dir) as tmp:
        return pull(candidate.model, tmp, tracking_uri=tracking_uri, allow_pickle=candidate.allow_pickle)


# ------------------------------------------------------------------------------------- purify / fold ------

def check_device(device: str) -> None:
    """Refuse (ParamsError, exit 2) a CUDA device this machine does not have, before any work."""
    if not device.startswith("cuda"):
        return
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        raise ParamsError(f"base.device={device!r}: this machine has {count} CUDA device(s); use 'auto' or 'cpu'")


def _load_model(pkg_dir: Path) -> tuple[Normalized, ModelSpec]:
    net, spec = load_package(pkg_dir)
    return spec.wrap(net).eval(), spec


#: Metric families of the trigger-free evidence (reconstruction statistics, scan, maximum margins, universal
#: perturbations).
TRIGGER_FREE_PREFIXES = ("inverted/", "scan/", "margin/", "universal/")

#: Gate checks the policy can judge on held-out clean data (the rest need the test set or ONNX).
JUDGED_PREFIXES = ("acc", "min_class_acc", "asr/", "asr_lift/", "clean_rate/", "robust_acc/", *TRIGGER_FREE_PREFIXES)


def _judge(gate: GateConfig, before: dict[str, Any], after: dict[str, Any], margin: float) -> Blessing:
    """The gate's checks that held-out clean data can answer, each made stricter by ``margin``, on the
    candidate's and the attempt's metrics."""
    checks = [c.tightened(margin) for c in gate.metrics if c.metric.startswith(JUDGED_PREFIXES)]
    return evaluate_gate(gate.model_copy(update={"metrics": checks, "required_facts": [], "on_missing": "fail"}),
                         before, after, {})


def _checks(gate: GateConfig, prefixes: tuple[str, ...]) -> bool:
    """Whether a gate check, or a check's condition, names a metric under ``prefixes``."""
    return any(m.startswith(prefixes) for c in gate.metrics for m in (c.metric, c.when.metric if c.when else ""))


def trigger_free_metrics(model: torch.nn.Module, data: ImageData, probes: ProbesParams, seed: int, *,
                         inverted: InvertedTrigger | None, candidate: Mapping[str, Any] | None = None,
                         progress: bool = False) -> dict[str, Any]:
    """The trigger-free evidence of one model on ``data``, as far as ``probes`` enables it.

    ``inverted``'s statistics (the reconstruction is made beforehand: the candidate's also probes both
    models), the scan, the maximum margins with ``margin/suspect_pvalue`` of the candidate's suspect
    (``candidate``: the candidate's metrics, which hold ``margin/target``; None: this model is the candidate),
    every class's smallest universal perturbation, and ``scan/backdoor_score`` when the reconstruction and the
    scan both ran. The evaluate stage asks this of
    both models on the test set; the hardening policy of each attempt on the held-out clean images."""
    metrics: dict[str, Any] = inverted.metrics() if inverted is not None else {}
    if probes.scan.enabled:
        scan = probes.scan
        metrics.update(scan_metrics(model, data, samples=scan.samples, eps=scan.eps, steps=scan.steps, seed=seed,
                                    progress=progress))
    if probes.margin.enabled:
        metrics.update(margin_metrics(model, data, seed=seed, progress=progress,
                                      **probes.margin.model_dump(exclude={"enabled"})))
        asked = metrics if candidate is None else candidate
        metrics["margin/suspect"] = int(asked["margin/target"])
        metrics["margin/suspect_pvalue"] = suspect_margin_pvalue(asked, metrics)
    if probes.universal.enabled:
        metrics.update(universal_metrics(model, data, seed=seed, progress=progress,
                                         **probes.universal.model_dump(exclude={"enabled"})))
    if inverted is not None and probes.scan.enabled:
        metrics["scan/backdoor_score"] = backdoor_score(metrics)
    return metrics


def _holdout_metrics(model: torch.nn.Module, holdout: ImageData, probes: ProbesParams, gate: GateConfig, seed: int,
                     *, candidate: tuple[dict[str, Any], InvertedTrigger | None] | None = None,
                     ) -> tuple[dict[str, Any], InvertedTrigger | None]:
    """What the policy judges a model on: its metrics on the held-out images (clean accuracy, every probe, the
    candidate's reconstructed trigger) and, when a gate check asks for it, its trigger-free evidence there.

    ``candidate``: the candidate's ``(metrics, reconstructed trigger)`` from this function; None: ``model`` is
    the candidate. Returns this model's metrics and its own reconstruction, made for every model when a check
    names anything under ``inverted/`` or the score (an attempt's is needed only for the score and the stamp
    statistics, not for ``inverted/asr``, which stamps the candidate's), else None.

    A trigger is reconstructed from half the held-out images and then stamped on all of them (the candidate's,
    as ``inverted/asr``; no image is left out): it was fitted to the candidate, and the attempts never saw
    these images."""
    inverted = None
    if probes.inversion.enabled and _checks(gate, ("inverted/", "scan/backdoor_score")):
        settings = probes.inversion.model_dump(exclude={"enabled", "samples"})
        fitted = invert_trigger(model, holdout, samples=len(holdout), seed=seed, **settings)
        inverted = InvertedTrigger(fitted.inversion, torch.empty(0, dtype=torch.long))
    trigger = inverted if candidate is None else candidate[1]
    metrics = evaluate_torch(model, holdout, probes.attacks, trigger=trigger)
    if _checks(gate, TRIGGER_FREE_PREFIXES):
        metrics.update(trigger_free_metrics(model, holdout, probes, seed, inverted=inverted,
                                            candidate=None if candidate is None else candidate[0]))
    return finite_metrics(metrics, "held-out"), inverted


@dataclass(frozen=True)
class _Judge:
    """How the hardening policy judges an attempt: the gate's checks that held-out images can answer (each
    stricter by ``margin``), against the candidate's metrics on the same images."""

    holdout: ImageData
    probes: ProbesParams
    gate: GateConfig
    seed: int
    margin: float
    candidate: dict[str, Any]
    trigger: InvertedTrigger | None  # the candidate's reconstructed trigger, stamped on every held-out image

    @classmethod
    def of(cls, model: torch.nn.Module, holdout: ImageData, probes: ProbesParams, gate: GateConfig, seed: int,
           margin: float) -> _Judge:
        metrics, trigger = _holdout_metrics(model, holdout, probes, gate, seed)
        return cls(holdout, probes, gate, seed, margin, metrics, trigger)

    def __call__(self, model: torch.nn.Module) -> tuple[dict[str, Any], tuple[int, int, float]]:
        """The attempt's verdict fields (``passed``, ``failed``, ``holdout``) and its rank when none passes:
        fewest checks failed at the gate's own thresholds, then with the margin, then the highest accuracy."""
        after, _ = _holdout_metrics(model, self.holdout, self.probes, self.gate, self.seed,
                                    candidate=(self.candidate, self.trigger))
        verdict = _judge(self.gate, self.candidate, after, self.margin)
        failed = [c.reason for c in verdict.failed]
        rank = (len(_judge(self.gate, self.candidate, after, 0.0).failed), len(failed), -after["acc"])
        return {"passed": verdict.blessed, "failed": failed, "holdout": _judged(after)}, rank


def _judged(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics of held-out evidence that a gate check can name (what the record keeps of it)."""
    return {k: v for k, v in flatten(metrics).items() if k.startswith(JUDGED_PREFIXES)}


def purify_stage(purify_params: PurifyParams, base: BaseParams, candidate_dir: Path, clean_npz: Path, out_dir: Path,
                 *, policy: PolicyParams | None = None, probes: ProbesParams | None = None,
                 gate: GateConfig | None = None, progress: bool = True) -> PurifyRecord:
    """Purify the candidate on the clean set with the ``purify`` section, then ``policy.fallbacks`` while needed.

    With fallbacks, ``policy.holdout`` of the clean set (stratified) is kept out of purification. Each attempt
    purifies on the rest and is judged on the held-out images by the gate's checks those can answer, each
    stricter by ``policy.margin``: clean accuracy, every probe stamped on them, and, when the gate checks any,
    the candidate's reconstructed trigger and the trigger-free evidence (``scan/backdoor_score`` and its parts,
    :func:`trigger_free_metrics`, with the candidate's suspect class asked of each attempt; only the gate's
    facts need the later stages). The first that passes wins, else
    the one failing fewest checks at the gate's own thresholds (then with the margin; then the highest held-out
    accuracy). An attempt whose training diverges (non-finite loss) fails and the next one runs; when every
    attempt that ran diverged, :class:`~harden.errors.ParamsError` (exit 2). No attempt
    starts after ``policy.budget_s`` seconds. Every attempt, winner or not, is in the record. The test set is
    never touched here.

    Every method writes the same artifact: the purified model's state (``purified.safetensors``) as it trained,
    its reparametrizations still attached (NFT's neuron masks; none for methods that change the weights), which
    the record lists, so the fold stage rebuilds and folds it without asking which method ran. Each attempt
    checkpoints after every epoch beside ``out_dir``, so a killed run resumes where it stopped (an attempt that
    had finished returns at once); a checkpoint is bound to the candidate, the clean set and the config (one of
    anything else is discarded, never resumed), and all are removed when the stage completes.
    """
    check_device(base.device)
    policy = policy or PolicyParams()
    chain = check_chain(pull=Path(candidate_dir), clean=Path(clean_npz))
    model, spec = _load_model(Path(candidate_dir) / PACKAGE)
    clean = read_npz(clean_npz)
    check_compatible(spec, clean, f"clean set {clean_npz}")
    check_clean_set(clean)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    checkpoints = [out_dir.with_name(f".{out_dir.name}.{index}.ckpt") for index in range(1 + len(policy.fallbacks))]
    plan = [(a.method, a.config(base.seed, base.device, progress)) for a in [purify_params, *policy.fallbacks]]
    params_digest = {"purify": purify_params.model_dump(mode="json"), "seed": base.seed}
    if len(plan) > 1:
        if gate is None or probes is None:
            raise ParamsError("a policy with fallbacks judges attempts by the gate's checks and the probes: pass both")
        params_digest |= {"policy": policy.model_dump(mode="json"), "probes": probes.model_dump(mode="json"),
                          "gate": gate.model_dump(mode="json")}
        train, holdout = stratified_split(clean, fraction=1 - policy.holdout, seed=base.seed)
        if len(holdout) == 0 or len(train) == 0:
            raise DataError(f"policy.holdout={policy.holdout} of {len(clean)} clean images leaves an empty part")
        judge: _Judge | None = _Judge.of(model, holdout, probes, gate, base.seed, policy.margin)
    else:
        train, holdout, judge = clean, None, None
    attempts: list[dict[str, Any]] = []
    best: tuple[tuple[int, int, float], int, Any, Any] | None = None  # (rank, index, result, config)
    elapsed = 0.0
    for index, (defense, config) in enumerate(plan):
        if elapsed >= policy.budget_s:
            attempts.append({"defense": defense, "config": config.to_dict(), "skipped": "time budget spent"})
            continue
        if judge is not None:
            log.info("policy attempt %d/%d: %s", index + 1, len(plan), defense)
        try:
            result = run_defense(defense, model, train.dataset(), config, checkpoint=checkpoints[index],
                                 stale_checkpoint="restart")
        except FloatingPointError as err:  # the training diverged: this attempt has no model, the next may
            log.warning("policy attempt %d/%d (%s) diverged: %s", index + 1, len(plan), defense, err)
            attempts.append({"defense": defense, "config": config.to_dict(), "passed": False,
                             "failed": [f"its training diverged ({err})"]})
            continue
        elapsed += result.wall_time_s
        row: dict[str, Any] = {"defense": defense, "config": config.to_dict(), "wall_time_s": result.wall_time_s}
        if judge is None:
            best = ((0, 0, 0.0), index, result, config)
            attempts.append(row)
            break
        verdict, rank = judge(result.model)
        attempts.append(row | verdict)
        if best is None or rank < best[0]:
            best = (rank, index, result, config)
        if verdict["passed"]:
            break
    if best is None:  # the first attempt always runs (the budget is positive), so every one that ran diverged
        raise ParamsError("purification diverged: " + "; ".join(f"{a['defense']}: {a['failed'][0]}"
                                                                 for a in attempts if a.get("failed")))
    _, chosen, result, config = best
    defense = plan[chosen][0]
    inputs = {"candidate": chain.digest("candidate"), "clean": chain.digest("clean"),
              "params": canonical_sha256(params_digest)}
    common = {"inputs": inputs, "defense": defense, "clean_samples": len(train), "seed": base.seed,
              "versions": library_versions(),
              "attempts": [Attempt(**row, chosen=i == chosen) for i, row in enumerate(attempts)],
              "holdout_samples": len(holdout) if holdout is not None else None,
              "holdout_candidate": None if judge is None else _judged(judge.candidate),
              "holdout_margin": policy.margin if holdout is not None else None}
    trained = result.unfolded if result.unfolded is not None else result.model
    extra = result.extra
    masked = [MaskedLayerEntry(**layer, lower_bound=extra["lower_bounds"][layer["index"] - 1])
              for layer in extra.get("layers", [])]
    with atomic_dir(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp / PURIFIED))
        record = PurifyRecord(**common, config=config.to_dict(), wall_time_s=result.wall_time_s,
                              history=result.history, outputs={PURIFIED: sha256_file(tmp / PURIFIED)},
                              reparametrizations=[ReparamEntry(**r.to_dict()) for r in describe(trained)],
                              masked_layers=masked, device=extra.get("device"), eta=extra.get("eta"),
                              samples_per_class=extra.get("samples_per_class"),
                              trainable_params=extra.get("trainable_params"), total_params=extra.get("total_params"))
        record.write(tmp)
    for checkpoint in checkpoints:
        remove_checkpoint(checkpoint)
    return record


def _purified_model(candidate: Normalized, purify_dir: Path, purified: PurifyRecord) -> Normalized:
    """The purified model as it trained: a copy of the (plain) candidate with the recorded reparametrizations
    re-attached (their kinds from :data:`nft_core.reparam.KINDS` only) and the saved state loaded strictly."""
    model = copy.deepcopy(candidate)
    try:
        reattach(model, [Reparam.from_dict(r.model_dump()) for r in purified.reparametrizations])
        model.load_state_dict(load_file(str(Path(purify_dir) / PURIFIED)), strict=True)
    except (ValueError, RuntimeError) as err:
        raise ChainError(f"{purify_dir} does not rebuild on this candidate: {err}") from err
    return model.eval()


def fold_stage(candidate_dir: Path, purify_dir: Path, clean_npz: Path, out_dir: Path) -> FoldRecord:
    """Fold the purified model's reparametrizations into its weights and check the result.

    The purified model is rebuilt from the candidate, its recorded reparametrizations and its saved state, and
    folded; the fold check compares it before and after on clean images (max |logit difference| <=
    :data:`FOLD_ATOL`; exactly 0 when nothing was reparametrized) and the folded state dict against the
    candidate's keys, shapes and dtypes. A failed check is recorded in ``fold.json`` (the gate refuses the model),
    not raised. The purification must have been made from this candidate and clean set
    (:class:`~harden.errors.ChainError` otherwise).
    """
    chain = check_chain(pull=Path(candidate_dir), purify=Path(purify_dir), clean=Path(clean_npz))
    purified: PurifyRecord = chain.record("purify")
    candidate, spec = _load_model(Path(candidate_dir) / PACKAGE)
    reference = {k: (tuple(v.shape), v.dtype) for k, v in candidate.net.state_dict().items()}
    model = _purified_model(candidate, Path(purify_dir), purified)
    x = read_npz(clean_npz).images()[:256]
    with torch.no_grad():
        before = model(x)
        after = fold(model).eval()(x)
    diff = (before - after).abs().max().item()
    net = model.net
    state = net.state_dict()
    keys_match = {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == reference
    finite = all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    passed = bool(keys_match and finite and diff <= FOLD_ATOL)
    with atomic_dir(out_dir) as tmp:
        save_package(net, spec, tmp / PACKAGE)
        record = FoldRecord(inputs={"candidate": chain.digest("candidate"), "purify": chain.digest("purify"),
                                    "clean": chain.digest("clean")},
                            passed=passed, masks_folded=bool(purified.reparametrizations), max_abs_diff=diff,
                            atol=FOLD_ATOL, keys_match=keys_match, finite=bool(finite),
                            hardened_sha256=tree_sha256(tmp / PACKAGE))
        record.write(tmp)
    if not passed:
        log.error("fold check failed: %s", record.model_dump(exclude={"inputs"}))
    return record


# ------------------------------------------------------------------------------------ export / eval ------

def export_stage(export: ExportParams, seed: int, hardened_dir: Path, clean_npz: Path, out_dir: Path) -> ParityRecord:
    """Export the hardened package to ONNX (normalisation inside the graph) and check it against PyTorch."""
    chain = check_chain(fold=Path(hardened_dir), clean=Path(clean_npz))
    model, spec = _load_model(Path(hardened_dir) / PACKAGE)
    clean = read_npz(clean_npz).images()[: export.parity_samples]
    noise = torch.rand(clean.shape, generator=torch.Generator().manual_seed(seed))
    shape = (spec.input.channels, spec.input.height, spec.input.width)
    with atomic_dir(out_dir) as tmp:
        export_onnx(model, shape, tmp / ONNX, opset=export.opset)
        parity = check_parity(tmp / ONNX, model, {"clean": clean, "random": noise}, atol=export.atol)
        record = ParityRecord(**parity.to_dict(), onnx_sha256=sha256_file(tmp / ONNX),
                              inputs={"hardened": chain.digest("hardened"), "fold": chain.digest("fold"),
                                      "clean": chain.digest("clean"),
                                      "params": canonical_sha256({"export": export.model_dump(mode="json"),
                                                                  "seed": seed})})
        record.write(tmp)
    if not parity.passed:
        log.error("ONNX parity check failed: max |diff| %.3g, argmax agreement %.4f", parity.max_abs_diff,
                  parity.argmax_agreement)
    return record


def _layer_masks(candidate: Normalized, purify_dir: Path, purified: PurifyRecord) -> list[LayerMasks]:
    """Neuron masks by layer, for the statistics and plots (call when ``purified.masked_layers`` is not empty)."""
    model = _purified_model(candidate, purify_dir, purified)
    layers = [MaskedLayer(l.index, l.name, l.kind, l.size) for l in purified.masked_layers]
    return layer_masks(mask_state(model), layers, [l.lower_bound for l in purified.masked_layers])


def evaluate_stage(probes: ProbesParams, seed: int, candidate_dir: Path, purify_dir: Path, fold_dir: Path,
                   export_dir: Path, test_npz: Path, out_dir: Path, *, progress: bool = False) -> MetricsRecord:
    """Evaluate the candidate (PyTorch) and the hardened model as it ships (the ONNX file, ONNX Runtime).

    The trigger-free evidence (trigger reconstruction, scan, maximum margins) needs gradients and runs on the
    hardened model's folded PyTorch twin, which the ONNX parity check ties to the shipped file. The
    reconstructed triggers are saved beside ``metrics.json`` (``inversion.safetensors``, its sha256 in the
    record) for the report."""
    chain = check_chain(pull=Path(candidate_dir), purify=Path(purify_dir), fold=Path(fold_dir),
                        export=Path(export_dir), test=Path(test_npz))
    candidate, spec = _load_model(Path(candidate_dir) / PACKAGE)
    test = read_npz(test_npz)
    check_compatible(spec, test, f"test set {test_npz}")
    hardened = _load_model(Path(fold_dir) / PACKAGE)[0]  # the folded PyTorch twin of the ONNX file
    triggers: dict[str, InvertedTrigger] = {}
    if probes.inversion.enabled:
        settings = probes.inversion.model_dump(exclude={"enabled"})  # samples + reconstruct_triggers' settings
        triggers = {side: invert_trigger(model, test, seed=seed, progress=progress, **settings)
                    for side, model in (("candidate", candidate), ("hardened", hardened))}
    trigger = triggers.get("candidate")  # the candidate's suspected trigger probes both models
    before = evaluate_torch(candidate, test, probes.attacks, trigger=trigger)
    after = evaluate_onnx(Path(export_dir) / ONNX, test, probes.attacks, trigger=trigger)
    before.update(trigger_free_metrics(candidate, test, probes, seed, inverted=trigger, progress=progress))
    after.update(trigger_free_metrics(hardened, test, probes, seed, inverted=triggers.get("hardened"),
                                      candidate=before, progress=progress))
    before, after = finite_metrics(before, "candidate"), finite_metrics(after, "hardened")
    inversion = _save_triggers(triggers, Path(out_dir))  # empty without the inversion: no stale file survives
    purified: PurifyRecord = chain.record("purify")
    layers = _layer_masks(candidate, Path(purify_dir), purified) if purified.masked_layers else None
    inputs = {name: chain.digest(name) for name in ("candidate", "purify", "fold", "parity", "onnx", "test")}
    inputs["params"] = canonical_sha256({"probes": probes.model_dump(mode="json"), "seed": seed})
    record = MetricsRecord(inputs=inputs, candidate=before, hardened=after, compare=compare(before, after),
                           purify={"defense": purified.defense, "wall_time_s": purified.wall_time_s,
                                   "clean_samples": purified.clean_samples},
                           versions=library_versions(), masks=mask_statistics(layers) if layers else None,
                           inversion=inversion)
    record.write(out_dir)
    return record


def _save_triggers(triggers: dict[str, InvertedTrigger], out_dir: Path) -> InversionSummary | None:
    """Write every class's reconstructed mask and pattern per model; return what the record keeps of them."""
    tensors = {f"{side}.{kind}": getattr(t.inversion, kind).contiguous()
               for side, t in triggers.items() for kind in ("masks", "patterns")}
    with atomic_file(out_dir / INVERSION) as tmp:
        save_file(tensors, str(tmp))
    if not triggers:
        return None
    return InversionSummary(file=INVERSION, sha256=sha256_file(out_dir / INVERSION),
                            **{side: ModelTriggers(target=t.target, norms=t.inversion.norms,
                                                   anomaly=t.inversion.anomaly, success=t.inversion.success)
                               for side, t in triggers.items()})


def read_triggers(evaluate_dir: Path, record: MetricsRecord) -> dict[str, TriggerView] | None:
    """The reconstructed triggers of an evaluation, checked against the sha256 its record holds.

    Raises:
        ChainError: the file is missing or is not the one the evaluation wrote.
    """
    from harden.report import TriggerView

    if record.inversion is None:
        return None
    path = Path(evaluate_dir) / record.inversion.file
    if not path.is_file() or sha256_file(path) != record.inversion.sha256:
        raise ChainError(f"{path}: missing or not the file the evaluation wrote (sha256 differs from metrics.json)")
    tensors = load_file(str(path))
    views = {}
    for side, info in (("candidate", record.inversion.candidate), ("hardened", record.inversion.hardened)):
        views[side] = TriggerView(mask=tensors[f"{side}.masks"][info.target].numpy(),
                                  pattern=tensors[f"{side}.patterns"][info.target].numpy(), target=info.target,
                                  anomaly_index=info.anomaly[info.target], norms=info.norms)
    return views


def gate_facts(chain: Chain) -> dict[str, bool]:
    """The facts the gate can require, from the chain's fold and parity records."""
    return {"fold_check": chain.record("fold").passed, "onnx_parity": chain.record("parity").passed}


def gate_stage(gate: GateConfig, evaluate_dir: Path, fold_dir: Path, export_dir: Path, out_dir: Path) -> Blessing:
    """Apply the gate's checks to the evaluation and the fold/parity checks; write ``blessing.json``."""
    chain = check_chain(evaluate=Path(evaluate_dir), fold=Path(fold_dir), export=Path(export_dir))
    metrics: MetricsRecord = chain.record("metrics")
    blessing = evaluate_gate(gate, metrics.candidate, metrics.hardened, gate_facts(chain))
    blessing = blessing.model_copy(update={"inputs": {
        "metrics": chain.digest("metrics"), "fold": chain.digest("fold"), "parity": chain.digest("parity"),
        "params": gate_digest(gate)}})
    blessing.write(out_dir)
    return blessing


def gate_digest(gate: GateConfig) -> str:
    """sha256 of the gate settings a blessing was made with."""
    return canonical_sha256({"gate": gate.model_dump(mode="json")})


# --------------------------------------------------------------------------------- report / register ------

def code_version() -> str:
    """This package's version, plus the git commit when running from a checkout (``0.1.0+g1a2b3c4[-dirty]``)."""
    version = _version("nft-harden")  # "not installed" when run from a checkout that was never installed
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}"


def params_sha256(params: Params) -> str:
    """sha256 of the validated parameters (canonical JSON), so equal settings hash equally."""
    canonical = json.dumps(params.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _identity(params: Params, prov: Provenance, purified: PurifyRecord) -> dict[str, Any]:
    return {"candidate": {"name": prov.model_name, "version": prov.version, "run_id": prov.run_id,
                          "aliases at pull": ", ".join(prov.aliases), "registry": prov.tracking_uri},
            "defense": purified.defense, "clean samples": purified.clean_samples,
            "params sha256": params_sha256(params), "code version": code_version(),
            "target": {"name": params.promote.name, "alias": params.promote.alias}}


def report_stage(params: Params, pull_dir: Path, purify_dir: Path, fold_dir: Path, export_dir: Path,
                 evaluate_dir: Path, gate_dir: Path, out_dir: Path, headline: Path | None = None) -> ReportFiles:
    """Render ``report.html`` (self-contained), ``report.md``, the plots and their DVC plot data; with
    ``headline``, also write the headline metrics there (:func:`harden.report.headline_metrics`: the verdict,
    the purification's wall time, every policy attempt's together, and the main numbers of both models, flat,
    for ``dvc exp show``).

    The report renders only a verdict that follows from the evidence (:func:`verify_blessing`)."""
    from harden.report import ReportFiles, headline_metrics, write_headline, write_report

    chain = check_chain(pull=Path(pull_dir), purify=Path(purify_dir), fold=Path(fold_dir), export=Path(export_dir),
                        evaluate=Path(evaluate_dir), gate=Path(gate_dir))
    metrics: MetricsRecord = chain.record("metrics")
    blessing = verify_blessing(params.gate, chain)
    purified: PurifyRecord = chain.record("purify")
    purification = {"defense": purified.defense, "wall_time_s": purified.wall_time_s,
                    "clean_samples": purified.clean_samples, "device": purified.device}
    if metrics.masks:
        purification["masks"] = metrics.masks
    masks = (_layer_masks(_load_model(Path(pull_dir) / PACKAGE)[0], Path(purify_dir), purified)
             if purified.masked_layers else None)
    with atomic_dir(out_dir) as tmp:
        files = write_report(tmp, identity=_identity(params, chain.record("provenance"), purified),
                             before=metrics.candidate, after=metrics.hardened, blessing=blessing,
                             masks=masks, history=purified.history,
                             purification=purification, attempts=purified.attempts,
                             holdout=purified.holdout_samples, holdout_candidate=purified.holdout_candidate,
                             margin=purified.holdout_margin, inversion=read_triggers(Path(evaluate_dir), metrics))
        outputs = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        ReportRecord(inputs={name: chain.digest(name) for name in ("provenance", "purify", "metrics", "blessing")},
                     outputs=outputs).write(tmp)

    def moved(path: Path) -> Path:  # where a file written into tmp lives now
        return Path(out_dir) / Path(path).relative_to(tmp)

    headline_path = None
    if headline is not None:
        spent = [a.wall_time_s for a in purified.attempts if a.wall_time_s is not None]  # every policy attempt
        headline_path = write_headline(headline, headline_metrics(metrics.candidate, metrics.hardened,
                                                                  blessed=blessing.blessed,
                                                                  purify_s=sum(spent) if spent else purified.wall_time_s))
    return ReportFiles(html=moved(files.html), markdown=moved(files.markdown), metrics=moved(files.metrics),
                       plots={k: moved(v) for k, v in files.plots.items()},
                       plot_data={k: moved(v) for k, v in files.plot_data.items()}, headline=headline_path)


def verify_blessing(gate: GateConfig, chain: Chain) -> Blessing:
    """The chain's blessing, if it follows from the recorded checks under ``gate``; else ChainError.

    The verdict is re-derived from the evaluation and the fold/parity records with the current gate settings
    and compared with the blessing as written: a blessing edited by hand, made with other gate settings, or
    written for other evidence is refused.
    """
    blessing: Blessing = chain.record("blessing")
    if blessing.inputs.get("params") != gate_digest(gate):
        raise ChainError(f"{chain.path('blessing')} was made with other gate settings than params.yaml's gate "
                         "section; re-run the gate stage")
    metrics: MetricsRecord = chain.record("metrics")
    derived = evaluate_gate(gate, metrics.candidate, metrics.hardened, gate_facts(chain))
    if (derived.blessed, derived.checks, derived.summary) != (blessing.blessed, blessing.checks, blessing.summary):
        raise ChainError(f"{chain.path('blessing')} does not follow from the recorded checks: the gate re-derived "
                         f"{'blessed' if derived.blessed else 'not blessed'} ({derived.summary!r}) but the file says "
                         f"{'blessed' if blessing.blessed else 'not blessed'}; it was changed after the gate wrote it. "
                         "Re-run the gate stage")
    return blessing


#: Metrics in a hardened version's description, at most this many rows: ACC, then ASR per probe.
DESCRIPTION_ROWS = 5


def _description_rows(compare: dict[str, dict[str, float | None]]) -> list[str]:
    """``- ACC: 0.9100 -> 0.9000`` and ``- ASR badnets: ...`` lines for the version's description."""
    keys = ["acc", *sorted(k for k in compare if k.startswith("asr/"))]
    rows = [f"- {'ACC' if k == 'acc' else 'ASR ' + k.split('/', 1)[1]}: {compare[k]['before']:.4f} -> "
            f"{compare[k]['after']:.4f}" for k in keys
            if k in compare and compare[k]["before"] is not None and compare[k]["after"] is not None]
    return rows[:DESCRIPTION_ROWS] + ([f"- ... {len(rows) - DESCRIPTION_ROWS} more probes in the report"]
                                   if len(rows) > DESCRIPTION_ROWS else [])


#: Set by ``dvc exp run`` for the stages it runs (the experiment's name; DVC_EXP_BASELINE_REV beside it).
DVC_EXP_NAME = "DVC_EXP_NAME"


def dvc_experiment(env: Mapping[str, str] | None = None) -> str | None:
    """The name of the DVC experiment this process runs in (``dvc exp run``, ``--temp`` and queued ones too),
    else None (``dvc repro``, the CLI, Kubeflow)."""
    return (os.environ if env is None else env).get(DVC_EXP_NAME) or None


def promote_stage(params: Params, *, experiment: str | None, pull_dir: Path, fold_dir: Path, export_dir: Path,
                  clean_npz: Path, test_npz: Path, purify_dir: Path, evaluate_dir: Path, gate_dir: Path,
                  report_dir: Path, out_dir: Path) -> Registration | RegistrationSkipped:
    """The promote stage of the CLI and ``dvc.yaml``: :func:`register_stage`, except inside a DVC experiment
    (``experiment``, see :func:`dvc_experiment`) while ``promote.register_experiments`` is false. There the chain
    and the blessing are verified as when registering, but nothing is registered and no alias moves;
    ``registered.json`` says so (:class:`~harden.records.RegistrationSkipped`)."""
    from harden.registry import strip_credentials

    if experiment is None or params.promote.register_experiments:
        return register_stage(params, pull_dir=pull_dir, fold_dir=fold_dir, export_dir=export_dir, clean_npz=clean_npz,
                              test_npz=test_npz, purify_dir=purify_dir, evaluate_dir=evaluate_dir, gate_dir=gate_dir,
                              report_dir=report_dir, out_dir=out_dir)
    chain = check_chain(pull=Path(pull_dir), clean=Path(clean_npz), test=Path(test_npz), purify=Path(purify_dir),
                        fold=Path(fold_dir), export=Path(export_dir), evaluate=Path(evaluate_dir),
                        gate=Path(gate_dir), report=Path(report_dir))
    blessing = verify_blessing(params.gate, chain)
    record = RegistrationSkipped(
        reason=f"inside DVC experiment {experiment!r} with promote.register_experiments false (set it true, or "
               "run `dvc repro`, to register)",
        experiment=experiment, name=params.promote.name, alias=params.promote.alias, blessed=blessing.blessed,
        summary=blessing.summary, tracking_uri=strip_credentials(params.base.tracking_uri),
        inputs={"blessing": chain.digest("blessing"), "report": chain.digest("report")})
    record.write(out_dir)
    return record


def register_stage(params: Params, *, pull_dir: Path, fold_dir: Path, export_dir: Path, clean_npz: Path,
                   test_npz: Path, purify_dir: Path, evaluate_dir: Path, gate_dir: Path, report_dir: Path,
                   out_dir: Path, move_alias: bool = True) -> Registration:
    """Register the hardened version (ONNX flavour + package + evidence + lineage tags).

    Every stage output must belong to one chain (same candidate, data, purification, fold, ONNX file,
    evaluation, blessing and report) and the blessing must follow from its checks under params.yaml's gate
    (:func:`verify_blessing`); otherwise :class:`~harden.errors.ChainError` and nothing is registered. The
    lineage tags are read from the verified chain. The serving alias moves only when the gate blessed the
    model, and only when ``move_alias`` (the Kubeflow pipeline moves it in a separate step inside its
    ``dsl.If``). A rejected version is registered and tagged rejected with the gate's reasons.
    """
    from harden.registry import PLOT_ROLE_PREFIX, register_hardened, strip_credentials

    chain = check_chain(pull=Path(pull_dir), clean=Path(clean_npz), test=Path(test_npz), purify=Path(purify_dir),
                        fold=Path(fold_dir), export=Path(export_dir), evaluate=Path(evaluate_dir),
                        gate=Path(gate_dir), report=Path(report_dir))
    blessing = verify_blessing(params.gate, chain)
    prov: Provenance = chain.record("provenance")
    parity: ParityRecord = chain.record("parity")
    metrics: MetricsRecord = chain.record("metrics")
    purified: PurifyRecord = chain.record("purify")
    tags = {"hardening.source.name": prov.model_name, "hardening.source.version": str(prov.version),
            "hardening.source.run_id": prov.run_id or "", "hardening.source.uri": prov.source_uri,
            "hardening.source.package_sha256": prov.package_sha256,
            "hardening.data.clean_sha256": chain.digest("clean"), "hardening.data.test_sha256": chain.digest("test"),
            "hardening.params_sha256": params_sha256(params), "hardening.code_version": code_version(),
            "hardening.defense": purified.defense, "hardening.seed": str(purified.seed),
            "hardening.attempts": ", ".join(a.word for a in purified.attempts) or purified.defense,
            "hardening.blessing_sha256": chain.digest("blessing"),
            "hardening.torch_version": torch.__version__, "hardening.onnx_provider": parity.provider,
            "hardening.versions": json.dumps(library_versions(), sort_keys=True)}
    numbers = {f"{side}/{k}": v for side in ("candidate", "hardened")
               for k, v in flatten(getattr(metrics, side)).items()}
    numbers["purify_wall_time_s"] = purified.wall_time_s
    report = Path(report_dir)
    evidence = {"metrics": chain.path("metrics"), "blessing": chain.path("blessing"), "parity": chain.path("parity"),
                "fold": chain.path("fold"), "purify": chain.path("purify"), "provenance": chain.path("provenance"),
                "report_record": chain.path("report"), "report_html": report / "report.html",
                "report_md": report / "report.md",
                **{f"{PLOT_ROLE_PREFIX}{p.stem}": p for p in sorted((report / "plots").glob("*.png"))}}
    description = "\n".join([blessing.summary, "",
                             f"Hardened from {prov.model_name} version {prov.version} with {purified.defense} on "
                             f"{purified.clean_samples} clean images; candidate -> hardened:",
                             *_description_rows(metrics.compare)])
    run_params = {"purify": params.purify.model_dump(mode="json"), "defense": purified.defense,
                  "clean_samples": purified.clean_samples, "seed": purified.seed,
                  "policy.fallbacks": [f.method for f in params.policy.fallbacks]}
    example = read_npz(test_npz).x[:1].float().div(255).numpy()  # one served input: float32 NCHW in [0, 1]
    failed_record = Path(out_dir) / PROMOTE_FAILED
    try:
        registered = register_hardened(params.promote.name, tracking_uri=params.base.tracking_uri,
                                       package_dir=chain.path("hardened"), onnx_path=chain.path("onnx"),
                                       evidence=evidence, metrics=numbers, tags=tags, description=description,
                                       blessed=blessing.blessed, alias=params.promote.alias,
                                       onnx_sha256=parity.onnx_sha256, reasons=[c.reason for c in blessing.failed],
                                       set_alias=move_alias, input_example=example, run_params=run_params,
                                       run_name=(f"harden-{prov.model_name}-v{prov.version}-"
                                                 f"{'blessed' if blessing.blessed else 'rejected'}"),
                                       source=(prov.model_name, prov.version))
    except RegistryError as err:
        if err.state is not None:  # what the registry holds, as far as is known, for CI and the operator
            write_json_atomic(failed_record, {**err.state, "name": params.promote.name, "alias": params.promote.alias,
                                              "tracking_uri": strip_credentials(params.base.tracking_uri),
                                              "error": str(err)})
        raise
    failed_record.unlink(missing_ok=True)
    record = Registration(**registered.model_dump(), alias=params.promote.alias, blessed=blessing.blessed,
                          summary=blessing.summary, tracking_uri=strip_credentials(params.base.tracking_uri),
                          inputs={"blessing": chain.digest("blessing"), "onnx": chain.digest("onnx"),
                                  "hardened": chain.digest("hardened"), "report": chain.digest("report")})
    record.write(out_dir)
    return record
