"""The reviewer's report and the machine-readable evidence of one hardening run.

:func:`write_report` writes into one folder:

- ``report.html``: self-contained (plots embedded as base64 PNG), for MLflow artifacts and KFP ``HTML``;
- ``report.md``: the same content, plots referenced as ``plots/*.png`` next to it (KFP ``Markdown``);
- ``metrics.json``: before/after/delta of every numeric metric, the verdict and the purification summary
  (DVC ``metrics``);
- ``plots/*.png`` and DVC plot data: ``plots/training.csv`` (per epoch), ``plots/masks.csv`` (per layer),
  ``plots/before_after.json`` (rows ``{metric, model, bar, value}``: one bar per metric and model, ``bar``
  naming both, for DVC's ``bar_horizontal`` template with ``x: value, y: bar``).

:func:`headline_metrics` is the small, flat, numeric summary that ``dvc.yaml``'s report stage writes to the
repository's ``metrics.json`` (``nft-harden report --headline``) for ``dvc exp show`` and ``dvc metrics diff``.

Templates live in ``harden/templates`` (Jinja2, autoescaped HTML).
"""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from harden import plots
from harden.evaluate import (BUDGET_RATIO_FACTOR, NORM_RATIO_FACTOR, RUNNER_UP_FLAG, SCAN_SHARE_FLAG,
                             STAMP_NAMES_RATIO, LayerMasks, compare, flatten, mask_statistics)
from harden.gate import Blessing
from harden.integrity import write_bytes_atomic, write_json_atomic
from harden.records import Attempt

#: Plot key -> (file name, caption).
PLOTS: dict[str, tuple[str, str]] = {
    "before_after": ("before_after.png", "ACC, ASR and robust accuracy per probe, candidate vs hardened"),
    "training": ("training.png", "Purification: loss (and, for NFT, mask statistics) per epoch"),
    "mask_heatmap": ("mask_heatmap.png", "Mask values per layer and neuron (cf. NFT supplementary Fig. 1-2)"),
    "mask_histogram": ("mask_histogram.png", "Distribution of the learned mask values"),
    "triggers": ("triggers.png", "Reconstructed trigger of each model's suspected target (Neural Cleanse)"),
    "inversion_norms": ("inversion_norms.png", "Reconstructed trigger size per class: a class at or below median / "
                        f"{NORM_RATIO_FACTOR:g} flags the model (backdoor score >= 1)"),
    "scan_labels": ("scan_labels.png", "Where the scan's untargeted adversarial examples land, per class (PBE): a "
                    f"backdoored model sends most of them to its target; a top share at the dotted line "
                    f"({SCAN_SHARE_FLAG:g}), or at a model's dashed line ({RUNNER_UP_FLAG:g}x its runner-up's "
                    "share), flags the model (backdoor score >= 1)"),
    "max_margins": ("max_margins.png", "Largest reachable margin per class (MM-BD, no images needed): one class far "
                    "above the others flags the model when the stamp, the scan or the universal perturbation names "
                    "the same class; the legend gives the p-value of the candidate's suspect in each model, which "
                    "the backdoor score uses"),
    "universal_budgets": ("universal_budgets.png", "Smallest universal perturbation per class: the faintest change, "
                          "the same for every image, that sends most of the other classes' images to the class "
                          "(probes.universal.success_threshold of them); a class at or below median / "
                          f"{BUDGET_RATIO_FACTOR:g} flags the model (backdoor score >= 1)"),
}


def caption(key: str, before: Mapping[str, Any]) -> str:
    """The caption of plot ``key``; the reconstructed triggers' says so when the candidate's stamp names no class.

    A stamp larger than ``STAMP_NAMES_RATIO`` times the median class's singles out nothing: it is then most
    likely an ordinary adversarial patch, which the candidate and every model fine-tuned from it keep obeying
    (measured on GTSRB: BENCHMARKS.md, *The step end to end on a real candidate*), so a reviewer should not read
    its ASR on the hardened model as the backdoor's.
    """
    text = PLOTS[key][1]
    ratio = before.get("inverted/norm_ratio")
    if key == "triggers" and isinstance(ratio, (int, float)) and ratio > STAMP_NAMES_RATIO:
        text += (f". The candidate's smallest stamp is {ratio:.2f}x the median class's in size, above the "
                 f"{STAMP_NAMES_RATIO:g} at or below which it names a class: it may be an ordinary adversarial "
                 "patch, which models fine-tuned from the candidate keep obeying, so its ASR on the hardened model "
                 "(inverted/asr) does not by itself tell a purified model from an unpurified one")
    return text


