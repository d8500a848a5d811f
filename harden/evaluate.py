"""Evaluation of the candidate (PyTorch) and of the hardened model as it ships (ONNX through ONNX Runtime).

Both paths feed the same metric functions (:mod:`nft_core.metrics`) and return one plain dict:

- ``acc``, ``min_class_acc``, ``per_class_acc`` ({class name: accuracy}), ``n/test``;
- per probe: ``asr/<probe>``, ``robust_acc/<probe>``, ``n/<probe>`` (triggered samples whose true label
  differs from the target, the ones ASR counts), ``clean_rate/<probe>`` (how often the model sends the same
  classes' *unstamped* images to the probe's targets) and ``asr_lift/<probe>`` (ASR minus that rate: what the
  trigger adds to the model's ordinary confusion, the default gate's ASR check);
- ``eval_time_s``. The trigger-free scan (:func:`scan_metrics`, PyTorch only: it needs gradients) adds
  ``scan/top_share``, ``scan/top_label`` and ``scan/flip_rate``.
- Trigger reconstruction (:func:`invert_trigger`, Neural Cleanse; PyTorch only) adds ``inverted/anomaly_index``,
  ``inverted/norm_ratio``, ``inverted/mask_l1`` and ``inverted/target`` (the suspected target) of the model
  inverted; the candidate's reconstructed trigger, stamped on test images it was not reconstructed from, is a
  probe for both models: ``inverted/asr``, ``inverted/clean_rate``, ``inverted/asr_lift``. With both the scan and
  the inversion, ``scan/backdoor_score`` (:func:`backdoor_score`) sums them up: 1 or more flags the model.
- The maximum-margin statistic (:func:`margin_metrics`, MM-BD) adds ``margin/*``, and every class's smallest
  universal perturbation (:func:`universal_metrics`) adds ``universal/*``; both feed the score when they ran.

A :class:`Probe` is a named attack applied to the clean test set, or a user-supplied npz of triggered inputs.
Mask statistics of a purification (per layer mean/min/share at the lower bound) live here as well.
"""

from __future__ import annotations

import logging
import math
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from harden.errors import DataError, PackageError, ProbeError
from harden.probes import Probe
from harden.onnx_export import onnx_predict_logits, onnx_session
from nft_core.attacks import make_attack
from nft_core.data import ImageData
from nft_core.masks import MaskedLayer, mask_state
from nft_core.metrics import (accuracy, attack_success_rate, clean_target_rate, per_class_accuracy, predict_logits,
                              robust_accuracy)
from nft_core.purify import PurifyResult
from nft_core.invert import Inversion, reconstruct_triggers, stamp
from nft_core.maxmargin import NonFiniteMargins, margin_pvalue, max_margin_statistics
from nft_core.perturb import NonFiniteOutputs, smallest_perturbations
from nft_core.scan import adversarial_label_concentration

log = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
Probes = Sequence["Probe"]

#: Numeric metrics that are labels, not quantities (no delta).
CATEGORICAL = frozenset({"scan/top_label", "inverted/target", "margin/target", "margin/suspect", "universal/target"})

#: Tolerance for "a mask sits at its lower bound" (same as the purify loop's history).
AT_BOUND_TOL = 1e-6


def _npz_labels(path: Path, arrays: Mapping[str, np.ndarray], key: str, n: int, num_classes: int) -> torch.Tensor:
    if key not in arrays:
        raise ProbeError(f"probe file {path}: key {key!r} is missing (has {sorted(arrays)})")
    a = arrays[key]
    if a.dtype.kind not in "iu" or a.shape != (n,):
        raise ProbeError(f"probe file {path}: {key!r} must be integers of shape ({n},), got {a.dtype} {a.shape}")
    if n and (a.min() < 0 or a.max() >= num_classes):
        raise ProbeError(f"probe file {path}: {key!r} spans [{a.min()}, {a.max()}], outside [0, {num_classes})")
    return torch.from_numpy(a.astype(np.int64))


