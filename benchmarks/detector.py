"""Backdoor detection without the trigger: trigger reconstruction, the scan and MM-BD's margins as a detector.

A population of candidates the project makes (every synthesized attack at two poisoning rates, and benign
models of the same architecture over several seeds) is scanned exactly as the evaluate stage scans a model
(:func:`harden.evaluate.invert_trigger`, :func:`harden.evaluate.scan_metrics`,
:func:`harden.evaluate.margin_metrics`, the settings of ``params.yaml``'s ``probes`` section). Each backdoored
candidate that learned its backdoor is then hardened with ``params.yaml``'s ``purify`` section on a clean set drawn
from the training images and scanned again; when that model fails the gate's ACC and ASR-lift checks (the real
trigger's and the one reconstructed from the candidate), the ``policy.fallbacks`` are tried in turn, as the step
does (judged here on the test set with the real trigger, where the step judges on held-out clean images with its
probes), and the first that passes is what a blessed hardening ships. Cached rows are judged again by today's gate.
By default the candidates are the demo's: its small CNN on the synthetic shapes, trained for
``candidate.demo.epochs`` epochs. ``--data`` takes a dataset spec with both splits instead (real photographs:
``torchvision:GTSRB:ROOT``) and ``--arch`` a real architecture (torchvision's ResNet-18, PreActResNet-18 at width
64). The table gives, per rule (NC's anomaly index, the norm ratio, the scan, its runner-up ratio, MM-BD's p-value,
the combined backdoor score), the true-positive rate on backdoored candidates, the false-positive rate on benign
ones, and the share still flagged after hardening, plus the reconstructed trigger's ASR on the hardened models.

    .venv/bin/python -m benchmarks.detector --no-harden            # scan only: about 1 h on 2 cores (17 models)
    .venv/bin/python -m benchmarks.detector                        # and harden: about 5 min more a candidate
    .venv/bin/python -m benchmarks.detector --table-only           # re-render from the cached rows
    # GTSRB, ResNet-18 (6 epochs: 89-92 % clean accuracy), 10 % poisoning, three benign seeds: about 20 min a model
    .venv/bin/python -m benchmarks.detector --data torchvision:GTSRB:ROOT --arch resnet18 --no-flip --epochs 6 \
        --attacks badnets,blend,sig,wanet,trojan --levels 1 --benign-seeds 0,1,2 --no-harden \
        --cache runs/bench/detector-gtsrb
    # on a GPU: --device cuda; --npz TRAIN TEST reads the subsets benchmarks/gtsrb.py --pack writes, and
    # benchmarks/detector_rows.sh runs one process per attack side by side (BENCHMARKS.md has the commands)

Rows are cached by content (candidate recipe, settings) under ``--cache``; a rerun only measures what is new.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import dataclass
from datetime import date
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from benchmarks.gtsrb import data_digest
from harden.evaluate import (BUDGET_RATIO_FACTOR, MARGIN_P_FLAG, NORM_RATIO_FACTOR, RUNNER_UP_FLAG, SCAN_SHARE_FLAG,
                             InvertedTrigger, backdoor_score, evaluate_torch, invert_trigger, margin_metrics,
                             runner_up_ratio, scan_metrics, suspect_margin_pvalue, universal_metrics)
from harden.gate import GateConfig, evaluate_gate
from harden.params import Params, PurifyParams, load_params, load_yaml, parse_params
from harden.probes import Probe
from nft_core.attacks import ATTACKS, make_attack
from nft_core.data import ImageData, load_dataset, make_synthetic, stratified_split
from nft_core.defenses import run_defense
from nft_core.invert import ANOMALY_THRESHOLD
from nft_core.maxmargin import PAPER_ALPHA
from nft_core.models import Normalized, build_model
from nft_core.train import channel_stats, make_backdoored_candidate

REPO = Path(__file__).resolve().parents[1]
TARGET = 0
#: Poisoning rates of the two populations (clean-label attacks poison this share of the target class instead).
RATES = (0.05, 0.1)
CLEAN_LABEL_SHARES = (0.4, 0.8)
#: ``--arch`` -> the model builder
ARCHS = {"small_cnn": "small_cnn", "resnet18": "torchvision.resnet18", "preact_resnet18": "preact_resnet18"}  # the last at width 64


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Source:
    """Where the candidates come from: the training set, the architecture and whether training mirrors images."""

    train: ImageData
    arch: str = "small_cnn"
    flip: bool = True

    @cached_property
    def recipe(self) -> dict[str, Any]:
        """What a candidate is made from besides attack, rate, seed and epochs: the training set's content digest
        (so candidates cached from other data are never reused), the architecture and the flip setting."""
        return {"n": len(self.train), "data": data_digest(self.train), "arch": self.arch, "flip": self.flip, "v": 1}


def candidate(source: Source, attack_name: str, level: int, seed: int, epochs: int,
              cache: Path, device: str = "cpu") -> tuple[Normalized, dict]:
    """A cached backdoored (``level`` 0/1: the lower/higher rate) or benign (``attack_name == 'none'``) model."""
    train = source.train
    channels, height, width = train.x.shape[1:]
    attack = make_attack("badnets" if attack_name == "none" else attack_name, target=TARGET,
                         num_classes=train.num_classes, image_shape=(channels, height, width))
    if attack_name == "none":
        rate = 0.0
    elif attack.clean_label:
        rate = CLEAN_LABEL_SHARES[level] * float((train.y == TARGET).float().mean())
    else:
        rate = RATES[level]
    recipe = {"attack": attack_name, "rate": rate, "seed": seed, "epochs": epochs, **source.recipe}
    key = digest(recipe)
    weights, meta = cache / f"{key}.safetensors", cache / f"{key}.json"
    mean, std = channel_stats(train)
    builder = ARCHS[source.arch]
    if weights.exists() and meta.exists():
        model = Normalized(build_model(builder, num_classes=train.num_classes), mean, std)
        model.net.load_state_dict(load_file(str(weights)))
        return model.to(device).eval(), json.loads(meta.read_text())
    print(f"  training {source.arch} {attack_name} at {rate:.3f}, seed {seed} ({len(train)} images, {epochs} epochs)",
          flush=True)
    model, info = make_backdoored_candidate(train, attack, builder=builder, poison_rate=rate, epochs=epochs,
                                            seed=seed, mean=mean, std=std, flip=source.flip, progress=False,
                                            device=device)
    cache.mkdir(parents=True, exist_ok=True)
    save_file(model.net.state_dict(), str(weights))
    record = {"key": key, **recipe, "train_time_s": info["wall_time_s"], "device": str(info.get("device", device))}
    meta.write_text(json.dumps(record))
    return model.to(device).eval(), record  # train_classifier hands the model back on the CPU


def scan_model(model: torch.nn.Module, test: ImageData, probes: Any, seed: int, probe: Probe | None,
               trigger: Any = None) -> tuple[dict[str, Any], Any]:
    """The evaluate stage's evidence on one model: acc, the real trigger's ASR, inversion, scan, score."""
    t0 = time.perf_counter()
    inv = invert_trigger(model, test, seed=seed, **probes.inversion.model_dump(exclude={"enabled"}))
    metrics = evaluate_torch(model, test, [probe] if probe else [], trigger=trigger or inv)
    metrics.update(inv.metrics())
    metrics.update(scan_metrics(model, test, samples=probes.scan.samples, eps=probes.scan.eps,
                                steps=probes.scan.steps, seed=seed))
    metrics.update(margin_metrics(model, test, seed=seed, **probes.margin.model_dump(exclude={"enabled"})))
    metrics.update(universal_metrics(model, test, seed=seed, **probes.universal.model_dump(exclude={"enabled"})))
    metrics["scan/backdoor_score"] = backdoor_score(metrics)
    metrics["norms"] = inv.inversion.norms
    metrics["scan_time_s"] = time.perf_counter() - t0
    return metrics, inv


def runner_up(metrics: dict[str, Any]) -> float | None:
    """``scan/runner_up_ratio``, from ``scan/label_shares`` for rows written before it was reported; infinite when
    fewer than two classes drew flips (a gate check on it fails then); None for rows without either."""
    if "scan/runner_up_ratio" in metrics or "scan/label_shares" not in metrics:
        return metrics.get("scan/runner_up_ratio")
    ratio = runner_up_ratio(metrics["scan/label_shares"])
    return math.inf if ratio is None else ratio


def score(metrics: dict[str, Any], *, margin: bool = True, ratio: bool = True, universal: bool = True,
          corroborate: bool = True) -> float:
    """The library's :func:`backdoor_score` of a row (with the runner-up ratio of rows that stored only the label
    shares), or the score without MM-BD's term, the ratio's or the universal perturbation's, as it was before each
    joined it, or with MM-BD's term counted alone (``corroborate=False``), as it was before it needed another
    statistic to name its class."""
    kept = {k: v for k, v in metrics.items() if k != "scan/runner_up_ratio"
            and (margin or not k.startswith("margin/")) and (universal or not k.startswith("universal/"))}
    reported = runner_up(metrics) if ratio else None  # the one place the ratio comes from
    if reported is not None and math.isfinite(reported):
        kept["scan/runner_up_ratio"] = reported
    return backdoor_score(kept, corroborate_margin=corroborate)


def rules() -> dict[str, Any]:
    """Rule name -> whether it flags a model's metrics (None: the row lacks what the rule needs)."""
    def needs_ratio(rule: Any) -> Any:
        return lambda m: None if runner_up(m) is None else bool(rule(m))

    def with_universal(rule: Any) -> Any:
        return lambda m: None if "universal/budget_ratio" not in m else needs_ratio(rule)(m)

    def ratio_flags(metrics: dict[str, Any]) -> bool | None:
        ratio = runner_up(metrics)
        return None if ratio is None else ratio >= RUNNER_UP_FLAG

    return {
        f"NC anomaly index > {ANOMALY_THRESHOLD:g}": lambda m: m["inverted/anomaly_index"] > ANOMALY_THRESHOLD,
        f"suspect mask {NORM_RATIO_FACTOR:g}x below the median": lambda m: m["inverted/norm_ratio"] <= 1 / NORM_RATIO_FACTOR,
        f"scan top share >= {SCAN_SHARE_FLAG:g}": lambda m: m["scan/top_share"] >= SCAN_SHARE_FLAG,
        f"scan runner-up ratio >= {RUNNER_UP_FLAG:g}": ratio_flags,
        f"MM-BD p <= {PAPER_ALPHA:g} (the paper's)": lambda m: m["margin/pvalue"] <= PAPER_ALPHA,
        f"MM-BD p <= {MARGIN_P_FLAG:g}": lambda m: m["margin/pvalue"] <= MARGIN_P_FLAG,
        f"MM-BD p <= {MARGIN_P_FLAG:g}, the candidate's suspect": lambda m: m["margin/suspect_pvalue"] <= MARGIN_P_FLAG,
        f"universal perturbation {BUDGET_RATIO_FACTOR:g}x below the median":
            lambda m: m["universal/budget_ratio"] <= 1 / BUDGET_RATIO_FACTOR,
        "backdoor score without MM-BD, the ratio or the universal perturbation >= 1":
            lambda m: score(m, margin=False, ratio=False, universal=False) >= 1,
        "backdoor score without the ratio or the universal perturbation >= 1":
            lambda m: score(m, ratio=False, universal=False, corroborate=False) >= 1,
        "backdoor score without the universal perturbation >= 1":
            needs_ratio(lambda m: score(m, universal=False, corroborate=False) >= 1),
        "backdoor score with MM-BD's term counted alone >= 1 (mask ratio, scan share or ratio, MM-BD p, universal "
        "perturbation)": with_universal(lambda m: score(m, corroborate=False) >= 1),
        "backdoor score >= 1 (the same, MM-BD's term only where the stamp, the scan or the universal perturbation "
        "names its class)": with_universal(lambda m: score(m) >= 1),
    }


