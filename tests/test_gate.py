"""The promotion gate: thresholds, boundaries, directions, wildcards, missing evidence, the blessing file."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from harden.gate import Blessing, GateConfig, MetricCheck, MissingMetricError, evaluate_gate
from harden.params import load_params

FACTS = {"onnx_parity": True, "fold_check": True}
BEFORE = {"acc": 0.90, "asr/badnets": 0.98, "asr/blend": 0.95, "asr_lift/badnets": 0.97, "asr_lift/blend": 0.93,
          "robust_acc/badnets": 0.01, "scan/top_share": 0.9}
AFTER = {"acc": 0.88, "asr/badnets": 0.03, "asr/blend": 0.05, "asr_lift/badnets": 0.02, "asr_lift/blend": 0.03,
         "robust_acc/badnets": 0.80, "scan/top_share": 0.2, "per_class_acc": {"a": 0.9}}


def gate(*checks, **kw):
    return GateConfig(metrics=[MetricCheck(**c) for c in checks], required_facts=kw.pop("facts", []), **kw)


def only(blessing, kind):
    found = [c for c in blessing.checks if c.kind == kind]
    assert len(found) == 1, blessing.checks
    return found[0]


@pytest.mark.parametrize("threshold, passed", [(0.87, True), (0.88, True), (0.8801, False)])
def test_min_passes_at_boundary_and_fails_above(threshold, passed):
    b = evaluate_gate(gate({"metric": "acc", "min": threshold}), BEFORE, AFTER, FACTS)
    check = only(b, "min")
    assert (check.passed, b.blessed) == (passed, passed)
    assert check.value == 0.88 and check.threshold == threshold and check.baseline is None
    assert ("meets" if passed else "violates") in check.reason


@pytest.mark.parametrize("threshold, passed", [(0.04, True), (0.03, True), (0.0299, False)])
def test_max_passes_at_boundary_and_fails_below(threshold, passed):
    b = evaluate_gate(gate({"metric": "asr/badnets", "max": threshold}), BEFORE, AFTER, FACTS)
    assert only(b, "max").passed is passed and b.blessed is passed


@pytest.mark.parametrize("max_drop, passed", [(0.03, True), (0.02, True), (0.0199, False)])
def test_max_drop_against_candidate_including_float_boundary(max_drop, passed):
    # 0.90 - 0.88 is 0.020000000000000018 in floats: equal to the threshold must still pass
    check = only(evaluate_gate(gate({"metric": "acc", "max_drop": max_drop}), BEFORE, AFTER, FACTS), "max_drop")
    assert check.passed is passed
    assert check.baseline == 0.90 and check.value == 0.88
    assert "drop of 0.0200" in check.reason


@pytest.mark.parametrize("max_increase, after, passed", [(0.0, 0.9, True), (0.05, 0.95, True), (0.05, 0.9501, False),
                                                         (0.0, 0.2, True)])
def test_max_increase_for_lower_is_better_metric(max_increase, after, passed):
    b = evaluate_gate(gate({"metric": "scan/top_share", "max_increase": max_increase}), BEFORE,
                      {**AFTER, "scan/top_share": after}, FACTS)
    assert only(b, "max_increase").passed is passed


def test_an_improvement_never_fails_a_change_threshold():
    better = {**AFTER, "acc": 0.95}
    assert only(evaluate_gate(gate({"metric": "acc", "max_drop": 0.0}), BEFORE, better, FACTS), "max_drop").passed


@pytest.mark.parametrize("check, message", [
    ({"metric": "asr/*", "max_drop": 0.1}, "use max_increase"),
    ({"metric": "acc", "max_increase": 0.1}, "use max_drop"),
    ({"metric": "latency_ms", "max_increase": 5}, "needs an explicit direction"),
    ({"metric": "acc"}, "no threshold"),
    ({"metric": "acc", "min": 0.9, "max": 0.5}, "min must be <= max"),
])
def test_direction_and_consistency_errors_name_the_key(check, message):
    with pytest.raises(ValidationError, match=message):
        MetricCheck(**check)


def test_explicit_direction_enables_change_thresholds_on_unknown_metrics():
    check = MetricCheck(metric="latency_ms", max_increase=5, direction="lower")
    b = evaluate_gate(GateConfig(metrics=[check], allow_no_probes=True, required_facts=[]),
                      {"latency_ms": 10.0}, {"latency_ms": 16.0}, {})
    assert not b.blessed and "increase of 6.0000" in b.checks[-1].reason


@pytest.mark.parametrize("raw, key", [
    ({"metrics": [{"metric": "acc", "max_drop": -0.1}]}, "max_drop"),
    ({"metrics": [{"metric": "acc", "minimum": 0.5}]}, "minimum"),
    ({"metrics": []}, "metrics"),
    ({"on_missing": "ignore"}, "on_missing"),
    ({"metrics": [{"metric": "acc", "min": float("nan")}]}, "finite"),
])
def test_raw_config_errors_name_the_bad_key(raw, key):
    with pytest.raises(ValidationError, match=key):
        evaluate_gate(raw, BEFORE, AFTER, FACTS)


def test_wildcard_expands_to_every_probe():
    b = evaluate_gate(gate({"metric": "asr/*", "max": 0.04}), BEFORE, AFTER, FACTS)
    by_metric = {c.metric: c.passed for c in b.checks if c.kind == "max"}
    assert by_metric == {"asr/badnets": True, "asr/blend": False}
    assert not b.blessed and "asr/blend" in b.summary


def test_wildcard_ignores_non_numeric_entries():
    b = evaluate_gate(gate({"metric": "*", "min": 0.0}), BEFORE, AFTER, FACTS)
    assert "per_class_acc" not in {c.metric for c in b.checks}


@pytest.mark.parametrize("where", ["before", "after"])
def test_missing_metric_raises_naming_it(where):
    before, after = dict(BEFORE), dict(AFTER)
    del (before if where == "before" else after)["acc"]
    with pytest.raises(MissingMetricError, match="'acc'"):
        evaluate_gate(gate({"metric": "acc", "max_drop": 0.02}), before, after, FACTS)


def test_missing_metric_fails_the_check_when_configured():
    b = evaluate_gate(gate({"metric": "robust_acc/blend", "min": 0.5}, on_missing="fail"), BEFORE, AFTER, FACTS)
    check = only(b, "min")
    assert not check.passed and check.value is None and "missing" in check.reason and not b.blessed


def test_no_probes_is_not_blessed_unless_allowed():
    clean_only = {"acc": 0.9}
    config = {"metrics": [{"metric": "acc", "min": 0.5}, {"metric": "asr/*", "max": 0.05}], "required_facts": []}
    refused = evaluate_gate(config, clean_only, clean_only, {})
    assert not refused.blessed and "No attack probe" in only(refused, "probes").reason
    allowed = evaluate_gate({**config, "allow_no_probes": True}, clean_only, clean_only, {})
    assert allowed.blessed and "allow_no_probes" in only(allowed, "probes").reason


@pytest.mark.parametrize("facts, blessed", [(FACTS, True), ({**FACTS, "onnx_parity": False}, False)])
def test_fact_checks(facts, blessed):
    b = evaluate_gate({"metrics": [{"metric": "acc", "min": 0}]}, BEFORE, AFTER, facts)
    assert b.blessed is blessed
    assert {c.name: c.passed for c in b.checks if c.kind == "fact"} == facts


def test_missing_fact_and_non_bool_fact():
    with pytest.raises(MissingMetricError, match="fold_check"):
        evaluate_gate({}, BEFORE, AFTER, {"onnx_parity": True})
    with pytest.raises(TypeError, match="onnx_parity"):
        evaluate_gate({}, BEFORE, AFTER, {"onnx_parity": 1, "fold_check": True})


def test_nan_metric_fails():
    b = evaluate_gate(gate({"metric": "acc", "min": 0.5}), BEFORE, {**AFTER, "acc": float("nan")}, FACTS)
    assert not only(b, "min").passed and "not a finite number" in only(b, "min").reason


def test_default_gate_and_blessing_file(tmp_path):
    b = evaluate_gate({}, BEFORE, AFTER, FACTS)
    assert b.blessed and b.summary.startswith("Blessed")
    assert [c.kind for c in b.checks] == ["probes", "max_drop", "max", "max", "fact", "fact"]
    path = b.write(tmp_path / "out")
    data = json.loads(path.read_text())
    assert data["blessed"] is True and len(data["checks"]) == 6
    assert set(data["checks"][1]) == {"name", "kind", "metric", "value", "threshold", "baseline", "passed", "reason"}
    assert Blessing.model_validate(data) == b == Blessing.read(tmp_path / "out")
    assert [p.name for p in path.parent.iterdir()] == ["blessing.json"]  # no temporary file left behind


@pytest.mark.parametrize("check", [{"metric": "acc", "min": 1.2}, {"metric": "asr/*", "max": -0.1},
                                   {"metric": "acc", "max_drop": 2.0}, {"metric": "scan/top_share", "max": 5}])
def test_rate_thresholds_outside_unit_interval_are_refused(check):
    with pytest.raises(ValidationError, match=r"outside \[0, 1\]"):
        GateConfig(metrics=[check])


@pytest.mark.parametrize("check, allowed", [({"metric": "asr_lift/*", "min": -1.5}, r"\[-1, 1\]"),
                                            ({"metric": "inverted/asr_lift", "max_increase": 2.5}, r"\[0, 2\]"),
                                            ({"metric": "scan/backdoor_score", "max": -1}, r"\[0, inf\]"),
                                            ({"metric": "scan/runner_up_ratio", "max": 0.3}, r"\[1, inf\]"),
                                            ({"metric": "inverted/norm_ratio", "min": -0.1}, r"\[0, inf\]")])
def test_thresholds_outside_the_range_of_a_metric_that_is_not_a_rate_are_refused(check, allowed):
    with pytest.raises(ValidationError, match=rf"outside {allowed}"):
        GateConfig(metrics=[check])


def test_thresholds_of_other_metrics_are_not_limited_to_unit_interval():
    GateConfig(metrics=[{"metric": "eval_time_s", "max": 30.0}])
    # the backdoor score flags at 1 and reaches 4 on the demo's candidate; a looser gate may bound it at 2
    GateConfig(metrics=[{"metric": "scan/backdoor_score", "max": 2.0}, {"metric": "asr_lift/*", "min": -0.5},
                        {"metric": "inverted/anomaly_index", "max": 3.0}, {"metric": "margin/ratio", "max": 2.5},
                        {"metric": "inverted/norm_ratio", "min": 1.5}, {"metric": "scan/runner_up_ratio", "max": 3}])


@pytest.mark.parametrize("metric", ["ASR/*", "Robust_acc/*", "accuracy", "asr", "scan/top"])
def test_a_check_no_metric_of_the_evaluation_can_match_is_refused_at_load(metric):
    """Issue 12: ``ASR/*`` for ``asr/*`` used to expand to no check, and the gate blessed without it."""
    with pytest.raises(ValidationError, match="no metric of the evaluation can match it"):
        MetricCheck(metric=metric, max=0.05)


def test_a_pattern_that_matches_nothing_in_this_evaluation_is_never_passed_by_omission():
    check = {"metric": "robust_acc/bl*", "min": 0.5}  # a plausible pattern, but no blend probe was run
    with pytest.raises(MissingMetricError, match="robust_acc/bl"):
        evaluate_gate(gate(check), BEFORE, AFTER, FACTS)
    b = evaluate_gate(gate(check, on_missing="fail"), BEFORE, AFTER, FACTS)
    failed = [c for c in b.checks if not c.passed]
    assert not b.blessed and [c.kind for c in failed] == ["pattern"] and "robust_acc/bl*" in failed[0].reason


def test_a_missing_metric_is_a_params_error_with_exit_code_2():
    from harden.errors import exit_code

    with pytest.raises(MissingMetricError) as info:
        evaluate_gate(gate({"metric": "min_class_acc", "min": 0.5}), BEFORE, AFTER, FACTS)
    assert exit_code(info.value) == 2


def test_a_blessing_whose_flags_were_edited_is_inconsistent():
    b = evaluate_gate(gate({"metric": "acc", "max_drop": 0.01}, {"metric": "asr/*", "max": 0.05}), BEFORE, AFTER, FACTS)
    assert not b.blessed and b.inconsistencies() == []
    forged = b.model_copy(update={"blessed": True, "checks": [c.model_copy(update={"passed": True}) for c in b.checks]})
    problems = forged.inconsistencies()
    assert any("acc drop" in p and "its value says False" in p for p in problems), problems
    only_verdict = b.model_copy(update={"blessed": True})
    assert any("checks failed" in p for p in only_verdict.inconsistencies())


def test_the_default_gate_bounds_the_lift_over_the_clean_rate_not_raw_asr():
    """Issue 14: a weak model sends some clean images to the target by ordinary misclassification; raw ASR
    counts them as the trigger's doing. The default check bounds ASR minus that clean rate."""
    before = {"acc": 0.66, "asr/blend": 0.99, "asr_lift/blend": 0.92}
    noisy = {"acc": 0.66, "asr/blend": 0.09, "asr_lift/blend": 0.02}  # 7 % of clean images go to the target too
    assert evaluate_gate({}, before, noisy, FACTS).blessed
    assert not evaluate_gate({"metrics": [{"metric": "asr/*", "max": 0.05}]}, before, noisy, FACTS).blessed
    lifted = {**noisy, "asr_lift/blend": 0.07}
    rejected = evaluate_gate({}, before, lifted, FACTS)
    assert not rejected.blessed and "asr_lift/blend" in rejected.summary


def test_a_tightened_check_asks_for_the_margin_on_every_threshold():
    check = MetricCheck(metric="acc", min=0.5, max_drop=0.02)
    strict = check.tightened(0.01)
    assert (strict.metric, strict.min, strict.max_drop, strict.max) == ("acc", pytest.approx(0.51),
                                                                        pytest.approx(0.01), None)
    lower = MetricCheck(metric="asr_lift/*", max=0.05, max_increase=0.005).tightened(0.01)
    assert (lower.max, lower.max_increase) == (pytest.approx(0.04), 0.0)  # never below 0
    assert check.tightened(0.0) == check
    # a value at the gate's bound passes it, and fails it once a margin is asked for
    at_bound = {**AFTER, "asr_lift/badnets": 0.05}
    plain = gate({"metric": "asr_lift/badnets", "max": 0.05})
    strict = GateConfig(metrics=[c.tightened(0.01) for c in plain.metrics], required_facts=[])
    assert evaluate_gate(plain, BEFORE, at_bound, FACTS).blessed
    failed = evaluate_gate(strict, BEFORE, at_bound, FACTS)
    assert not failed.blessed and "violates the maximum 0.0400" in failed.failed[0].reason
    with pytest.raises(ValueError, match="margin=-0.01 is invalid"):
        check.tightened(-0.01)


def test_the_shipped_gate_rejects_a_model_whose_reconstructed_trigger_still_works():
    """Fine-pruning a WaNet GTSRB candidate (BENCHMARKS.md) left the real trigger a 4.8-point lift, inside the
    probes' bound, while the stamp reconstructed from the candidate still sent 39.5 points more of the hardened
    model's images to the target than its clean rate: ``params.yaml``'s gate rejects that model on the stamp alone."""
    shipped = load_params(Path(__file__).resolve().parents[1] / "params.yaml").gate
    before = {"acc": 0.892, "asr/wanet": 0.768, "asr_lift/wanet": 0.725, "inverted/asr_lift": 0.888, "scan/backdoor_score": 3.84}
    after = {"acc": 0.926, "asr/wanet": 0.051, "asr_lift/wanet": 0.048, "inverted/asr_lift": 0.395, "scan/backdoor_score": 0.70}
    rejected = evaluate_gate(shipped, before, after, FACTS)
    assert not rejected.blessed
    assert [c.metric for c in rejected.checks if not c.passed] == ["inverted/asr_lift"]
    assert evaluate_gate(shipped, before, {**after, "inverted/asr_lift": 0.049}, FACTS).blessed


STAMP_WHEN_FLAGGED = {"metric": "inverted/asr_lift", "max": 0.10, "when": {"metric": "scan/backdoor_score", "min": 1.0}}


@pytest.mark.parametrize("score, applied", [(0.74, False), (0.999, False), (1.0, True), (1.63, True)])
def test_a_check_with_a_condition_applies_only_where_the_candidate_meets_it(score, applied):
    """The stamp reconstructed from a candidate that looks benign is an ordinary adversarial patch, which any model
    fine-tuned from it obeys: the check on it applies only when the candidate looks backdoored."""
    before = {**BEFORE, "scan/backdoor_score": score, "inverted/asr_lift": 0.9}
    after = {**AFTER, "inverted/asr_lift": 0.85}
    b = evaluate_gate(gate(STAMP_WHEN_FLAGGED), before, after, FACTS)
    assert b.blessed is not applied and b.inconsistencies() == []
    check = next(c for c in b.checks if c.name.startswith("inverted/asr_lift"))
    if applied:
        assert (check.kind, check.value, check.passed) == ("max", 0.85, False)
    else:
        assert (check.kind, check.metric, check.value, check.threshold) == ("condition", "scan/backdoor_score", score, 1.0)
        assert check.passed and check.reason.startswith("Not applied: the candidate's scan/backdoor_score is")
        assert "scan/backdoor_score >= 1" in check.name
        assert b.summary.endswith("(1 of them not applied: the candidate does not meet their condition).")
    # where the condition holds, a hardened model the stamp no longer moves passes
    assert evaluate_gate(gate(STAMP_WHEN_FLAGGED), before, {**after, "inverted/asr_lift": 0.02}, FACTS).blessed


def test_a_condition_that_cannot_be_evaluated_lets_nothing_off():
    after = {**AFTER, "inverted/asr_lift": 0.85}
    with pytest.raises(MissingMetricError, match="the candidate's metric 'scan/backdoor_score'"):
        evaluate_gate(gate(STAMP_WHEN_FLAGGED), BEFORE, after, FACTS)
    b = evaluate_gate(gate(STAMP_WHEN_FLAGGED, on_missing="fail"), BEFORE, after, FACTS)
    assert not b.blessed and only(b, "condition").passed is False
    # a candidate value that compares with nothing (NaN) applies the check
    nan = evaluate_gate(gate(STAMP_WHEN_FLAGGED), {**BEFORE, "scan/backdoor_score": float("nan")}, after, FACTS)
    assert not nan.blessed and [c.kind for c in nan.failed] == ["max"]
    # a condition with a max bound, and one with both
    upper = {"metric": "acc", "max_drop": 0.01, "when": {"metric": "acc", "max": 0.5}}
    assert only(evaluate_gate(gate(upper), BEFORE, AFTER, FACTS), "condition").threshold == 0.5
    both = {"metric": "acc", "max_drop": 0.01, "when": {"metric": "acc", "min": 0.5, "max": 0.95}}
    assert not evaluate_gate(gate(both), BEFORE, AFTER, FACTS).blessed  # 0.90 is inside: the 2-point drop fails


def test_a_forged_condition_record_is_inconsistent():
    before = {**BEFORE, "scan/backdoor_score": 0.74}
    b = evaluate_gate(gate(STAMP_WHEN_FLAGGED), before, {**AFTER, "inverted/asr_lift": 0.85}, FACTS)
    record = b.model_dump()
    record["checks"] = [c | {"value": 1.0} if c["kind"] == "condition" else c for c in record["checks"]]
    assert any("says passed=True" in p for p in Blessing.model_validate(record).inconsistencies())


@pytest.mark.parametrize("when, message", [
    ({"metric": "scan/backdoor_score"}, "has no bound"),
    ({"metric": "asr/*", "min": 0.5}, "must name one metric"),
    ({"metric": "scan/backdor_score", "min": 1}, "must name one metric"),
    ({"metric": "acc", "min": 0.9, "max": 0.5}, "min=0.9 is above max=0.5"),
    ({"metric": "acc", "min": float("inf")}, "must be a finite number"),
    ({"metric": "acc", "min": 0.5, "above": 1}, "above"),
])
def test_a_condition_is_checked_when_params_load(when, message):
    with pytest.raises(ValidationError, match=message):
        MetricCheck(metric="acc", max_drop=0.02, when=when)
