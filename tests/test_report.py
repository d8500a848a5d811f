"""The report renders from a real (short) purification: HTML parses, plots are real PNGs, Markdown has the tables,
and the DVC metrics/plot files hold the same numbers."""

import base64
import csv
import json
from html.parser import HTMLParser

import pytest
import torch

from harden.evaluate import (Probe, evaluate_torch, invert_trigger, layer_masks, margin_metrics,
                             purification_summary, scan_metrics, suspect_margin_pvalue, universal_metrics)
from harden.gate import evaluate_gate
from harden.report import TriggerView, write_report
from nft_core.config import NFTConfig
from nft_core.data import make_synthetic
from nft_core.fold import fold_masks
from nft_core.masks import mask_state
from nft_core.models import Normalized, build_model
from nft_core.purify import purify

PNG = b"\x89PNG\r\n\x1a\n"


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables, self.text = [], 0, []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self.tables += tag == "table"

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real short run: random small CNN, 3 NFT epochs, evaluation, gate, report."""
    torch.manual_seed(0)
    clean = make_synthetic(50, seed=0, num_classes=5, image_size=16)
    test = make_synthetic(60, seed=0, train=False, num_classes=5, image_size=16)
    candidate = Normalized(build_model("small_cnn", num_classes=5, width=4), [0.5] * 3, [0.25] * 3)
    result = purify(candidate, clean.dataset(), NFTConfig(epochs=3, batch_size=16, lr=0.5, lr_min=0.0, progress=False))
    masks = layer_masks(mask_state(result.model), result.layers, result.lower_bounds)
    summary = purification_summary(result)
    hardened = fold_masks(result.model)
    probes = [Probe(attack="badnets", target=1), Probe(attack="blend", target=2)]
    before, after = evaluate_torch(candidate, test, probes), evaluate_torch(hardened, test, probes)
    before.update(margin_metrics(candidate, test, starts=1, steps=3))
    after.update(margin_metrics(hardened, test, starts=1, steps=3))
    before.update(scan_metrics(candidate, test, steps=2))
    after.update(scan_metrics(hardened, test, steps=2))
    before.update(universal_metrics(candidate, test, samples=20, steps=5, batch_size=4))
    after.update(universal_metrics(hardened, test, samples=20, steps=5, batch_size=4))
    for metrics in (before, after):
        metrics["margin/suspect_pvalue"] = suspect_margin_pvalue(before, metrics)
    blessing = evaluate_gate({"metrics": [{"metric": "acc", "max_drop": 0.02}, {"metric": "asr/*", "max": 0.05}]},
                             before, after, {"onnx_parity": True, "fold_check": True})
    identity = {"name": "demo-candidate", "version": 3, "lineage": {"source": "models:/demo@candidate", "sha256": "ab|cd"}}
    triggers = {side: invert_trigger(model, test, samples=20, steps=3, batch_size=4)
                for side, model in (("candidate", candidate), ("hardened", hardened))}
    before.update(triggers["candidate"].metrics())
    after.update(triggers["hardened"].metrics())
    views = {side: TriggerView(*(a.numpy() for a in t.inversion.trigger()), t.target, t.inversion.anomaly_index,
                               t.inversion.norms) for side, t in triggers.items()}
    files = write_report(tmp_path_factory.mktemp("report"), identity=identity, before=before, after=after,
                         blessing=blessing, masks=masks, history=result.history, purification=summary,
                         inversion=views)
    return files, before, after, blessing, result


def test_html_is_self_contained_with_real_pngs(run):
    files, before, _, blessing, _ = run
    parser = _Collector()
    parser.feed(files.html.read_text())
    parser.close()
    assert len(parser.images) == 9 and parser.tables >= 4  # 4 purification plots, trigger, norms, scan, margins,
    # universal perturbations
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1])
        assert data.startswith(PNG) and len(data) > 5000
    text = " ".join(parser.text)
    assert "NOT BLESSED" in text or "BLESSED" in text
    assert f"{before['acc']:.4f}" in text and "ab|cd" in text  # real numbers and lineage, escaped as text
    assert all(c.reason in text for c in blessing.checks)
    assert "margin/pvalue" in text and "Largest reachable margin per class" in text  # the table row, the caption
    assert "scan/top_share" in text and "the scan's untargeted adversarial examples land" in text
    assert "universal/budget_ratio" in text and "Smallest universal perturbation per class" in text


def test_markdown_has_tables_and_references_png_files(run):
    files, before, after, blessing, _ = run
    md = files.markdown.read_text()
    assert "| Metric | Candidate | Hardened | Δ |" in md
    assert f"| asr/badnets | {before['asr/badnets']:.4f} | {after['asr/badnets']:.4f} |" in md
    assert "| lineage.sha256 | ab\\|cd |" in md  # pipes escaped
    assert md.count("| attack probes evaluated |") == 1 and ("BLESSED" in md)
    assert "<" not in md.replace("<=", ""), "MLflow's Markdown viewer prints raw HTML tags as text"
    assert "### Per-class accuracy" in md and "report.html" in md
    for path in files.plots.values():
        assert f"]({path.relative_to(files.markdown.parent).as_posix()})" in md
        assert path.read_bytes().startswith(PNG)


def test_metrics_json_and_dvc_plot_data(run):
    files, before, after, blessing, result = run
    doc = json.loads(files.metrics.read_text())
    assert doc["before"]["acc"] == before["acc"] and doc["after"]["asr/blend"] == after["asr/blend"]
    assert doc["delta"]["acc"] == pytest.approx(after["acc"] - before["acc"])
    assert doc["blessed"] is blessing.blessed
    assert doc["purification"]["wall_time_s"] == result.wall_time_s
    assert len(doc["purification"]["masks"]["layers"]) == len(result.layers)
    with open(files.plot_data["training"]) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and float(rows[-1]["loss"]) == pytest.approx(result.history[-1]["loss"])
    with open(files.plot_data["masks"]) as f:
        assert len(list(csv.DictReader(f))) == len(result.layers)
    rows = json.loads(files.plot_data["before_after"].read_text())
    assert {"metric": "acc", "model": "hardened", "bar": "acc (hardened)", "value": after["acc"]} in rows


def test_before_after_plot_rows_put_a_number_on_x_and_name_metric_and_model_on_y(run):
    """dvc.yaml plots them with the bar_horizontal template, ``x: value`` (quantitative), ``y: bar`` (nominal):
    every row's value is a number (a rate), and each metric has a candidate and a hardened bar side by side."""
    files, before, after, _, _ = run
    rows = json.loads(files.plot_data["before_after"].read_text())
    assert rows and all(isinstance(r["value"], float) and 0.0 <= r["value"] <= 1.0 for r in rows)
    assert all(r["bar"] == f"{r['metric']} ({r['model']})" for r in rows)
    bars = [r["bar"] for r in rows]
    assert bars[:4] == ["acc (candidate)", "acc (hardened)", "asr/badnets (candidate)", "asr/badnets (hardened)"]
    assert len(set(bars)) == len(bars)
    assert not {r["metric"] for r in rows} & {"inverted/target", "scan/top_label", "scan/backdoor_score"}