def pct(flags: list[bool | None]) -> str:
    """The share of models a rule flags, among those it could judge."""
    judged = [f for f in flags if f is not None]
    n, d = sum(judged), len(judged)
    return f"{100 * n / d:.0f} % ({n}/{d})" if d else "n/a"


#: A poisoned candidate whose real trigger reaches less than this ASR did not learn its backdoor: left out of the rates.
LEARNED_ASR = 0.5


def _suspect(candidate: dict[str, Any], hardened: dict[str, Any]) -> str:
    if "margin/suspect_pvalue" not in hardened:
        return "-"
    return f"{candidate['margin/target']} ({hardened['margin/suspect_pvalue']:.1e})"


def judged(rule: Any) -> Any:
    """``rule``, answering None (not judged) for rows without a metric it reads."""
    def safe(m: dict[str, Any]) -> bool | None:
        try:
            return rule(m)  # type: ignore[no-any-return]
        except KeyError:
            return None
    return safe


def _scan(m: dict[str, Any]) -> str:
    ratio = runner_up(m)
    shown = "" if ratio is None else "; no runner-up" if math.isinf(ratio) else f"; {ratio:.2f}x"
    return f"{m['scan/top_label']} ({m['scan/top_share']:.2f}{shown})"


def _universal(m: dict[str, Any]) -> str:
    return f"{m['universal/target']} ({m['universal/budget_ratio']:.2f})" if "universal/budget_ratio" in m else "-"