def load_probe_npz(path: str | Path, num_classes: int,
                   image_shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read and check a probe file; returns ``(x float NCHW in [0, 1], y_true, y_target)``.

    Raises:
        ProbeError: missing key, wrong shape or dtype, pixel values out of range, labels outside the classes.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            arrays = dict(arrays)
    except (OSError, ValueError, zipfile.BadZipFile) as err:  # missing, not an npz, or object (pickled) arrays
        raise ProbeError(f"probe file {path}: cannot read it as an npz archive without pickles: {err}") from err
    if not isinstance(arrays, dict):
        raise ProbeError(f"probe file {path}: expected an npz archive (keys x, y_true, y_target), got a bare array")
    if "x" not in arrays:
        raise ProbeError(f"probe file {path}: key 'x' is missing (has {sorted(arrays)})")
    x, (c, h, w) = arrays["x"], image_shape
    if x.dtype == np.uint8 and x.shape[1:] == (h, w, c):
        images = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    elif x.dtype.kind == "f" and x.shape[1:] == (c, h, w):
        images = torch.from_numpy(x.astype(np.float32))
        if images.numel() and not (images.isfinite().all() and images.min() >= 0 and images.max() <= 1):
            raise ProbeError(f"probe file {path}: float 'x' must lie in [0, 1]")
    else:
        raise ProbeError(f"probe file {path}: 'x' is {x.dtype} {x.shape}; expected uint8 (N, {h}, {w}, {c}) "
                         f"or float (N, {c}, {h}, {w})")
    if len(images) == 0:
        raise ProbeError(f"probe file {path}: 'x' holds no samples")
    n = len(images)
    return images, _npz_labels(path, arrays, "y_true", n, num_classes), _npz_labels(path, arrays, "y_target", n, num_classes)


def probe_inputs(probe: Probe, test: ImageData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triggered inputs of ``probe`` for ``test``: ``(x float NCHW in [0, 1], y_true, y_target)``.

    Raises:
        ProbeError: the target is not a label of ``test``, or the probe file is invalid.
    """
    if probe.target >= test.num_classes:
        raise ProbeError(f"probe {probe.name!r}: target={probe.target} is outside the labels [0, {test.num_classes})")
    channels, height, width = test.x.shape[1:]
    image_shape = (int(channels), int(height), int(width))
    if probe.npz is not None:
        return load_probe_npz(probe.npz, test.num_classes, image_shape)
    assert probe.attack is not None  # the Probe schema requires exactly one of attack and npz
    attack = make_attack(probe.attack, target=probe.target, mode=probe.mode, num_classes=test.num_classes,
                         image_shape=image_shape, seed=probe.seed, **probe.options)
    x, y_true, y_target = attack.probe(test)
    return x, torch.as_tensor(y_true).long(), torch.as_tensor(y_target).long()


def _evaluate(logits: LogitsFn, test: ImageData, probes: Probes, trigger: InvertedTrigger | None = None) -> dict[str, Any]:
    names = [p.name for p in probes]
    if len(set(names)) != len(names):
        raise ProbeError(f"probe names must be unique, got {names}")
    t0 = time.perf_counter()
    y = test.y
    pred = logits(test.images()).argmax(1)
    per_class = per_class_accuracy(pred, y, test.num_classes)
    class_names = list(test.class_names) if test.class_names else [str(c) for c in range(test.num_classes)]
    metrics: dict[str, Any] = {
        "acc": accuracy(pred, y),
        "min_class_acc": min(a for a in per_class if a is not None),
        "per_class_acc": dict(zip(class_names, per_class)),
        "n/test": len(y),
    }
    for probe in probes:
        x, y_true, y_target = probe_inputs(probe, test)
        p = logits(x).argmax(1)
        lifted = _lifted_asr(p, y_true, y_target, pred, test)
        metrics[f"asr/{probe.name}"] = lifted.pop("asr")
        metrics[f"robust_acc/{probe.name}"] = robust_accuracy(p, y_true, y_target)
        metrics[f"n/{probe.name}"] = int((y_true != y_target).sum())
        metrics.update({f"{k}/{probe.name}": v for k, v in lifted.items()})
    x, y_true, y_target = trigger.probe(test) if trigger is not None else (torch.empty(0),) * 3
    if len(x):  # absent (a gate check on it cannot pass) when no test image is left to stamp
        metrics.update({f"inverted/{k}": v for k, v in _lifted_asr(logits(x).argmax(1), y_true, y_target, pred, test).items()})
    metrics["eval_time_s"] = time.perf_counter() - t0
    return metrics


def _lifted_asr(pred: torch.Tensor, y_true: torch.Tensor, y_target: torch.Tensor, clean_pred: torch.Tensor,
                test: ImageData) -> dict[str, float]:
    """``asr`` of triggered predictions, and ``clean_rate``/``asr_lift`` against the clean predictions
    (absent, so a gate check on them cannot pass, when no probe class is in the test set)."""
    out = {"asr": attack_success_rate(pred, y_true, y_target)}
    clean_rate = clean_target_rate(clean_pred, test.y, y_true, y_target, test.num_classes)
    if clean_rate is not None:
        out |= {"clean_rate": clean_rate, "asr_lift": out["asr"] - clean_rate}
    return out


def evaluate_torch(model: nn.Module, test: ImageData, probes: Probes = (), *, batch_size: int = 512,
                   device: str | torch.device | None = None, trigger: InvertedTrigger | None = None) -> dict[str, Any]:
    """Metrics of a PyTorch model (taking images in [0, 1]) on ``test``, on every probe and on ``trigger``."""
    return _evaluate(lambda x: predict_logits(model, x, batch_size, device), test, probes, trigger)


def evaluate_onnx(onnx_path: str | Path, test: ImageData, probes: Probes = (), *, batch_size: int = 512,
                  trigger: InvertedTrigger | None = None) -> dict[str, Any]:
    """Metrics of an exported ONNX model, run by ONNX Runtime, on ``test``, on every probe and on ``trigger``."""
    session = onnx_session(onnx_path)
    return _evaluate(lambda x: onnx_predict_logits(session, x, batch_size), test, probes, trigger)


def scan_metrics(model: nn.Module, test: ImageData, *, samples: int = 500, eps: float = 8 / 255, steps: int = 10,
                 seed: int = 0, batch_size: int = 256, progress: bool = False) -> dict[str, Any]:
    """Trigger-free scan (:mod:`nft_core.scan`) on ``samples`` random clean images of ``test``.

    Returns ``scan/top_share``, ``scan/top_label``, ``scan/flip_rate``, ``scan/label_shares`` (every class's
    share of the successful flips, all 0 when nothing flipped; the report plots them) and
    ``scan/runner_up_ratio`` (:func:`runner_up_ratio`; absent when fewer than two classes drew a flip, so a
    gate check on it cannot pass). PyTorch only (the attack needs gradients): the hardened model is scanned
    through its folded PyTorch twin, which the ONNX parity check ties to the shipped file.
    """
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:samples]
    result = adversarial_label_concentration(model, test.images()[idx], test.y[idx], eps=eps, steps=steps,
                                             batch_size=batch_size, seed=seed, num_classes=test.num_classes,
                                             progress=progress)
    shares = [count / max(result.n_flipped, 1) for count in result.label_histogram]
    ratio = runner_up_ratio(shares)
    return {"scan/top_share": result.top_share, "scan/top_label": result.top_label, "scan/flip_rate": result.flip_rate,
            "scan/label_shares": shares, **({} if ratio is None else {"scan/runner_up_ratio": ratio})}


def runner_up_ratio(shares: Sequence[float]) -> float | None:
    """How many times more of the scan's adversarial flips the top class draws than the next one (None when
    fewer than two classes drew any).

    Unlike the top share, it does not shrink with the number of classes: a benign model's flips spread over
    several natural sinks of similar weight (1.03-1.48 on GTSRB's 43 classes, up to 2.26 on the 10 synthetic
    shapes), while a backdoor target that draws them stands alone (WaNet and Blend on GTSRB: 6.6-10.8). Measured
    in BENCHMARKS.md (*Backdoor detection without the trigger*); one of :func:`backdoor_score`'s terms."""
    top, second = sorted(shares, reverse=True)[:2] if len(shares) >= 2 else (0.0, 0.0)
    return top / second if second > 0 else None


@dataclass(frozen=True)
class InvertedTrigger:
    """A model's trigger reconstruction (:func:`invert_trigger`): every class's mask and pattern, and the test
    images they were reconstructed from (``fitted``: indices into the test set)."""

    inversion: Inversion
    fitted: torch.Tensor

    @property
    def target(self) -> int:
        return self.inversion.suspect

    def probe(self, test: ImageData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The suspect's trigger stamped on the test images not used to reconstruct it and not of its class:
        ``(x, y_true, y_target)`` like an attack probe."""
        keep = torch.ones(len(test), dtype=torch.bool)
        keep[self.fitted] = False
        keep &= test.y != self.target
        mask, pattern = self.inversion.trigger()
        y_true = test.y[keep]
        return stamp(test.images()[keep], mask, pattern), y_true, torch.full_like(y_true, self.target)

    def metrics(self) -> dict[str, Any]:
        """``inverted/anomaly_index``, ``inverted/norm_ratio``, ``inverted/mask_l1`` and ``inverted/target``."""
        inv = self.inversion
        return {"inverted/anomaly_index": inv.anomaly_index, "inverted/target": self.target,
                "inverted/mask_l1": inv.norms[self.target], "inverted/norm_ratio": inv.norm_ratio}


def fitted_indices(test: ImageData, samples: int, seed: int, search: str) -> torch.Tensor:
    """Indices of the ``samples`` random images (at most half of ``test``) a per-class search is fitted to.

    Raises:
        DataError: ``test`` has fewer than two images, so half of it is empty (exit 5): a search on no image
            would say nothing, and its statistics must not stand in the evidence as if it had run.
    """
    n = min(samples, len(test) // 2)
    if n < 1:
        raise DataError(f"{search} is fitted to half the images and {len(test)} image(s) leave none: "
                        f"it needs at least 2 (a larger test set, clean set or policy.holdout)")
    return torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n]


def invert_trigger(model: nn.Module, test: ImageData, *, samples: int = 200, seed: int = 0, progress: bool = False,
                   **settings: Any) -> InvertedTrigger:
    """Reconstruct every class's trigger (:func:`nft_core.invert.reconstruct_triggers`, which takes
    ``settings``) from ``samples`` random test images (at most half the test set); the rest of the test set
    measures the reconstructed trigger (:meth:`InvertedTrigger.probe`).

    Raises:
        DataError: fewer than two test images (exit 5).
    """
    fitted = fitted_indices(test, samples, seed, "the trigger reconstruction")
    inversion = reconstruct_triggers(model, test.images()[fitted], test.y[fitted], num_classes=test.num_classes,
                                     seed=seed, progress=progress, **settings)
    return InvertedTrigger(inversion, fitted)


def margin_metrics(model: nn.Module, test: ImageData, *, seed: int = 0, progress: bool = False,
                   **settings: Any) -> dict[str, Any]:
    """The maximum-margin statistic (:func:`nft_core.maxmargin.max_margin_statistics`, which takes ``settings``)
    of a model with ``test``'s image shape and classes; no image of ``test`` is used.

    Returns ``margin/pvalue`` (small: one class reaches an outlying margin), ``margin/target`` (that class),
    ``margin/ratio`` (its margin over the median class's; left out when the median is not positive, so a gate
    check on it cannot pass) and ``margin/values`` (every class's margin).

    Raises:
        PackageError: the model's outputs overflow (a margin is not finite): a model no statistic can judge
            is refused (exit 3), never scored without this evidence.
    """
    c, h, w = test.x.shape[1:]
    try:
        result = max_margin_statistics(model, (c, h, w), test.num_classes, seed=seed, progress=progress, **settings)
    except NonFiniteMargins as err:
        raise PackageError(f"model refused: {err}") from err
    ratio = {} if result.ratio is None else {"margin/ratio": result.ratio}
    return {"margin/pvalue": result.pvalue, "margin/target": result.target, **ratio, "margin/values": result.margins}


def universal_metrics(model: nn.Module, test: ImageData, *, samples: int = 200, seed: int = 0, progress: bool = False,
                      **settings: Any) -> dict[str, Any]:
    """Every class's smallest universal additive perturbation (:func:`nft_core.perturb.smallest_perturbations`,
    which takes ``settings``), searched on ``samples`` random test images (at most half the test set).

    Returns ``universal/budget_ratio`` (the suspect's L-inf budget over the median class's: small when one class
    is reached by a far smaller perturbation than the others), ``universal/target`` (that class),
    ``universal/budget`` (its budget, in [0, 1] pixel units) and ``universal/budgets`` (every class's).

    Raises:
        PackageError: the model's outputs overflow on the perturbed images: it is refused (exit 3), never given a
            budget ratio that means nothing.
        DataError: fewer than two test images (exit 5).
    """
    fitted = fitted_indices(test, samples, seed, "the universal perturbation search")
    try:
        found = smallest_perturbations(model, test.images()[fitted], test.y[fitted], num_classes=test.num_classes,
                                       seed=seed, progress=progress, **settings)
    except NonFiniteOutputs as err:
        raise PackageError(f"model refused: {err}") from err
    return {"universal/budget_ratio": found.budget_ratio, "universal/target": found.suspect,
            "universal/budget": found.budgets[found.suspect], "universal/budgets": found.budgets}


def suspect_margin_pvalue(candidate: Mapping[str, Any], model: Mapping[str, Any]) -> float:
    """``margin/suspect_pvalue`` of ``model``: the p-value of the margin of the *candidate's* suspect
    (``margin/target``) among ``model``'s classes (:func:`nft_core.maxmargin.margin_pvalue` with that label).

    A hardened model is asked whether the class that stood out in the candidate still does. Its own largest
    margin is no evidence of a backdoor: fine-tuning on a few hundred images leaves some class's margin
    inflated (the demo's hardened model: class 8, p 0.006 as the largest of ten; the backdoor's class 0 fell
    from 125 to 9, below every other class). On the candidate it is its own ``margin/pvalue``."""
    if model is candidate:
        return float(candidate["margin/pvalue"])
    return margin_pvalue(model["margin/values"], label=int(candidate["margin/target"]))


#: A suspect whose reconstructed mask is this many times smaller than the median class's is flagged.
NORM_RATIO_FACTOR = 3.0

#: A scan whose top label takes this share of the adversarial examples is flagged.
SCAN_SHARE_FLAG = 0.6

#: A scan whose top label draws this many times the flips of the next one is flagged (:func:`runner_up_ratio`).
RUNNER_UP_FLAG = 3.0

#: A maximum-margin p-value at or below this flags a model (the MM-BD paper uses 0.05; see :func:`backdoor_score`).
MARGIN_P_FLAG = 1e-3

#: A suspect whose smallest universal perturbation is this many times smaller than the median class's is flagged.
BUDGET_RATIO_FACTOR = 2.0

#: The reconstructed stamp names its class for :func:`margin_corroborated` only when it is at most this share of
#: the median class's (``inverted/norm_ratio``): the smallest of many ordinary stamps names nothing.
STAMP_NAMES_RATIO = 0.5

#: p-values below this count as this: ``margin/pvalue`` can underflow to 0, and the score stays finite.
MARGIN_P_FLOOR = 1e-12

#: Norm ratios below this count as this: a class reached with an empty stamp (ratio 0) scores 333, not infinity.
NORM_RATIO_FLOOR = 1e-3


def backdoor_score(metrics: Mapping[str, Any], *, corroborate_margin: bool = True) -> float:
    """One number from the trigger-free evidence of a model; 1 or more flags it as backdoored.

    The largest of up to five ratios, each 1 at its own flag threshold:

    - how many times smaller the suspect's reconstructed mask is than the median class's, over
      :data:`NORM_RATIO_FACTOR`;
    - the scan's top-label share over :data:`SCAN_SHARE_FLAG` (a clean 10-class model already sends 30 % of its
      adversarial examples to its natural sink);
    - when reported, the scan's runner-up ratio (``scan/runner_up_ratio``) over :data:`RUNNER_UP_FLAG`: the top
      share's threshold was set with 10 classes, and with 43 a WaNet target drawing half the flips stays under
      it while drawing 9-10x the next class's. Benign models measured reach 2.26 (synthetic) and 1.48 (GTSRB),
      hardened ones 1.0-1.9;
    - when the maximum-margin statistic ran and another statistic names the same class
      (:func:`margin_corroborated`): ``log p / log`` :data:`MARGIN_P_FLAG` (2 at p = 1e-6), with p the
      p-value of the candidate's suspect in this model (``margin/suspect_pvalue``, see
      :func:`suspect_margin_pvalue`; ``margin/pvalue`` when only that is given). With ten classes the gamma
      null is fitted to nine values and its tail is loose (hardened models' own largest margins reach p 0.006
      and 9.4e-4 on classes no backdoor targets), so the threshold sits below the paper's 0.05: on the
      synthetic population no benign model falls below 0.1, and 0.01 and 0.001 flag the same six of ten
      backdoored candidates;
    - when reported, how many times smaller the suspect's smallest universal perturbation is than the median
      class's (``universal/budget_ratio``), over :data:`BUDGET_RATIO_FACTOR`: a trigger added to the whole image
      (SIG's sinusoid) covers every pixel, so its reconstructed mask is no smaller than a benign class's, while
      the perturbation that carries images to its target is far fainter than any other class's. Measured:
      SIG and WaNet on GTSRB 0.26-0.31, benign models 0.64-0.74 there and 0.57-0.74 on the synthetic shapes
      (where backdoored ones reach only 0.56-0.70: the small CNN is fragile to every class).

    ``corroborate_margin=False`` counts MM-BD's term alone, as the score did before 2026-11-24 (the detector
    benchmark compares both).

    Neural Cleanse's own flag (anomaly index above 2) is reported as ``inverted/anomaly_index`` but left out:
    with ten classes the median absolute deviation is unstable. A Blend target whose mask is 5x smaller than
    the median scores 1.6, while a clean model whose masks all lie within 6 % of each other scores 3.4.
    The thresholds come from the synthetic population of ``benchmarks/detector.py`` (BENCHMARKS.md).
    """
    ratio = max(metrics["inverted/norm_ratio"], NORM_RATIO_FLOOR)
    terms = [1 / ratio / NORM_RATIO_FACTOR, metrics["scan/top_share"] / SCAN_SHARE_FLAG]
    if "scan/runner_up_ratio" in metrics:  # absent when fewer than two classes drew flips: the top share says it
        terms.append(metrics["scan/runner_up_ratio"] / RUNNER_UP_FLAG)
    pvalue = metrics.get("margin/suspect_pvalue", metrics.get("margin/pvalue"))
    if pvalue is not None and (margin_corroborated(metrics) or not corroborate_margin):
        terms.append(math.log(max(pvalue, MARGIN_P_FLOOR)) / math.log(MARGIN_P_FLAG))
    if "universal/budget_ratio" in metrics:
        budget_ratio = max(metrics["universal/budget_ratio"], NORM_RATIO_FLOOR)
        terms.append(1 / budget_ratio / BUDGET_RATIO_FACTOR)
    return max(terms)


def margin_corroborated(metrics: Mapping[str, Any]) -> bool:
    """Whether the class MM-BD asks about (``margin/suspect``; ``margin/target`` when absent) is also the
    reconstructed stamp's suspect (``inverted/target``, when its stamp is at most :data:`STAMP_NAMES_RATIO` of the
    median class's), the scan's top label (``scan/top_label``) or the universal perturbation's suspect
    (``universal/target``) in the same metrics: only then does its p-value count in :func:`backdoor_score`.

    Some classes reach an outlying margin without any backdoor: GTSRB's "no entry" sign (class 17) or its
    neighbour is MM-BD's top class in 10 of 12 benign ResNet-18s measured, and one of them reached a margin of 112
    against a median of 52 (p underflowing to 0), the only benign GTSRB model the score flagged. No other
    statistic named that class. Every backdoored GTSRB candidate scanned with the universal perturbation that
    MM-BD flagged had its target named by another statistic too, the Trojan ones (whose stamp and scan may point
    elsewhere) by the universal perturbation (BENCHMARKS.md, *Backdoor detection without the trigger*).

    The stamp's suspect must stand out itself to name a class: the same "no entry" class can also need the smallest
    of 43 ordinary stamps (0.61x the median on the clean images a benign GTSRB candidate was judged on, which with
    MM-BD's p of 0 flagged it at 4.0 and rejected every purification of it; BENCHMARKS.md, *A benign candidate
    through the step*). In the benchmark records, stamps that named a backdoor's target with MM-BD were 0.04-0.48x
    the median, every benign candidate's smallest 0.54-0.72x; hardened models whose smallest stamp sat on MM-BD's
    class, 0.46-0.59x (a weak corroboration there only lets a small p-value count).
    """
    suspect = metrics.get("margin/suspect", metrics.get("margin/target"))
    if suspect is None:
        return False
    stamp = metrics.get("inverted/target") if metrics.get("inverted/norm_ratio", 1.0) <= STAMP_NAMES_RATIO else None
    return stamp == suspect or any(metrics.get(k) == suspect for k in ("scan/top_label", "universal/target"))


def finite_metrics(metrics: dict[str, Any], what: str) -> dict[str, Any]:
    """``metrics`` without the entries that hold a non-finite number (each one logged, naming ``what``).

    JSON has no infinity (a record would store null), Kubeflow's metric store refuses one, and a gate check on
    a dropped metric cannot pass: a hostile model's overflowing logits, or a zero spread in Neural Cleanse's
    statistics, reject instead of breaking a stage."""
    def finite(value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return all(finite(v) for v in value)
        return not isinstance(value, float) or math.isfinite(value)

    dropped = [key for key, value in metrics.items() if not finite(value)]
    for key in dropped:
        log.warning("%s metric %s is not finite (%s): left out", what, key, metrics[key])
    return {key: value for key, value in metrics.items() if key not in dropped}


def flatten(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Numeric entries of a metrics dict, nested dicts as ``key/subkey`` (bools and None dropped)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}/{k}": v for k, v in flatten(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = value
    return flat


def compare(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{metric: {"before", "after", "delta"}}`` over the numeric metrics of either side (None where absent;
    no delta for the labels in :data:`CATEGORICAL`)."""
    b, a = flatten(before), flatten(after)
    keys = list(b) + [k for k in a if k not in b]
    return {k: {"before": b.get(k), "after": a.get(k),
                "delta": a[k] - b[k] if k in a and k in b and k not in CATEGORICAL else None} for k in keys}


