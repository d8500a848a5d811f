"""Figures of the hardening report, drawn on :class:`matplotlib.figure.Figure` objects (no pyplot state, no
backend switch at import): PNG output goes through the Agg canvas.

- :func:`mask_histogram`: distribution of the learned mask values, one colour per depth tercile.
- :func:`mask_heatmap`: layers x neurons mask values, as in the NFT supplementary's Fig. 1-2.
- :func:`before_after_bars`: ACC, ASR and robust accuracy per probe, candidate vs hardened.
- :func:`training_curve`: loss and mask statistics per epoch of the purification.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from harden.evaluate import LayerMasks
from harden.integrity import atomic_file

BEFORE_COLOR, AFTER_COLOR = "#c44e52", "#4c72b0"


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(np.atleast_1d(fig.subplots(1, ncols)))


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically and return the path."""
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def mask_histogram(layers: Sequence[LayerMasks]) -> Figure:
    """Histogram of mask values, stacked by depth (first, middle, last third of the masked layers)."""
    fig, (ax,) = _figure(6.4, 3.6)
    thirds = np.array_split(np.arange(len(layers)), min(3, len(layers)))
    groups, labels = [], []
    for part in thirds:
        lo, hi = layers[part[0]].index, layers[part[-1]].index
        groups.append(np.concatenate([layers[i].values for i in part]))
        labels.append(f"layers {lo}-{hi}" if lo != hi else f"layer {lo}")
    lowest = min(layer.lower_bound for layer in layers)
    ax.hist(groups, bins=np.linspace(min(lowest, min(g.min() for g in groups)), 1.0, 41), stacked=True,
            label=labels, color=["#8172b2", "#55a868", "#dd8452"][:len(groups)])
    ax.set(xlabel="mask value m", ylabel="neurons", title="Learned mask values (1 = unchanged neuron)")
    ax.legend(frameon=False)
    return fig


def mask_heatmap(layers: Sequence[LayerMasks]) -> Figure:
    """Mask values as a layers x neurons image (neurons beyond a layer's width left blank)."""
    width = max(layer.values.size for layer in layers)
    grid = np.full((len(layers), width), np.nan)
    for row, layer in enumerate(layers):
        grid[row, :layer.values.size] = layer.values
    fig, (ax,) = _figure(8.0, 1.2 + 0.32 * len(layers))
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest",
                      cmap=colormaps["viridis"].with_extremes(bad="#eeeeee"), vmin=0.0, vmax=1.0)
    ax.set_yticks(range(len(layers)), [f"l={layer.index} {layer.name}" for layer in layers], fontsize=7)
    ax.set(xlabel="neuron (channel) index", title="Mask heatmap per layer (yellow = kept, dark = suppressed)")
    fig.colorbar(image, ax=ax, label="mask value", fraction=0.04, pad=0.01)
    return fig


def before_after_bars(comparison: Mapping[str, Mapping[str, float | None]]) -> Figure:
    """Grouped bars of ACC, ASR/* and robust_acc/* before (candidate) and after (hardened)."""
    keys = [k for k in comparison if k == "acc" or k.startswith(("asr/", "robust_acc/"))]
    fig, (ax,) = _figure(max(4.0, 1.1 * len(keys) + 1.5), 3.6)
    pos = np.arange(len(keys))
    for offset, side, color, label in ((-0.2, "before", BEFORE_COLOR, "candidate"), (0.2, "after", AFTER_COLOR, "hardened")):
        values = [comparison[k][side] for k in keys]
        bars = ax.bar(pos + offset, [np.nan if v is None else v for v in values], 0.4, color=color, label=label)
        ax.bar_label(bars, labels=["" if v is None else f"{v:.2f}" for v in values], fontsize=7, padding=1)
    ax.set_xticks(pos, keys, rotation=20, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.25), yticks=np.linspace(0, 1, 6), ylabel="rate", title="Candidate vs hardened")
    ax.legend(frameon=False, ncols=2, loc="upper center", fontsize=8)
    return fig