def _mmbd(m: dict[str, Any]) -> str:
    return f"{m['margin/target']} ({m['margin/pvalue']:.1e})" if "margin/pvalue" in m else "-"


def latest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per candidate (attack, rate, seed, epochs): a run that hardened it wins over one that only scanned it."""
    best: dict[tuple[str, float, int, int], dict[str, Any]] = {}
    for row in rows:
        key = (row["attack"], row["rate"], row["seed"], row.get("epochs", 6))  # rows before 2026-11-23's: 6 epochs
        if key not in best or (row["hardened"] and not best[key]["hardened"]):
            best[key] = row
    return list(best.values())


def with_suspect(row: dict[str, Any]) -> dict[str, Any]:
    """The row with ``margin/suspect`` and ``margin/suspect_pvalue`` on both sides, as the evaluate stage writes
    them: the hardened model is asked about the candidate's suspect (its own largest margin is kept as
    ``margin/pvalue``). Rows from before MM-BD (2026-11-22) have no margins and stay as they are."""
    c = row["candidate"]
    if "margin/pvalue" not in c:
        return row
    c = {**c, "margin/suspect": c["margin/target"], "margin/suspect_pvalue": suspect_margin_pvalue(c, c)}

    def asked(h: dict[str, Any] | None) -> dict[str, Any] | None:
        return h and {**h, "margin/suspect": c["margin/target"], "margin/suspect_pvalue": suspect_margin_pvalue(c, h)}

    return {**row, "candidate": c, "hardened": asked(row["hardened"]),
            "fallbacks": [{**a, "hardened": asked(a["hardened"])} for a in row.get("fallbacks") or []]}


def render(rows: list[dict[str, Any]]) -> str:
    rows = [with_suspect(r) for r in latest(rows)]
    poisoned = [r for r in rows if r["attack"] != "none"]
    bad = [r for r in poisoned if r["candidate"]["asr/real"] >= LEARNED_ASR]
    unlearned = [f"{r['attack']} at {r['rate']:.3f} (ASR {100 * r['candidate']['asr/real']:.1f} %)"
                 for r in poisoned if r not in bad]
    benign = [r for r in rows if r["attack"] == "none"]
    hardened = [r for r in bad if r.get("hardened")]
    blessed = [r for r in hardened if shipped(r)[2]]
    first = sum(bool(r["blessed"]) for r in hardened)
    # rows from before --data have neither field: they are the demo's
    sources = ", ".join(sorted({f"{r.get('arch', 'small_cnn')} on {r.get('data', 'synthetic')}" for r in rows}))
    attacks = ", ".join(sorted({r["attack"] for r in bad}))
    lines = [f"Candidates ({sources}): {len(bad)} backdoored ({attacks}), {len(benign)} benign; poisoned but the "
             f"backdoor not learned, left out: {', '.join(unlearned) or 'none'}. "
             f"Hardened: {len(hardened)}; the purify section passes the gate's ACC and ASR-lift checks (the real and the "
             f"reconstructed trigger's) on {first}, "
             f"the policy's fallbacks on {len(blessed) - first} more, nothing on {len(hardened) - len(blessed)}.",
             "", "| rule | TPR (backdoored) | FPR (benign) | flagged after hardening | flagged after a blessed hardening |",
             "|---|---|---|---|---|"]
    for name, flags in rules().items():
        rule = judged(flags)
        lines.append(f"| {name} | {pct([rule(r['candidate']) for r in bad])} | "
                     f"{pct([rule(r['candidate']) for r in benign])} | "
                     f"{pct([rule(shipped(r)[1]) for r in hardened])} | {pct([rule(shipped(r)[1]) for r in blessed])} |")
    header = ("candidate", "rate", "ACC", "ASR", "suspect (target 0)", "anomaly index", "norm ratio",
              "scan top (share; runner-up ratio)", "MM-BD top (p)", "universal: suspect (budget ratio)", "score",
              "shipped", "after: ACC", "ASR", "inverted ASR", "norm ratio", "MM-BD top (p); the candidate's suspect (p)",
              "universal", "score")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        c, (method, h, ok) = r["candidate"], shipped(r)
        h = h or {}
        asr = c.get("asr/real")
        after = (f"{method}{'' if ok else ' (fails)'} | {100 * h['acc']:.1f} | {100 * h['asr/real']:.1f} | {100 * h['inverted/asr']:.1f} | "
                 f"{h['inverted/norm_ratio']:.2f} | {_mmbd(h)}; {_suspect(c, h)} | {_universal(h)} | "
                 f"{score(h):.2f}") if h else "| | | | | | |"
        lines.append(f"| {r['attack']} s{r['seed']} | {r['rate']:.3f} | {100 * c['acc']:.1f} | "
                     f"{'' if asr is None else f'{100 * asr:.1f}'} | {c['inverted/target']} | "
                     f"{c['inverted/anomaly_index']:.2f} | {c['inverted/norm_ratio']:.2f} | "
                     f"{_scan(c)} | {_mmbd(c)} | {_universal(c)} | {score(c):.2f} | "
                     f"{after} |")
    return "\n".join(lines)


#: The gate's checks this benchmark judges a hardening by (with the gate's own bounds): accuracy, the ASR lift of
#: each probe (here the real trigger) and of the trigger reconstructed from the candidate.
JUDGED = ("acc", "asr_lift/", "inverted/asr_lift")


def passes(gate: GateConfig, before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Whether ``gate``'s :data:`JUDGED` checks pass, here on the test set with the real trigger (a check's
    condition reads the candidate's backdoor score as the library computes it today, not as the row stored it)."""
    checks = [c for c in gate.metrics if c.metric.startswith(JUDGED)]
    return evaluate_gate(gate.model_copy(update={"metrics": checks, "required_facts": [], "on_missing": "fail"}),
                         {**before, "scan/backdoor_score": score(before)}, after, {}).blessed