def test_headline_metrics_are_flat_numbers_hardened_first_then_the_candidate(tmp_path):
    from harden.report import headline_metrics, write_headline

    before = {"acc": 0.9, "asr": {"badnets": 0.97, "blend": 0.8}, "scan": {"backdoor_score": 2.0, "top_label": 0},
              "inverted": {"asr": 0.9, "target": 0}, "per_class_acc": {"0": 0.9}, "versions": "x"}
    after = {"acc": 0.88, "asr": {"badnets": 0.01, "blend": 0.02}, "scan": {"backdoor_score": 0.5, "top_label": 3},
             "inverted": {"asr": 0.02, "target": 4}, "per_class_acc": {"0": 0.88}}
    headline = headline_metrics(before, after, blessed=True, purify_s=12.345)
    assert list(headline) == ["acc", "asr/badnets", "asr/blend", "inverted/asr", "scan/backdoor_score", "blessed",
                              "purify_s", "candidate/acc", "candidate/asr/badnets", "candidate/asr/blend",
                              "candidate/inverted/asr", "candidate/scan/backdoor_score"]
    assert headline["acc"] == 0.88 and headline["candidate/asr/badnets"] == 0.97 and headline["purify_s"] == 12.35
    assert headline["blessed"] == 1 and headline_metrics(before, after, blessed=False, purify_s=1)["blessed"] == 0
    # a run without the scan or the inversion leaves their keys out rather than writing null
    assert "scan/backdoor_score" not in headline_metrics({"acc": 0.9}, {"acc": 0.8}, blessed=False, purify_s=1)
    path = write_headline(tmp_path / "metrics.json", headline)
    assert json.loads(path.read_text()) == headline and list(json.loads(path.read_text())) == list(headline)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in headline.values())