def training_curve(history: Sequence[Mapping[str, float]]) -> Figure:
    """Purification loss terms per epoch (left) and, for NFT, the mask statistics (right). Each defense logs its
    own keys (fine-tuning baselines: ``loss`` only); a panel shows the keys every epoch has. A defense that runs
    in phases restarts its epoch count in each (PBE: adversarial, then clean fine-tuning): the phases are drawn
    one after another, a dotted line where each begins."""
    def present(keys: tuple[str, ...]) -> list[str]:
        return [k for k in keys if all(k in row for row in history)]

    loss_keys, mask_keys = present(("loss", "ce")), present(("mask_mean", "mask_min", "frac_at_lower_bound"))
    fig, axes = _figure(9.0 if mask_keys else 5.0, 3.4, ncols=2 if mask_keys else 1)
    epochs: list[float] = []
    phases: list[float] = []  # where each phase after the first begins
    for i, row in enumerate(history):
        if i and row["epoch"] <= history[i - 1]["epoch"]:
            phases.append(epochs[-1] + 0.5)
        epochs.append(row["epoch"] + (phases[-1] - 0.5 if phases else 0.0))
    for key in loss_keys:
        axes[0].plot(epochs, [row[key] for row in history], marker=".", label=key)
    for start in phases:
        axes[0].axvline(start, color="0.6", lw=0.8, ls=":")
    axes[0].set(xlabel="epoch (phases one after another)" if phases else "epoch", ylabel="loss",
                title="Purification objective")
    if mask_keys:
        for key in mask_keys:
            axes[1].plot(epochs, [row[key] for row in history], marker=".", label=key)
        axes[1].set(xlabel="epoch", ylim=(-0.02, 1.02), title="Masks")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(frameon=False, fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def reconstructed_triggers(triggers: Mapping[str, tuple[np.ndarray, np.ndarray, int, float]]) -> Figure:
    """Each model's reconstructed trigger for its suspected target: the mask (white = stamped pixel) and the
    trigger stamped on a mid-grey image. ``triggers``: {model: (mask 1HW, pattern CHW, suspected label, anomaly
    index)}."""
    fig = Figure(figsize=(4.2, 2.1 * len(triggers)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(len(triggers), 2))
    for row, (model, (mask, pattern, label, index)) in zip(axes, triggers.items()):
        stamped = ((1 - mask) * 0.5 + mask * pattern).transpose(1, 2, 0)
        row[0].imshow(mask[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        row[0].set_title(f"{model}: mask of class {label}\nL1 {mask.sum():.1f}, anomaly index {index:.2f}", fontsize=8)
        row[1].imshow(stamped if stamped.shape[-1] == 3 else stamped[..., 0], cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
        row[1].set_title("stamped on grey", fontsize=8)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    return fig


#: A horizontal line on a per-class chart: (y, line style, legend label).
HLine = tuple[float, str, str]


def _per_class_bars(series: Mapping[str, Sequence[float]], labels: Mapping[str, str], ylabel: str, title: str,
                    lines: Callable[[str, Sequence[float]], list[HLine]]) -> Figure:
    """One bar per class for each model side by side, in the model's colour, with ``lines(model, values)``."""
    classes = len(next(iter(series.values())))
    fig, (ax,) = _figure(max(7.0, 0.18 * classes * len(series) + 4.0), 3.4)
    pos = np.arange(classes)
    width = 0.8 / len(series)
    for i, ((model, values), color) in enumerate(zip(series.items(), (BEFORE_COLOR, AFTER_COLOR))):
        ax.bar(pos - 0.4 + width * (i + 0.5), values, width, color=color, label=labels[model])
        for y, style, label in lines(model, values):
            ax.axhline(y, color=color, lw=0.8, ls=style, label=label)
    ax.set(xlabel="class", ylabel=ylabel, title=title)
    if classes <= 20:
        ax.set_xticks(pos)
    ax.legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def max_margins(margins: Mapping[str, tuple[Sequence[float], float]], suspect: int) -> Figure:
    """Per-class largest reachable margin (MM-BD) for each model, with each model's median; the legend gives,
    per model, the p-value of the candidate's suspect ``suspect`` (what the backdoor score uses)."""
    def shown(p: float) -> str:
        return f"p = {p:.1e}" if p >= 1e-12 else "p < 1e-12"  # a gamma tail underflows to 0

    return _per_class_bars({model: values for model, (values, _) in margins.items()},
                           {model: f"{model} (class {suspect}: {shown(p)})" for model, (_, p) in margins.items()},
                           "largest margin (logits)", "Largest reachable margin per class",
                           lambda model, values: [(float(np.median(values)), "--", f"{model}: median")])


def scan_labels(shares: Mapping[str, Sequence[float]], flag: float, runner_up: float) -> Figure:
    """Per-class share of the scan's successful adversarial flips for each model, with the share at which the
    top class flags the model (``flag``: a backdoor target draws most of them) and, per model, ``runner_up``
    times its second-largest share (a top class above it flags the model too)."""
    first = next(iter(shares))  # one threshold line, drawn with the first model's bars

    def lines(model: str, values: Sequence[float]) -> list[HLine]:
        second = sorted(values)[-2] if len(values) >= 2 else 0.0
        own = [(runner_up * second, "--", f"{model}: {runner_up:g}x the runner-up")] if second > 0 else []
        return ([(flag, ":", f"flags at {flag:g}")] if model == first else []) + own

    return _per_class_bars(shares, {model: model for model in shares}, "share of adversarial flips",
                           "Where the scan's adversarial examples land", lines)


def _median_lines(ratio_factor: float) -> Callable[[str, Sequence[float]], list[HLine]]:
    """Lines at a model's median and at median / ``ratio_factor``: the size a class must fall below to flag the
    model, for the statistics that compare a class with the median class (:mod:`nft_core.invert`,
    :mod:`nft_core.perturb`; both take the lower median, as ``torch.median`` does)."""
    def lines(model: str, values: Sequence[float]) -> list[HLine]:
        median = float(torch.tensor(values).median())
        return [(median, "--", f"{model}: median"), (median / ratio_factor, ":", f"{model}: median / {ratio_factor:g}")]

    return lines


def inversion_norms(norms: Mapping[str, Sequence[float]], ratio_factor: float) -> Figure:
    """Per-class L1 norm of the reconstructed masks for each model, with each model's median and the norm a
    class must fall below to flag the model (median / ``ratio_factor``: a backdoor target needs a small mask)."""
    return _per_class_bars(norms, {model: model for model in norms}, "mask L1 norm (pixels)",
                           "Reconstructed trigger size per class", _median_lines(ratio_factor))


def universal_budgets(budgets: Mapping[str, Sequence[float]], ratio_factor: float) -> Figure:
    """Per-class L-inf budget of the smallest universal perturbation for each model (in 1/255 steps), with each
    model's median and the budget a class must fall below to flag the model (median / ``ratio_factor``: a
    trigger added to the whole image makes its target reachable by a far fainter perturbation)."""
    return _per_class_bars({model: [255 * b for b in values] for model, values in budgets.items()},
                           {model: model for model in budgets}, "L-inf budget (x 1/255)",
                           "Smallest universal perturbation per class", _median_lines(ratio_factor))