def rejudged(row: dict[str, Any], gate: GateConfig) -> dict[str, Any]:
    """``row`` with every attempt's verdict read again from its stored metrics by ``gate``: a cached row carries
    the verdict of the gate it was measured under, and the table (and a rerun's policy) must use today's."""
    if not row.get("hardened"):
        return row
    return {**row, "blessed": passes(gate, row["candidate"], row["hardened"]),
            "fallbacks": [{**a, "blessed": passes(gate, row["candidate"], a["hardened"])}
                          for a in row.get("fallbacks") or []]}


def policy_pending(row: dict[str, Any], fallbacks: list[dict[str, Any]]) -> bool:
    """Whether the policy's ``fallbacks`` still have to run on ``row``: its first attempt fails, none of the
    recorded fallbacks passes, and they are not this policy's (another one's, or cut short by an attempt that
    passed under an earlier gate)."""
    tried = row.get("fallbacks") or []
    return (row["blessed"] is False and not any(a["blessed"] for a in tried)
            and (row.get("policy") != fallbacks or len(tried) < len(fallbacks)))


def harden(method: PurifyParams, model: Normalized, clean: ImageData, test: ImageData, params: Params,
           probe: Probe | None, inv: InvertedTrigger, before: dict[str, Any],
           device: str = "cpu") -> tuple[dict[str, Any], bool]:
    """``method`` (a ``purify``-section entry) run on the clean set, the result scanned on ``device``; and whether
    it passes."""
    torch.manual_seed(0)
    result = run_defense(method.method, model, clean.dataset(), method.config(0, device, progress=False))
    after, _ = scan_model(result.model.to(device), test, params.probes, seed=0, probe=probe, trigger=inv)
    return after, passes(params.gate, before, after)