@dataclass(frozen=True)
class LayerMasks:
    """The mask values of one masked layer (``index`` is l, 1-based, in forward order)."""

    index: int
    name: str
    lower_bound: float
    values: np.ndarray


def layer_masks(masks: Mapping[str, torch.Tensor], layers: Sequence[MaskedLayer],
                lower_bounds: Sequence[float]) -> list[LayerMasks]:
    """Mask values by layer, in forward order, with their lower bounds mu(l).

    For a purification: ``layer_masks(mask_state(result.model), result.layers, result.lower_bounds)``
    (read the masks before :func:`nft_core.fold.fold_masks` removes them, or load the saved mask state).

    Raises:
        ValueError: the masks and the layers name different modules.
    """
    if set(masks) != {layer.name for layer in layers}:
        raise ValueError(f"masks of {sorted(masks)} do not match the masked layers {[layer.name for layer in layers]}")
    return [LayerMasks(layer.index, layer.name, float(lower_bounds[layer.index - 1]),
                       masks[layer.name].detach().float().cpu().numpy()) for layer in sorted(layers, key=lambda l: l.index)]


def purification_summary(result: PurifyResult) -> dict[str, Any]:
    """Wall time, size and mask statistics of a purification (call before folding its model)."""
    stats = mask_statistics(layer_masks(mask_state(result.model), result.layers, result.lower_bounds))
    return {"wall_time_s": result.wall_time_s, "device": result.device, "epochs": len(result.history),
            "trainable_params": result.trainable_params, "total_params": result.total_params,
            "eta": result.eta, "samples_per_class": result.samples_per_class, "masks": stats}


def mask_statistics(layers: Sequence[LayerMasks]) -> dict[str, Any]:
    """Overall and per-layer mean, min and share of masks at their lower bound."""
    def stats(values: np.ndarray, at_bound: np.ndarray) -> dict[str, float]:
        return {"mean": float(values.mean()), "min": float(values.min()), "share_at_lower_bound": float(at_bound.mean())}

    bound = [layer.values <= layer.lower_bound + AT_BOUND_TOL for layer in layers]
    rows = [{"index": layer.index, "name": layer.name, "size": int(layer.values.size),
             "lower_bound": layer.lower_bound, **stats(layer.values, b)} for layer, b in zip(layers, bound)]
    return {**stats(np.concatenate([l.values for l in layers]), np.concatenate(bound)), "layers": rows}