@dataclass(frozen=True)
class TriggerView:
    """One model's trigger reconstruction as the report shows it: the suspect's mask (1HW) and pattern (CHW),
    its label and anomaly index, and every class's mask norm."""

    mask: np.ndarray
    pattern: np.ndarray
    target: int
    anomaly_index: float
    norms: Sequence[float]


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by :func:`write_report`."""

    html: Path
    markdown: Path
    metrics: Path
    plots: dict[str, Path]
    plot_data: dict[str, Path]
    headline: Path | None = None


def _sign(value: float | None) -> str:
    return "—" if value is None else f"{value:+.4f}"


def _num(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3e}"
    return str(value)


def _md(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("harden", "templates"),
                             autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",)),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=_num, sign=_sign, md=_md)
    return env


def _table_rows(comparison: Mapping[str, Mapping[str, float | None]]) -> list[dict[str, Any]]:
    """Headline rows: ACC, worst-class ACC, then per probe ASR, its lift over the clean rate, the clean rate and
    robust accuracy, then the trigger-free evidence (reconstructed trigger, scan, backdoor score)."""
    probes = sorted(k.split("/", 1)[1] for k in comparison if k.startswith("asr/"))
    keys = ["acc", "min_class_acc"] + [f"{m}/{p}" for p in probes for m in ("asr", "asr_lift", "clean_rate", "robust_acc")]
    keys += ["inverted/asr", "inverted/asr_lift", "inverted/anomaly_index", "inverted/norm_ratio", "inverted/target",
             "scan/top_share", "scan/top_label", "scan/flip_rate", "scan/runner_up_ratio", "margin/pvalue",
             "margin/ratio", "margin/target",
             "margin/suspect_pvalue", "universal/budget_ratio", "universal/budget", "universal/target",
             "scan/backdoor_score"]
    return [{"metric": k, **comparison[k]} for k in keys if k in comparison]


def metrics_document(before: Mapping[str, Any], after: Mapping[str, Any], blessing: Blessing | None = None,
                     purification: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The content of ``metrics.json``: ``before``/``after``/``delta`` maps of numeric metrics, ``blessed``
    (when a blessing is given) and ``purification`` (wall time, mask statistics, ...)."""
    comparison = compare(before, after)
    doc: dict[str, Any] = {side: {k: v[side] for k, v in comparison.items() if v[side] is not None}
                           for side in ("before", "after", "delta")}
    if blessing is not None:
        doc["blessed"] = blessing.blessed
    if purification is not None:
        doc["purification"] = dict(purification)
    return doc


#: Headline metrics besides ``asr/<probe>``: each is written for the hardened model as KEY and for the candidate
#: as ``candidate/KEY`` when the evaluation has it.
HEADLINE_KEYS = ("acc", "inverted/asr", "scan/backdoor_score")


def headline_metrics(before: Mapping[str, Any], after: Mapping[str, Any], *, blessed: bool,
                     purify_s: float) -> dict[str, float | int]:
    """The headline of one hardening run, flat and numeric only (what DVC compares across experiments).

    The hardened model's ``acc``, ``asr/<probe>`` for every probe, ``inverted/asr`` and ``scan/backdoor_score``
    (those the evaluation has), ``blessed`` (1 or 0), ``purify_s`` (purification wall time in seconds, as the
    caller counts it: the report stage adds up every policy attempt), then the candidate's values of the same
    metrics as ``candidate/<metric>``."""
    b, a = flatten(before), flatten(after)
    probes = sorted({k for k in (*b, *a) if k.startswith("asr/")})
    keys = [HEADLINE_KEYS[0], *probes, *HEADLINE_KEYS[1:]]
    doc: dict[str, float | int] = {k: a[k] for k in keys if k in a}
    doc["blessed"] = int(blessed)
    doc["purify_s"] = round(float(purify_s), 2)
    doc.update({f"candidate/{k}": b[k] for k in keys if k in b})
    return doc