def shipped(row: dict[str, Any]) -> tuple[str, dict[str, Any] | None, bool]:
    """What the policy ships for a row: the first attempt that passes, else the ``purify`` section's (rejected)."""
    first = (row.get("method", "nft"), row.get("hardened"), bool(row.get("blessed")))
    if first[2]:
        return first
    for attempt in row.get("fallbacks") or []:
        if attempt["blessed"]:
            return attempt["method"], attempt["hardened"], True
    return first


def load_splits(spec: str, n_train: int | None, n_test: int | None) -> tuple[ImageData, ImageData]:
    """Training and test images: the demo's synthetic shapes, or both splits of a dataset spec (stratified subsets
    when ``n_train``/``n_test`` are given)."""
    if spec == "synthetic":
        return make_synthetic(n_train or 5000, seed=0), make_synthetic(n_test or 2000, seed=0, train=False)
    splits = []
    for data, n in ((load_dataset(spec, train=True), n_train), (load_dataset(spec, train=False), n_test)):
        splits.append(stratified_split(data, fraction=n / len(data), seed=0)[0] if n and n < len(data) else data)
    return splits[0], splits[1]


def load_settings(path: Path, override: Path | None) -> Params:
    """``path`` (a ``params.yaml``) with every section of ``override`` in place of its own, validated as one."""
    if override is None:
        return load_params(path)
    sections = [load_yaml(p.read_text(), str(p)) for p in (path, override)]
    return parse_params({**sections[0], **sections[1]}, f"{path} with {override}'s sections")


