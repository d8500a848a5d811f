"""The hardening policy's paths the end-to-end CLI test does not take (issue 14), at the stage level.

``stages.purify_stage`` is called directly on a tiny candidate (a 16x16 ``small_cnn`` fitted for a few full-batch
steps to images of ten noisy class prototypes, so its held-out accuracy is well above chance and a wrecking
learning rate shows), a pull directory made by hand (the package and its ``provenance.json``, all
``check_chain(pull=...)`` reads; no registry) and a clean npz. The attempts are cheap ``ft`` runs (0 or 1 epoch).
Covered: no attempt passes (the one failing fewest checks is kept, ties broken by the higher held-out accuracy),
the policy's margin (an attempt within it of a bound fails; when none passes, the gate's own thresholds rank first),
the time budget (attempts after it are recorded as skipped), a ``policy.holdout`` that leaves an empty part, an
attempt whose training diverges (it fails, the next one runs; when all diverge, the stage refuses), and attempts
judged on their held-out backdoor score and on the candidate's suspect class.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter

from harden import stages
from harden.errors import DataError, ParamsError
from harden.evaluate import backdoor_score, margin_metrics
from harden.gate import GateConfig
from harden.package import InputSpec, ModelSpec, save_package
from harden.params import BaseParams, PolicyParams, ProbesParams, Purify
from harden.records import PACKAGE, Provenance, tree_sha256
from nft_core.maxmargin import margin_pvalue

SIZE = 16
CLASSES = 10

#: A gate no attempt passes (acc is never 1 on these noisy images) with a check the wrecked attempts pass and the
#: accurate ones fail (a ceiling on acc), so the number of failed checks ranks the attempts against their accuracy.
GATE = GateConfig(metrics=[{"metric": "acc", "min": 1.0}, {"metric": "acc", "max": 0.5}], required_facts=[],
                  allow_no_probes=True)
PROBES = ProbesParams()  # no attack probes, no reconstructed trigger: the gate above needs neither
BASE = BaseParams(device="cpu", seed=0)


def purify(**fields: Any) -> Any:
    """One ``purify`` section / fallback as ``params.yaml`` writes it, validated by the discriminated union."""
    return TypeAdapter(Purify).validate_python(fields)


def _images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` noisy copies of each class's fixed random prototype (uint8 N x H x W x 3) and their labels."""
    prototypes = np.random.default_rng(0).integers(0, 256, size=(CLASSES, SIZE, SIZE, 3))
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(CLASSES), per_class)
    x = np.clip(prototypes[y] + rng.normal(0, 90, size=(len(y), SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    return x, y


@dataclass
class Setup:
    pull: Path
    clean: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """A pulled candidate (package + provenance) that learned the prototypes a little, and 10 clean images per class."""
    root = tmp_path_factory.mktemp("policy")
    spec = ModelSpec(builder="small_cnn", kwargs={"width": 8}, num_classes=CLASSES,
                     input=InputSpec(channels=3, height=SIZE, width=SIZE, mean=[0.5] * 3, std=[0.25] * 3))
    torch.manual_seed(0)
    net = spec.build()
    model = spec.wrap(net)
    x, y = _images(10, seed=1)
    images, labels = torch.tensor(x).permute(0, 3, 1, 2).float() / 255, torch.tensor(y)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
    pull = root / "pull"
    save_package(net.eval(), spec, pull / PACKAGE)
    Provenance(inputs={}, model_name="policy-test", version=1, run_id=None, source_uri="local", aliases=[],
               tracking_uri="none", files_sha256={}, package_sha256=tree_sha256(pull / PACKAGE),
               pulled_at=datetime.now(timezone.utc).isoformat(timespec="seconds")).write(pull)
    clean = root / "clean.npz"
    x, y = _images(10, seed=2)
    np.savez(clean, x=x, y=y)
    return Setup(pull=pull, clean=clean)


@pytest.fixture(scope="module")
def candidate_acc(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> float:
    """The unchanged candidate's held-out accuracy, as the policy measures it (about 0.7; its last digits depend on
    the CPU's arithmetic, so the gates below are set around it rather than around a number written here). A
    fallback makes the policy hold images out; the first attempt passes this gate, so it never runs."""
    gate = GateConfig(metrics=[{"metric": "acc", "min": 0.0}], required_facts=[], allow_no_probes=True)
    record = stages.purify_stage(purify(method="ft", epochs=0), BASE, setup.pull, setup.clean,
                                 tmp_path_factory.mktemp("unchanged"), policy=PolicyParams(fallbacks=[purify(method="ft", epochs=0)], holdout=0.4),
                                 probes=PROBES, gate=gate, progress=False)
    acc = record.attempts[0].holdout["acc"]
    assert 0.5 < acc < 0.9  # well above chance (0.1) and below the ceiling the wrecked attempts are ranked by
    return float(acc)


def test_when_no_attempt_passes_the_one_failing_fewest_checks_is_kept_then_the_most_accurate(setup: Setup,
                                                                                             tmp_path: Path):
    plan = [purify(method="ft", epochs=1, lr=1.0, batch_size=16),   # wrecks it: passes the ceiling, acc ~0.1
            purify(method="ft", epochs=1, lr=5.0, batch_size=16),   # wrecks it: passes the ceiling, acc ~0.1-0.15
            purify(method="ft", epochs=0)]                          # unchanged: acc ~0.7, fails both checks
    policy = PolicyParams(fallbacks=plan[1:], holdout=0.4)
    record = stages.purify_stage(plan[0], BASE, setup.pull, setup.clean, tmp_path / "purify", policy=policy,
                                 probes=PROBES, gate=GATE, progress=False)
    attempts = record.attempts
    assert [a.config["lr"] for a in attempts] == [1.0, 5.0, plan[2].lr]
    assert [a.config["epochs"] for a in attempts] == [1, 1, 0]
    assert all(a.skipped is None and a.wall_time_s is not None and a.passed is False for a in attempts)
    assert [a.verdict for a in attempts] == ["failed"] * 3
    assert [len(a.failed) for a in attempts] == [1, 1, 2], [a.failed for a in attempts]
    accs = [a.holdout["acc"] for a in attempts]
    assert accs[2] > 0.5 > accs[1] > accs[0]  # the unchanged candidate is the most accurate; the tie-break's premise
    # fewest failed checks wins over accuracy (not the third), the higher accuracy breaks the tie (not the first)
    assert [a.chosen for a in attempts] == [False, True, False]
    assert [a.word for a in attempts] == ["ft failed", "ft failed (chosen)", "ft failed"]
    assert record.defense == "ft" and record.config == attempts[1].config
    assert record.wall_time_s == attempts[1].wall_time_s
    assert record.holdout_samples == 40 and record.clean_samples == 60


@pytest.mark.parametrize("margin, attempts_run", [(0.0, 1), (0.01, 2)])
def test_an_attempt_must_pass_the_held_out_checks_with_the_policy_margin(setup: Setup, tmp_path: Path,
                                                                          candidate_acc: float, margin: float,
                                                                          attempts_run: int):
    """The unchanged candidate (held-out acc about 0.7) lies within both bounds of this gate by 0.005: it passes
    without a margin (nothing else runs) and fails both checks with a 1-point one, so the wrecking fallback runs
    (acc about 0.1: it fails the floor with or without a margin). Neither passes then, and the unchanged one is
    kept: it fails no check at the gate's own thresholds, although it fails more checks with the margin (2 against
    1)."""
    low, high = candidate_acc - 0.005, candidate_acc + 0.005
    gate = GateConfig(metrics=[{"metric": "acc", "min": low}, {"metric": "acc", "max": high}], required_facts=[],
                      allow_no_probes=True)
    policy = PolicyParams(fallbacks=[purify(method="ft", epochs=1, lr=1.0, batch_size=16)], holdout=0.4,
                          margin=margin)
    record = stages.purify_stage(purify(method="ft", epochs=0), BASE, setup.pull, setup.clean, tmp_path / "purify",
                                 policy=policy, probes=PROBES, gate=gate, progress=False)
    attempts = record.attempts
    assert len(attempts) == attempts_run
    assert attempts[0].holdout["acc"] == pytest.approx(candidate_acc)
    assert attempts[0].chosen and record.config["epochs"] == 0
    if margin == 0:
        assert attempts[0].passed and attempts[0].failed == []
    else:
        assert [a.passed for a in attempts] == [False, False]
        assert [len(a.failed) for a in attempts] == [2, 1], [a.failed for a in attempts]
        assert f"violates the minimum {low + margin:.4f}" in attempts[0].failed[0]
        assert attempts[1].holdout["acc"] < low


def test_no_attempt_starts_once_the_time_budget_is_spent(setup: Setup, tmp_path: Path):
    first = purify(method="ft", epochs=1, lr=1e-6, batch_size=16)
    policy = PolicyParams(fallbacks=[purify(method="ft", epochs=1, lr=1.0, batch_size=16),
                                     purify(method="ft", epochs=0)], holdout=0.4, budget_s=1e-9)
    record = stages.purify_stage(first, BASE, setup.pull, setup.clean, tmp_path / "purify", policy=policy,
                                 probes=PROBES, gate=GATE, progress=False)
    ran, *skipped = record.attempts
    assert ran.skipped is None and ran.wall_time_s is not None and ran.wall_time_s > 1e-9
    assert ran.passed is False and ran.verdict == "failed" and ran.chosen  # the only one, kept though it failed
    assert len(skipped) == 2
    for attempt, fallback in zip(skipped, policy.fallbacks):
        assert attempt.skipped == "time budget spent"
        assert attempt.wall_time_s is None and attempt.passed is None and attempt.failed == []
        assert attempt.holdout == {} and not attempt.chosen
        assert attempt.verdict == "skipped" and attempt.word == "ft skipped"
        assert attempt.config["lr"] == fallback.lr and attempt.config["epochs"] == fallback.epochs
    assert record.config == ran.config and record.wall_time_s == ran.wall_time_s


@pytest.mark.parametrize("per_class, holdout", [(1, 0.2), (2, 0.2), (4, 0.1)])
def test_a_holdout_that_leaves_an_empty_part_is_refused(setup: Setup, tmp_path: Path, per_class: int,
                                                        holdout: float):
    """The split keeps round((1 - holdout) * n) of each class's n images, at least one, for purification; when
    that is all of every class, nothing is held out to judge the attempts."""
    clean = tmp_path / "clean.npz"
    x, y = _images(per_class, seed=3)
    np.savez(clean, x=x, y=y)
    policy = PolicyParams(fallbacks=[purify(method="ft", epochs=0)], holdout=holdout)
    with pytest.raises(DataError, match=rf"policy\.holdout={holdout} of {per_class * CLASSES} clean images "
                                        r"leaves an empty part"):
        stages.purify_stage(purify(method="ft", epochs=0), BASE, setup.pull, clean, tmp_path / "purify",
                            policy=policy, probes=PROBES, gate=GATE, progress=False)
    assert not (tmp_path / "purify").exists()


@pytest.mark.parametrize("metric, search", [("inverted/norm_ratio", "the trigger reconstruction"),
                                            ("universal/budget_ratio", "the universal perturbation search")])
def test_a_single_held_out_image_is_refused_where_a_search_must_judge_on_it(setup: Setup, tmp_path: Path,
                                                                            metric: str, search: str):
    """Class 0 has two clean images and keeps one; every other class has one and keeps it: one image is held out.
    The per-class searches are fitted to half the held-out images, none here: the stage refuses the clean set
    (exit 5) instead of judging the attempts by statistics of a search that never saw an image."""
    x, y = _images(2, seed=3)
    keep = np.r_[0, 1, np.arange(2, len(y), 2)]  # both images of class 0, one of every other class
    clean = tmp_path / "clean.npz"
    np.savez(clean, x=x[keep], y=y[keep])
    probes = ProbesParams.model_validate({"inversion": {"steps": 2}, "universal": {"steps": 2},
                                          "scan": {"steps": 1}, "margin": {"starts": 1, "steps": 2}})
    gate = GateConfig(metrics=[{"metric": metric, "min": 0.0}], required_facts=[], allow_no_probes=True)
    policy = PolicyParams(fallbacks=[purify(method="ft", epochs=0)], holdout=0.4)
    with pytest.raises(DataError, match=f"{search} is fitted to half the images and 1 image\\(s\\) leave none"):
        stages.purify_stage(purify(method="ft", epochs=0), BASE, setup.pull, clean, tmp_path / "purify",
                            policy=policy, probes=probes, gate=gate, progress=False)
    assert not (tmp_path / "purify").exists()


def test_an_attempt_whose_training_diverges_fails_and_the_next_one_runs(setup: Setup, tmp_path: Path):
    diverging = purify(method="ft", epochs=2, lr=1e12, batch_size=16)
    policy = PolicyParams(fallbacks=[purify(method="ft", epochs=0)], holdout=0.4)
    record = stages.purify_stage(diverging, BASE, setup.pull, setup.clean, tmp_path / "purify", policy=policy,
                                 probes=PROBES, gate=GATE, progress=False)
    first, second = record.attempts
    assert first.passed is False and "diverged" in first.failed[0] and first.wall_time_s is None
    assert not first.chosen and second.chosen and record.config == second.config


def test_a_purification_whose_every_attempt_diverges_is_refused(setup: Setup, tmp_path: Path):
    with pytest.raises(ParamsError, match="purification diverged: ft: its training diverged"):
        stages.purify_stage(purify(method="ft", epochs=2, lr=1e12, batch_size=16), BASE, setup.pull, setup.clean,
                            tmp_path / "purify", progress=False)
    assert not (tmp_path / "purify").exists()


#: The trigger-free evidence at test sizes (the defaults take minutes on a CPU).
EVIDENCE = ProbesParams(scan={"samples": 10, "steps": 2}, inversion={"samples": 10, "steps": 5, "batch_size": 8},
                        margin={"starts": 2, "steps": 5})


@pytest.mark.parametrize("bound", [1e6, 0.0])
def test_each_attempt_is_judged_on_its_held_out_backdoor_score(setup: Setup, tmp_path: Path, bound: float):
    """With a gate on ``scan/backdoor_score``, each attempt's score and its parts (reconstruction, scan, maximum
    margins) are measured on the held-out images and judged: a bound no score reaches passes the first attempt
    and nothing else runs; a bound every score breaks (a score is positive) fails it, and the fallback runs."""
    gate = GateConfig(metrics=[{"metric": "scan/backdoor_score", "max": bound}], required_facts=[],
                      allow_no_probes=True)
    policy = PolicyParams(fallbacks=[purify(method="ft", epochs=0)], holdout=0.4, margin=0.0)
    record = stages.purify_stage(purify(method="ft", epochs=0), BASE, setup.pull, setup.clean, tmp_path / "purify",
                                 policy=policy, probes=EVIDENCE, gate=gate, progress=False)
    assert len(record.attempts) == (1 if bound else 2)
    for attempt in record.attempts:
        held = attempt.holdout
        assert {"inverted/norm_ratio", "inverted/asr", "scan/top_share", "margin/suspect_pvalue"} <= set(held)
        assert held["scan/backdoor_score"] == pytest.approx(backdoor_score(held))
        assert held["scan/backdoor_score"] > 0
        assert attempt.passed is (bound > 0)
        assert bound or "scan/backdoor_score" in attempt.failed[0]


def test_each_attempt_is_asked_about_the_candidate_s_suspect_class(setup: Setup, tmp_path: Path):
    """``margin/suspect_pvalue`` of an attempt is the p-value of the class whose margin stood out in the
    *candidate*, among the attempt's margins; an unchanged candidate (``ft`` for 0 epochs) has the same margins."""
    gate = GateConfig(metrics=[{"metric": "margin/suspect_pvalue", "min": 0.0}], required_facts=[],
                      allow_no_probes=True)
    policy = PolicyParams(fallbacks=[purify(method="ft", epochs=0)], holdout=0.4, margin=0.0)
    record = stages.purify_stage(purify(method="ft", epochs=0), BASE, setup.pull, setup.clean, tmp_path / "purify",
                                 policy=policy, probes=EVIDENCE, gate=gate, progress=False)
    held = record.attempts[0].holdout
    candidate = stages._load_model(setup.pull / PACKAGE)[0]
    margins = margin_metrics(candidate, stages.read_npz(setup.clean), seed=BASE.seed,
                             **EVIDENCE.margin.model_dump(exclude={"enabled"}))
    assert held["margin/target"] == margins["margin/target"]
    assert held["margin/suspect_pvalue"] == pytest.approx(margin_pvalue(margins["margin/values"],
                                                                        label=margins["margin/target"]))
    assert held["margin/suspect_pvalue"] < held["margin/pvalue"], "a named class's p, not the largest of ten's"
    assert "inverted/norm_ratio" not in held, "no check asks for a reconstruction: none is made"


@pytest.mark.parametrize("flag, attempts_run", [(1e6, 1), (0.0, 2)])
def test_a_check_s_condition_reads_the_candidate_s_held_out_evidence(setup: Setup, tmp_path: Path, flag: float,
                                                                     attempts_run: int):
    """A check that applies only where the candidate looks backdoored (``when`` on its backdoor score) is judged
    against the candidate's score on the same held-out images, which the record keeps; the score is measured
    although only the condition names it. A check no model passes (acc at least 1) is let off where the candidate's
    score is below ``flag`` (the first attempt passes), and fails every attempt where it is not."""
    gate = GateConfig(metrics=[{"metric": "acc", "min": 1.0, "when": {"metric": "scan/backdoor_score", "min": flag}}],
                      required_facts=[], allow_no_probes=True)
    policy = PolicyParams(fallbacks=[purify(method="ft", epochs=0)], holdout=0.4, margin=0.0)
    probes = EVIDENCE.model_copy(update={"margin": EVIDENCE.margin.model_copy(update={"enabled": False}),
                                         "universal": EVIDENCE.universal.model_copy(update={"enabled": False})})
    record = stages.purify_stage(purify(method="ft", epochs=0), BASE, setup.pull, setup.clean, tmp_path / "purify",
                                 policy=policy, probes=probes, gate=gate, progress=False)
    baseline = record.holdout_candidate
    assert baseline is not None and 0 < baseline["scan/backdoor_score"] < 1e6
    assert baseline["acc"] == pytest.approx(record.attempts[0].holdout["acc"])  # 0 epochs: the candidate itself
    assert len(record.attempts) == attempts_run
    assert [a.passed for a in record.attempts] == ([True] if flag else [False, False])