def write_headline(path: str | Path, headline: Mapping[str, float | int]) -> Path:
    """Write :func:`headline_metrics` as JSON to ``path`` atomically, in its order (hardened first)."""
    return write_bytes_atomic(path, (json.dumps(dict(headline), indent=2) + "\n").encode())


def _before_after_keys(comparison: Mapping[str, Any]) -> list[str]:
    """The rates DVC's before/after plot shows on one axis: ACC, ASR and robust accuracy per probe, and the ASR
    of the candidate's reconstructed trigger."""
    return [k for k in comparison if k in ("acc", "inverted/asr") or k.startswith(("asr/", "robust_acc/"))]


def _csv_bytes(rows: Sequence[Mapping[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def write_plot_data(plot_dir: Path, comparison: Mapping[str, Mapping[str, float | None]],
                    history: Sequence[Mapping[str, float]] | None, mask_layers: Sequence[Mapping[str, Any]] | None) -> dict[str, Path]:
    """DVC plot data: per-epoch training rows, per-layer mask rows and before/after rows (a candidate and a
    hardened row per rate, side by side under DVC's ``bar_horizontal`` template: ``bar`` is ``metric (model)``)."""
    rows = [{"metric": key, "model": model, "bar": f"{key} ({model})", "value": comparison[key][side]}
            for key in _before_after_keys(comparison) for side, model in (("before", "candidate"), ("after", "hardened"))
            if comparison[key][side] is not None]
    written = {"before_after": write_json_atomic(plot_dir / "before_after.json", rows)}
    if history:
        written["training"] = write_bytes_atomic(plot_dir / "training.csv", _csv_bytes(history))
    if mask_layers:
        written["masks"] = write_bytes_atomic(plot_dir / "masks.csv", _csv_bytes(mask_layers))
    return written


def _figures(comparison: Mapping[str, Mapping[str, float | None]], history: Sequence[Mapping[str, float]] | None,
             masks: Sequence[LayerMasks] | None, inversion: Mapping[str, TriggerView] | None,
             margins: Mapping[str, tuple[Sequence[float], float]], suspect: int | None,
             scans: Mapping[str, Sequence[float]], budgets: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    figures = {"before_after": plots.before_after_bars(comparison)}
    if scans:
        figures["scan_labels"] = plots.scan_labels(scans, SCAN_SHARE_FLAG, RUNNER_UP_FLAG)
    if margins and suspect is not None:
        figures["max_margins"] = plots.max_margins(margins, suspect)
    if budgets:
        figures["universal_budgets"] = plots.universal_budgets(budgets, BUDGET_RATIO_FACTOR)
    if inversion:
        figures["triggers"] = plots.reconstructed_triggers(
            {model: (v.mask, v.pattern, v.target, v.anomaly_index) for model, v in inversion.items()})
        figures["inversion_norms"] = plots.inversion_norms({model: v.norms for model, v in inversion.items()},
                                                           NORM_RATIO_FACTOR)
    if history:
        figures["training"] = plots.training_curve(history)
    if masks:
        figures["mask_heatmap"] = plots.mask_heatmap(masks)
        figures["mask_histogram"] = plots.mask_histogram(masks)
    return figures


def _identity_rows(identity: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in identity.items():
        if isinstance(value, Mapping):
            rows += _identity_rows(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", _num(value)))
    return rows


def _attempt_rows(attempts: Sequence[Attempt], candidate: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per attempt, after the candidate's on the same held-out images (``candidate``, when recorded)."""
    def judged(metrics: Mapping[str, float]) -> dict[str, Any]:
        lifts = [v for k, v in metrics.items() if k.startswith("asr_lift/")]
        return {"acc": metrics.get("acc"), "lift": max(lifts) if lifts else None,
                "score": metrics.get("scan/backdoor_score")}

    rows = [] if candidate is None else [
        {"n": "", "defense": "candidate", "chosen": False, "time": None, **judged(candidate), "verdict": "baseline",
         "css": "", "why": "what each attempt is judged against; a check with a condition (when) reads it"}]
    for n, a in enumerate(attempts, 1):
        rows.append({"n": n, "defense": a.defense, "chosen": a.chosen, "time": a.wall_time_s, **judged(a.holdout),
                     "verdict": a.verdict, "css": "pass" if a.passed else "fail",
                     "why": a.skipped or " ".join(a.failed) or "every judged check passed"})
    return rows


def write_report(out_dir: str | Path, *, identity: Mapping[str, Any], before: Mapping[str, Any],
                 after: Mapping[str, Any], blessing: Blessing, masks: Sequence[LayerMasks] | None = None,
                 history: Sequence[Mapping[str, float]] | None = None,
                 purification: Mapping[str, Any] | None = None, attempts: Sequence[Attempt] = (),
                 holdout: int | None = None, holdout_candidate: Mapping[str, float] | None = None,
                 margin: float | None = None,
                 inversion: Mapping[str, TriggerView] | None = None,
                 title: str = "Backdoor hardening report") -> ReportFiles:
    """Write the HTML and Markdown reports, ``metrics.json``, the plots and their DVC data into ``out_dir``.

    Args:
        out_dir: folder to write to (created; files in it are replaced atomically one by one).
        identity: model identity and lineage (name, versions, hashes, ...), shown as given; nested dicts are
            flattened to ``a.b`` keys.
        before: metrics of the candidate (:func:`harden.evaluate.evaluate_torch`).
        after: metrics of the hardened model (:func:`harden.evaluate.evaluate_onnx`).
        blessing: the gate's verdict.
        masks: learned masks by layer (:func:`harden.evaluate.layer_masks`), for the heatmap and histogram.
        history: ``PurifyResult.history`` for the training curve.
        purification: summary of the purification (:func:`harden.evaluate.purification_summary`); mask
            statistics are computed from ``masks`` when it has none.
        attempts: the hardening policy's attempts (``PurifyRecord.attempts``), listed when more than one was
            planned; ``holdout``: how many clean images judged them; ``holdout_candidate``: the candidate's
            metrics on those images (``PurifyRecord.holdout_candidate``), listed first; ``margin``: how much to
            spare each held-out check asked for (``policy.margin``).
        inversion: each model's trigger reconstruction ({"candidate": ..., "hardened": ...}), plotted.
        title: report heading.
    """
    out = Path(out_dir)
    comparison = compare(before, after)
    purification = dict(purification or {})
    if masks and "masks" not in purification:
        purification["masks"] = mask_statistics(masks)
    mask_layers = purification.get("masks", {}).get("layers")

    metrics_path = write_json_atomic(out / "metrics.json", metrics_document(before, after, blessing, purification))
    plot_data = write_plot_data(out / "plots", comparison, history, mask_layers)
    images, plot_paths = [], {}
    margins = {model: (m["margin/values"], m.get("margin/suspect_pvalue", m["margin/pvalue"]))
               for model, m in (("candidate", before), ("hardened", after)) if "margin/values" in m}
    suspect = before.get("margin/target")
    scans = {model: m["scan/label_shares"] for model, m in (("candidate", before), ("hardened", after))
             if "scan/label_shares" in m}
    budgets = {model: m["universal/budgets"] for model, m in (("candidate", before), ("hardened", after))
               if "universal/budgets" in m}
    for key, fig in _figures(comparison, history, masks, inversion, margins, suspect, scans, budgets).items():
        file_name = PLOTS[key][0]
        plot_paths[key] = plots.save_png(fig, out / "plots" / file_name)
        images.append({"key": key, "caption": caption(key, before), "file": f"plots/{file_name}",
                       "data": base64.b64encode(plot_paths[key].read_bytes()).decode("ascii")})

    per_class = [{"metric": k.split("/", 1)[1], **v} for k, v in comparison.items() if k.startswith("per_class_acc/")]
    context = {
        "title": title, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "blessing": blessing, "identity": _identity_rows(identity), "rows": _table_rows(comparison),
        "per_class": per_class, "mask_layers": mask_layers or [],
        "purification": [(k, _num(v)) for k, v in purification.items() if k != "masks"],
        "images": images, "attempts": _attempt_rows(attempts, holdout_candidate) if len(attempts) > 1 or holdout else [],
        "holdout": holdout, "margin": margin,
    }
    env = _environment()
    html = write_bytes_atomic(out / "report.html", env.get_template("report.html.j2").render(context).encode())
    markdown = write_bytes_atomic(out / "report.md", env.get_template("report.md.j2").render(context).encode())
    return ReportFiles(html=html, markdown=markdown, metrics=metrics_path, plots=plot_paths, plot_data=plot_data)