def unflipped(method: PurifyParams) -> PurifyParams:
    """``method`` without horizontal flips (its ``flip`` field off, where it has one)."""
    return method.model_copy(update={"flip": False}) if "flip" in type(method).model_fields else method


def data_label(spec: str) -> str:
    """``spec`` without local paths: ``synthetic``, ``torchvision:GTSRB``, ``npz``, ``imagefolder``."""
    parts = spec.split(":")
    return ":".join(parts[:2] if parts[0] == "torchvision" else parts[:1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--benign-seeds", default="0,1,2,3,4")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--override", type=Path, default=None,
                        help="a YAML file whose sections replace --params's (benchmarks/params-gtsrb.yaml: road signs)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="candidates' training epochs (default: params.yaml's candidate.demo.epochs, the demo's)")
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' (the demo's shapes) or a dataset spec with both splits, e.g. torchvision:GTSRB:ROOT")
    parser.add_argument("--npz", nargs=2, metavar=("TRAIN", "TEST"),
                        help="both splits from two npz files instead of --data (benchmarks/gtsrb.py --pack makes them)")
    parser.add_argument("--data-name", default=None,
                        help="what the rows call the data (default: --data without local paths, or 'npz')")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="small_cnn")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                        help="mirror training images (--no-flip for road signs, which are not mirror-symmetric)")
    parser.add_argument("--levels", default="0,1",
                        help="poisoning rates: 0 the lower (5 %%; clean-label 40 %% of the target class), 1 the higher")
    parser.add_argument("--n-train", type=int, default=None, help="training images (synthetic: 5,000; else all)")
    parser.add_argument("--n-test", type=int, default=None,
                        help="test images, a stratified subset (synthetic: 2,000; else all)")
    parser.add_argument("--clean-fraction", type=float, default=None,
                        help="the defender's share of the training images (default: params.yaml's data.clean_fraction)")
    parser.add_argument("--no-harden", action="store_true", help="scan the candidates only")
    parser.add_argument("--device", default="cpu", help="train, purify and scan here (cpu, cuda)")
    parser.add_argument("--cache", type=Path, default=REPO / "runs/bench/detector")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = args.cache / "rows.jsonl"
    params = load_settings(args.params, args.override)
    done = {row["key"]: rejudged(row, params.gate)
            for row in map(json.loads, results.read_text().splitlines())} if results.exists() else {}
    if not args.table_only:
        epochs = args.epochs or params.candidate.demo.epochs
        if args.npz:
            train, test = (load_dataset(f"npz:{path}") for path in args.npz)
        else:
            train, test = load_splits(args.data, args.n_train, args.n_test)
        data_name = args.data_name or ("npz" if args.npz else data_label(args.data))
        source = Source(train, args.arch, args.flip)
        clean = stratified_split(train, fraction=args.clean_fraction or params.data.clean_fraction, seed=1)[0]
        if not args.flip:  # the purifiers must not mirror what the candidates never saw mirrored either
            params = params.model_copy(update={
                "purify": unflipped(params.purify),
                "policy": params.policy.model_copy(update={"fallbacks": [unflipped(f) for f in params.policy.fallbacks]})})
        plan = [(a, int(lvl), 0) for a in args.attacks.split(",") if a for lvl in args.levels.split(",")]
        plan += [("none", 0, int(s)) for s in args.benign_seeds.split(",") if s]
        settings = {"probes": params.probes.model_dump(mode="json"), "purify": params.purify.model_dump(mode="json"),
                    "harden": not args.no_harden, "clean": len(clean), "v": 2}
        fallbacks = [f.model_dump(mode="json") for f in params.policy.fallbacks]
        for attack_name, level, seed in plan:
            model, info = candidate(source, attack_name, level, seed, epochs, args.cache / "candidates", args.device)
            key = digest({"candidate": info["key"], "settings": settings})
            probe = None if attack_name == "none" else Probe(name="real", attack=attack_name, target=TARGET)
            row = done.get(key)
            if row is None:
                before, inv = scan_model(model, test, params.probes, seed=0, probe=probe)
                row = {"key": key, "date": str(date.today()), "attack": attack_name, "rate": info["rate"],
                       "seed": seed, "epochs": epochs, "data": data_name, "device": args.device,
                       "arch": args.arch, "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "method": params.purify.method, "candidate": before, "hardened": None, "blessed": None}
                if attack_name != "none" and not args.no_harden and before["asr/real"] >= LEARNED_ASR:
                    row["hardened"], row["blessed"] = harden(params.purify, model, clean, test, params, probe, inv,
                                                             before, args.device)
            elif policy_pending(row, fallbacks) and not args.no_harden:
                inv = invert_trigger(model, test, seed=0, **params.probes.inversion.model_dump(exclude={"enabled"}))
                before = row["candidate"]
            else:
                continue
            if policy_pending(row, fallbacks):  # the step's policy: its fallbacks in turn
                row["policy"], row["fallbacks"] = fallbacks, []
                for method in params.policy.fallbacks:
                    after, passed = harden(method, model, clean, test, params, probe, inv, before, args.device)
                    row["fallbacks"].append({"method": method.method, "hardened": after, "blessed": passed})
                    if passed:
                        break
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done[key] = row
            before, (method_name, h, _) = row["candidate"], shipped(row)
            print(f"{attack_name} rate {info['rate']:.3f} seed {seed}: ACC {100 * before['acc']:.1f} "
                  f"index {before['inverted/anomaly_index']:.2f} ratio {before['inverted/norm_ratio']:.2f} "
                  f"suspect {before['inverted/target']} MM-BD {_mmbd(before)} scan {before['scan/top_label']}/{before['scan/top_share']:.2f} "
                  f"universal {_universal(before)}"
                  + (f" | after ({method_name}) ACC {100 * h['acc']:.1f} ASR {100 * h['asr/real']:.1f} inverted ASR "
                     f"{100 * h['inverted/asr']:.1f} index {h['inverted/anomaly_index']:.2f}" if h else ""), flush=True)
    print(render(list(done.values())))


if __name__ == "__main__":
    main()
