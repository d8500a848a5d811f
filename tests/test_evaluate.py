"""Evaluation: probes (attack and npz), metrics, PyTorch vs ONNX Runtime agreement, comparison, mask statistics."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from harden.evaluate import (LayerMasks, Probe, ProbeError, compare, evaluate_onnx, evaluate_torch, flatten,
                             layer_masks, mask_statistics, probe_inputs)
from harden.onnx_export import export_onnx
from nft_core.data import make_synthetic
from nft_core.masks import MaskedLayer
from nft_core.models import Normalized, build_model

K, SIZE = 5, 16


@pytest.fixture(scope="module")
def test_set():
    return make_synthetic(100, seed=1, train=False, num_classes=K, image_size=SIZE)


def constant_model(label: int) -> nn.Module:
    """Predicts ``label`` for every input."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, K))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.arange(K) == label)
    return model


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_probe_validation():
    assert Probe(attack="badnets").name == "badnets"
    assert Probe(npz="/data/my probe.npz").name == "my_probe"
    with pytest.raises(ValidationError, match="exactly one of 'attack' and 'npz'"):
        Probe(name="x", attack="badnets", npz="a.npz")
    with pytest.raises(ValidationError, match="exactly one"):
        Probe(name="x")
    with pytest.raises(ValidationError, match="attack='nope' is unknown"):
        Probe(attack="nope")
    with pytest.raises(ValidationError, match="target"):
        Probe(attack="badnets", target=-1)
    with pytest.raises(ValidationError, match="mode"):
        Probe(attack="badnets", mode="one2one")


def test_target_outside_labels_names_the_probe(test_set):
    with pytest.raises(ProbeError, match=r"probe 'bad': target=5 is outside the labels \[0, 5\)"):
        probe_inputs(Probe(name="bad", attack="badnets", target=5), test_set)


def test_asr_counts_only_samples_whose_label_differs_from_the_target(test_set):
    target = 2
    probe = Probe(attack="badnets", target=target)
    always_target = evaluate_torch(constant_model(target), test_set, [probe])
    assert always_target["asr/badnets"] == 1.0 and always_target["robust_acc/badnets"] == 0.0
    assert always_target["n/badnets"] == int((test_set.y != target).sum())
    assert always_target["acc"] == pytest.approx(float((test_set.y == target).float().mean()))
    assert always_target["min_class_acc"] == 0.0
    assert always_target["per_class_acc"]["diamond"] == 1.0 and always_target["n/test"] == len(test_set)
    never_target = evaluate_torch(constant_model(0), test_set, [probe])
    assert never_target["asr/badnets"] == 0.0


def test_asr_lift_subtracts_what_the_model_does_to_unstamped_images(test_set):
    """Issue 14: a model that sends everything to the target has ASR 1 on any probe, trigger or not; its lift
    over its own clean rate is 0. A model that never predicts the target has clean rate 0 and lift = ASR."""
    target = 2
    probe = Probe(attack="badnets", target=target)
    always = evaluate_torch(constant_model(target), test_set, [probe])
    assert always["clean_rate/badnets"] == 1.0 and always["asr_lift/badnets"] == 0.0
    never = evaluate_torch(constant_model(0), test_set, [probe])
    assert never["clean_rate/badnets"] == 0.0 and never["asr_lift/badnets"] == never["asr/badnets"] == 0.0


def test_clean_target_rate_reads_the_confusion_of_each_sample_s_true_class():
    from nft_core.metrics import clean_target_rate

    # clean images: class 1 goes to 0 half the time, class 2 never; class 3 has no clean image
    clean_y = torch.tensor([1, 1, 1, 1, 2, 2, 0])
    clean_pred = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    # probe samples (all2one to 0): two of class 1, one of class 2, one of class 0 (not attacked), one of class 3
    y_true, y_target = torch.tensor([1, 1, 2, 0, 3]), torch.zeros(5, dtype=torch.long)
    assert clean_target_rate(clean_pred, clean_y, y_true, y_target, 4) == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert clean_target_rate(clean_pred, clean_y, torch.tensor([3]), torch.tensor([0]), 4) is None