def test_a_baseline_s_history_without_nft_keys_still_plots(tmp_path):
    """Fine-tuning baselines log only ``loss`` per epoch; the report used to crash on the missing NFT keys."""
    from harden.plots import training_curve

    fig = training_curve([{"epoch": 1.0, "loss": 2.3, "lr": 0.01}, {"epoch": 2.0, "loss": 2.1, "lr": 0.0}])
    assert len(fig.axes) == 1 and [line.get_label() for line in fig.axes[0].lines] == ["loss"]
    nft = training_curve([{"epoch": 1.0, "loss": 2.3, "ce": 2.2, "mask_mean": 0.9, "mask_min": 0.5,
                           "frac_at_lower_bound": 0.1}])
    assert len(nft.axes) == 2 and len(nft.axes[1].lines) == 3


def test_a_defense_run_in_phases_is_drawn_phase_after_phase_not_folded_back_onto_epoch_one():
    from harden.plots import training_curve

    # PBE: 3 epochs of adversarial fine-tuning, then 3 of clean fine-tuning, each counting from 1
    history = [{"epoch": float(e), "loss": loss} for e, loss in zip([1, 2, 3, 1, 2, 3], [4.5, 1.1, 1.2, 0.4, 0.3, 0.2])]
    ax = training_curve(history).axes[0]
    loss, phase = ax.lines
    assert list(loss.get_xdata()) == [1, 2, 3, 4, 5, 6] and list(phase.get_xdata()) == [3.5, 3.5]
    assert ax.get_xlabel() == "epoch (phases one after another)"
    assert list(training_curve(history[:3]).axes[0].lines[0].get_xdata()) == [1, 2, 3]  # one phase: as it was


def test_the_scan_plot_draws_each_model_s_runner_up_bound_where_its_top_class_would_flag_it():
    from harden.plots import scan_labels

    shares = {"candidate": [0.5, 0.06, 0.04, 0.4], "hardened": [0.2, 0.3, 0.5, 0.0], "nothing flipped": [0.0] * 4}
    fig = scan_labels(shares, 0.6, 3.0)
    lines = {line.get_label(): line.get_ydata()[0] for line in fig.axes[0].lines}
    assert lines == pytest.approx({"flags at 0.6": 0.6, "candidate: 3x the runner-up": 1.2,
                                   "hardened: 3x the runner-up": 0.9})  # no bound where fewer than two drew flips


def test_the_universal_plot_draws_each_model_s_median_and_the_budget_that_would_flag_it():
    from harden.plots import universal_budgets

    fig = universal_budgets({"candidate": [10 / 255, 30 / 255, 31 / 255], "hardened": [28 / 255, 30 / 255, 33 / 255]}, 2.0)
    lines = {line.get_label(): line.get_ydata()[0] for line in fig.axes[0].lines}
    assert lines == pytest.approx({"candidate: median": 30, "candidate: median / 2": 15, "hardened: median": 30,
                                   "hardened: median / 2": 15})
    bars = [patch.get_height() for patch in fig.axes[0].patches]
    assert bars == pytest.approx([10, 30, 31, 28, 30, 33])  # drawn in 1/255 steps


def test_the_trigger_caption_warns_when_the_candidate_s_stamp_names_no_class(run):
    """The first 12-epoch GTSRB Trojan candidate's smallest stamp was 0.63x the median class's: an adversarial patch
    its fine-tuned models kept obeying, read by a reviewer as a surviving backdoor unless the report says so."""
    from harden.report import PLOTS, caption

    warned = caption("triggers", {"inverted/norm_ratio": 0.63})
    assert warned.startswith(PLOTS["triggers"][1]) and "0.63x the median class's in size, above the 0.5" in warned
    for ratio in (0.11, 0.5, float("nan"), None):
        assert caption("triggers", {"inverted/norm_ratio": ratio}) == PLOTS["triggers"][1]
    assert caption("inversion_norms", {"inverted/norm_ratio": 0.63}) == PLOTS["inversion_norms"][1]
    files, before, *_ = run
    html, md = files.html.read_text(), files.markdown.read_text()
    names_no_class = before["inverted/norm_ratio"] > 0.5
    assert ("may be an ordinary adversarial patch" in html) == names_no_class
    assert ("may be an ordinary adversarial patch" in md) == names_no_class