def test_npz_probe_equals_attack_probe_in_both_layouts(tmp_path, test_set):
    model = Normalized(build_model("small_cnn", num_classes=K, width=4), [0.5] * 3, [0.25] * 3)
    attack = Probe(name="blend", attack="blend", target=1)
    x, y_true, y_target = probe_inputs(attack, test_set)
    uint8 = write_npz(tmp_path / "u8.npz", x=(x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(),
                      y_true=y_true.numpy(), y_target=y_target.numpy().astype(np.int32))
    floats = write_npz(tmp_path / "f32.npz", x=x.numpy(), y_true=y_true.numpy(), y_target=y_target.numpy())
    metrics = evaluate_torch(model, test_set, [attack, Probe(npz=uint8), Probe(npz=floats)])
    assert metrics["asr/blend"] == metrics["asr/u8"] == metrics["asr/f32"]
    assert metrics["robust_acc/blend"] == metrics["robust_acc/u8"] == metrics["robust_acc/f32"]


@pytest.mark.parametrize("arrays, message", [
    ({"y_true": np.zeros(4, np.int64), "y_target": np.ones(4, np.int64)}, "key 'x' is missing"),
    ({"x": np.zeros((4, 16, 16, 3), np.uint8), "y_target": np.ones(4, np.int64)}, "key 'y_true' is missing"),
    ({"x": np.zeros((4, 3, 16, 16), np.uint8), "y_true": np.zeros(4, np.int64), "y_target": np.ones(4, np.int64)},
     r"'x' is uint8 \(4, 3, 16, 16\); expected uint8 \(N, 16, 16, 3\)"),
    ({"x": np.full((4, 3, 16, 16), 2.0, np.float32), "y_true": np.zeros(4, np.int64), "y_target": np.ones(4, np.int64)},
     r"must lie in \[0, 1\]"),
    ({"x": np.zeros((4, 16, 16, 3), np.uint8), "y_true": np.zeros(4, np.float32), "y_target": np.ones(4, np.int64)},
     "'y_true' must be integers of shape"),
    ({"x": np.zeros((4, 16, 16, 3), np.uint8), "y_true": np.zeros(4, np.int64), "y_target": np.full(4, 7)},
     r"'y_target' spans \[7, 7\], outside \[0, 5\)"),
    ({"x": np.zeros((4, 16, 16, 3), np.uint8), "y_true": np.zeros(3, np.int64), "y_target": np.ones(4, np.int64)},
     r"shape \(4,\)"),
])
def test_bad_npz_names_file_and_key(tmp_path, test_set, arrays, message):
    path = write_npz(tmp_path / "probe.npz", **arrays)
    with pytest.raises(ProbeError, match=message) as err:
        probe_inputs(Probe(npz=path), test_set)
    assert str(path) in str(err.value)


def test_duplicate_probe_names_are_refused(test_set):
    with pytest.raises(ProbeError, match="unique"):
        evaluate_torch(constant_model(0), test_set, [Probe(attack="badnets"), Probe(attack="badnets", target=1)])


def test_torch_and_onnx_evaluations_agree(tmp_path, test_set):
    torch.manual_seed(0)
    model = Normalized(build_model("small_cnn", num_classes=K, width=4), [0.5] * 3, [0.25] * 3).eval()
    with torch.no_grad():  # non-trivial BN statistics, so the export has something to get wrong
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    path = export_onnx(model, (3, SIZE, SIZE), tmp_path / "model.onnx")
    probes = [Probe(attack="badnets", target=1), Probe(attack="sig", target=3)]
    pt, ox = evaluate_torch(model, test_set, probes), evaluate_onnx(path, test_set, probes)
    del pt["eval_time_s"], ox["eval_time_s"]
    assert pt.keys() == ox.keys()
    flat_ox = flatten(ox)
    for key, value in flatten(pt).items():
        assert flat_ox[key] == pytest.approx(value, abs=1.5 / len(test_set)), key  # at most one argmax tie


def test_compare_and_flatten():
    before = {"acc": 0.9, "per_class_acc": {"a": 0.8, "b": None}, "asr/x": 1.0, "note": "text"}
    after = {"acc": 0.85, "per_class_acc": {"a": 0.9, "b": 0.5}, "scan/top_share": 0.3, "scan/top_label": 4}
    before["scan/top_label"] = 1
    diff = compare(before, after)
    assert diff["acc"] == {"before": 0.9, "after": 0.85, "delta": pytest.approx(-0.05)}
    assert diff["per_class_acc/a"]["delta"] == pytest.approx(0.1)
    assert diff["per_class_acc/b"] == {"before": None, "after": 0.5, "delta": None}
    assert diff["asr/x"]["after"] is None and "note" not in diff
    assert diff["scan/top_label"] == {"before": 1, "after": 4, "delta": None}  # a label has no delta


def test_mask_statistics_per_layer_and_overall():
    layers = [LayerMasks(1, "a", 0.5, np.array([1.0, 0.5, 0.5, 0.9], np.float32)),
              LayerMasks(2, "b", 0.2, np.array([0.2, 0.2000005, 1.0, 1.0], np.float32))]
    stats = mask_statistics(layers)
    assert stats["layers"][0] == {"index": 1, "name": "a", "size": 4, "lower_bound": 0.5, "mean": pytest.approx(0.725),
                                  "min": 0.5, "share_at_lower_bound": 0.5}
    assert stats["layers"][1]["share_at_lower_bound"] == 0.5  # within the 1e-6 tolerance
    assert stats["share_at_lower_bound"] == 0.5 and stats["min"] == pytest.approx(0.2)


def test_layer_masks_refuses_mismatched_state():
    with pytest.raises(ValueError, match="do not match"):
        layer_masks({"x": torch.ones(2)}, [MaskedLayer(1, "y", "BatchNorm2d", 2)], [0.5])


def test_every_metric_the_evaluation_produces_belongs_to_a_gateable_family(tmp_path, test_set):
    """``harden.gate.METRIC_FAMILIES`` is what params.yaml's gate checks are validated against: it must cover
    every metric a real evaluation (PyTorch, ONNX Runtime and the scan) writes, or a valid check is refused."""
    import fnmatch

    from harden.evaluate import (backdoor_score, invert_trigger, margin_metrics, scan_metrics, suspect_margin_pvalue,
                                 universal_metrics)
    from harden.gate import METRIC_FAMILIES

    torch.manual_seed(0)
    model = Normalized(build_model("small_cnn", num_classes=K, width=4), [0.5] * 3, [0.25] * 3).eval()
    path = export_onnx(model, (3, SIZE, SIZE), tmp_path / "model.onnx")
    probes = [Probe(attack="badnets", target=1), Probe(attack="blend", target=2)]
    trigger = invert_trigger(model, test_set, samples=20, steps=2, batch_size=4)
    metrics = {**evaluate_torch(model, test_set, probes, trigger=trigger), **trigger.metrics(),
               **scan_metrics(model, test_set, samples=20, steps=1), **margin_metrics(model, test_set, starts=1, steps=2),
               **universal_metrics(model, test_set, samples=20, steps=2, batch_size=4)}
    metrics["scan/backdoor_score"] = backdoor_score(metrics)
    names = set(flatten(metrics)) | set(flatten(evaluate_onnx(path, test_set, probes, trigger=trigger)))
    metrics["margin/suspect_pvalue"] = suspect_margin_pvalue(metrics, metrics)
    names |= set(flatten(metrics))
    assert {"inverted/asr", "inverted/asr_lift", "inverted/anomaly_index", "scan/backdoor_score", "margin/pvalue",
            "margin/suspect_pvalue", "margin/target", "universal/budget_ratio", "universal/budget",
            "universal/target"} <= names  # margin/ratio too, when the median margin is > 0
    orphans = [n for n in sorted(names) if not any(fnmatch.fnmatchcase(n, f) for f in METRIC_FAMILIES)]
    assert not orphans, f"metrics outside METRIC_FAMILIES: {orphans}"


def test_the_backdoor_score_reaches_one_at_either_flag_threshold():
    from harden.evaluate import NORM_RATIO_FACTOR, SCAN_SHARE_FLAG, backdoor_score

    assert backdoor_score({"inverted/norm_ratio": 1 / NORM_RATIO_FACTOR, "scan/top_share": 0.1}) == pytest.approx(1)
    assert backdoor_score({"inverted/norm_ratio": 1.0, "scan/top_share": SCAN_SHARE_FLAG}) == pytest.approx(1)
    assert backdoor_score({"inverted/norm_ratio": 0.7, "scan/top_share": 0.3}) < 1  # a clean demo model's values
    empty_stamp = backdoor_score({"inverted/norm_ratio": 0.0, "scan/top_share": 0.3})
    assert 100 < empty_stamp < float("inf"), "a class reached with an empty stamp flags, with a finite score"


def test_non_finite_metrics_are_left_out_so_a_check_on_them_cannot_pass(caplog):
    from harden.evaluate import finite_metrics

    metrics = {"acc": 0.9, "inverted/anomaly_index": float("inf"), "margin/values": [1.0, float("nan")],
               "margin/target": 3, "per_class_acc": {"0": None}}
    with caplog.at_level("WARNING"):
        kept = finite_metrics(metrics, "hardened")
    assert kept == {"acc": 0.9, "margin/target": 3, "per_class_acc": {"0": None}}
    assert "hardened metric inverted/anomaly_index is not finite" in caplog.text
    assert "margin/values" in caplog.text


def test_the_maximum_margin_p_value_joins_the_score_at_its_own_threshold():
    from harden.evaluate import MARGIN_P_FLAG, backdoor_score

    clean = {"inverted/norm_ratio": 0.7, "scan/top_share": 0.3, "scan/top_label": 4, "margin/target": 4}
    assert backdoor_score({**clean, "margin/pvalue": MARGIN_P_FLAG}) == pytest.approx(1)
    assert backdoor_score({**clean, "margin/pvalue": MARGIN_P_FLAG ** 2}) == pytest.approx(2)
    assert backdoor_score({**clean, "margin/pvalue": 0.3}) == backdoor_score(clean) < 1  # a benign p-value adds nothing
    underflow = backdoor_score({**clean, "margin/pvalue": 0.0})
    assert 1 < underflow < float("inf"), "a p-value that underflowed to 0 flags, with a finite score"


@pytest.mark.parametrize("named_by", ["inverted/target", "scan/top_label", "universal/target"])
def test_the_margin_counts_only_where_another_statistic_names_its_class(named_by):
    """A benign GTSRB ResNet-18 (BENCHMARKS.md): class 17's margin 112 against a median of 52, p underflowing to
    0, while the stamp, the scan and the universal perturbation point at classes 25, 2 and 25."""
    from harden.evaluate import backdoor_score, margin_corroborated

    benign = {"inverted/norm_ratio": 0.61, "inverted/target": 25, "scan/top_share": 0.08, "scan/top_label": 2,
              "scan/runner_up_ratio": 1.09, "universal/budget_ratio": 0.74, "universal/target": 25,
              "margin/target": 17, "margin/pvalue": 0.0, "margin/suspect": 17, "margin/suspect_pvalue": 0.0}
    assert not margin_corroborated(benign)
    assert backdoor_score(benign) < 1 < backdoor_score(benign, corroborate_margin=False)
    # a backdoor's target: another statistic names the class too (a stamp only when it stands out: at most half the
    # median class's, though not the 3x smaller that flags it alone)
    standing_out = {"inverted/norm_ratio": 0.45} if named_by == "inverted/target" else {}
    named = {**benign, named_by: 17, **standing_out}
    assert margin_corroborated(named) and backdoor_score(named) > 1
    # a hardened model is asked about the candidate's suspect (margin/suspect), not its own top class
    hardened = {**benign, "margin/target": 25, named_by: 25, **standing_out}
    assert not margin_corroborated(hardened) and backdoor_score(hardened) < 1


def test_the_smallest_of_many_ordinary_stamps_names_no_class():
    """The benign GTSRB candidate through the step (BENCHMARKS.md, *A benign candidate through the step*): on the
    235 held-out clean images its smallest stamp (0.61x the median) and MM-BD's outlying margin (p 0) were both on
    class 17, the "no entry" sign, which scored it 4.0 and rejected every purification on its stamp. A stamp names
    MM-BD's class only when it is at most half the median class's."""
    from harden.evaluate import STAMP_NAMES_RATIO, backdoor_score, margin_corroborated

    held_out = {"inverted/norm_ratio": 0.614, "inverted/target": 17, "scan/top_share": 0.08, "scan/top_label": 5,
                "scan/runner_up_ratio": 1.06, "universal/budget_ratio": 0.736, "universal/target": 23,
                "margin/target": 17, "margin/pvalue": 0.0, "margin/suspect": 17, "margin/suspect_pvalue": 0.0}
    assert not margin_corroborated(held_out) and backdoor_score(held_out) < 1
    at_bound = {**held_out, "inverted/norm_ratio": STAMP_NAMES_RATIO}
    assert margin_corroborated(at_bound) and backdoor_score(at_bound) > 1
    assert not margin_corroborated({k: v for k, v in held_out.items() if k != "inverted/norm_ratio"})


def test_the_scan_s_runner_up_ratio_joins_the_score_at_its_own_threshold():
    from harden.evaluate import RUNNER_UP_FLAG, backdoor_score

    # a WaNet target on 43 classes: half the flips, under the top-share threshold set with 10, 9x the next class's
    wanet = {"inverted/norm_ratio": 0.46, "scan/top_share": 0.54}
    assert backdoor_score(wanet) < 1
    assert backdoor_score({**wanet, "scan/runner_up_ratio": 9.0}) == pytest.approx(9.0 / RUNNER_UP_FLAG)
    assert backdoor_score({**wanet, "scan/runner_up_ratio": RUNNER_UP_FLAG}) == pytest.approx(1)
    benign = {"inverted/norm_ratio": 0.7, "scan/top_share": 0.08}
    assert backdoor_score({**benign, "scan/runner_up_ratio": 1.48}) < 1  # the largest on a benign GTSRB model


def test_the_universal_perturbation_s_budget_ratio_joins_the_score_at_its_own_threshold():
    from harden.evaluate import BUDGET_RATIO_FACTOR, backdoor_score

    # a SIG target on GTSRB: its stamp no smaller than a benign class's, its universal perturbation a third of theirs
    sig = {"inverted/norm_ratio": 0.48, "scan/top_share": 0.09, "scan/runner_up_ratio": 1.13}
    assert backdoor_score(sig) < 1
    assert backdoor_score({**sig, "universal/budget_ratio": 0.33}) == pytest.approx(1 / 0.33 / BUDGET_RATIO_FACTOR)
    assert backdoor_score({**sig, "universal/budget_ratio": 1 / BUDGET_RATIO_FACTOR}) == pytest.approx(1)
    assert backdoor_score({**sig, "universal/budget_ratio": 0.8}) == backdoor_score(sig)  # a benign ratio adds nothing
    assert 100 < backdoor_score({**sig, "universal/budget_ratio": 0.0}) < float("inf")  # a zero budget: finite, flags


def test_universal_metrics_name_the_class_with_the_smallest_budget():
    from harden.evaluate import universal_metrics

    torch.manual_seed(0)
    model = Normalized(build_model("small_cnn", num_classes=5, width=4), [0.5] * 3, [0.25] * 3)
    test = make_synthetic(40, seed=0, train=False, num_classes=5, image_size=16)
    metrics = universal_metrics(model, test, samples=20, steps=10, batch_size=4)
    budgets = metrics["universal/budgets"]
    assert len(budgets) == 5 and metrics["universal/budget"] == budgets[metrics["universal/target"]] == min(budgets)
    assert metrics["universal/budget_ratio"] == pytest.approx(min(budgets) / sorted(budgets)[2])  # the median of 5


def test_a_hardened_model_is_scored_on_the_candidate_s_suspect_not_on_its_own_largest_margin():
    from harden.evaluate import backdoor_score, suspect_margin_pvalue

    clean = {"inverted/norm_ratio": 0.7, "scan/top_share": 0.3}
    candidate = {**clean, "margin/values": [125.0, 22, 37, 23, 32, 38, 33, 29, 23, 27], "margin/target": 0,
                 "margin/pvalue": 0.0}
    # the demo's PBE-hardened model: class 0 fell below every other class, class 8 is now the largest
    hardened = {**clean, "margin/values": [8.8, 20.4, 25.6, 13.9, 22.3, 25.3, 30.0, 25.2, 49.2, 36.1],
                "margin/target": 8, "margin/pvalue": 0.0063}
    assert suspect_margin_pvalue(candidate, candidate) == 0.0
    hardened["margin/suspect_pvalue"] = suspect_margin_pvalue(candidate, hardened)
    assert hardened["margin/suspect_pvalue"] > 0.9
    assert backdoor_score(hardened) == backdoor_score(clean) < 1
    # the backdoor survived: class 0's margin stands out again, and the reconstructed stamp names it too
    kept = {**hardened, "margin/values": [125.0, *hardened["margin/values"][1:]], "inverted/target": 0,
            "inverted/norm_ratio": 0.45, "margin/suspect": 0}
    kept["margin/suspect_pvalue"] = suspect_margin_pvalue(candidate, kept)
    assert backdoor_score(kept) > 1
