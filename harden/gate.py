"""The promotion gate: declarative checks on the evaluation evidence, and the blessing they produce.

Modelled on TFX's Evaluator (value thresholds, change thresholds against a baseline, a blessing artifact):

1. Every :class:`MetricCheck` names a metric or a wildcard pattern (``asr/*`` is every probe's ASR) and
   carries value thresholds (``min``/``max``, the hardened model's value) and/or a change threshold against
   the candidate: ``max_drop`` for metrics that are better when higher (ACC may drop at most 0.02),
   ``max_increase`` for metrics that are better when lower. Which one applies follows from the metric's
   direction (:data:`DIRECTIONS`, or ``direction:`` set explicitly); using the wrong one is a config error.
2. Every fact named in ``required_facts`` (ONNX parity passed, fold check passed, ...) must be ``True``.
3. At least one attack probe must have been evaluated (an ``asr/<probe>`` metric), unless
   ``allow_no_probes: true``: the gate never blesses by omission of the ASR evidence.
4. The model is blessed when every check passed.

A value equal to its threshold passes (comparisons allow :data:`TOLERANCE` for float rounding, so
``0.90 - 0.88 <= 0.02`` holds). A check that cannot be evaluated never passes: a metric name or pattern that
no metric of the evaluation can match (:data:`METRIC_FAMILIES`; ``ASR/*`` for ``asr/*``) is refused when
``params.yaml`` loads; a metric, or a pattern matching nothing, that is missing from this evaluation raises
:class:`MissingMetricError` (``on_missing: error``, the default: exit code 2) or becomes a failed check
(``on_missing: fail``).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harden.errors import ParamsError
from harden.records import TOLERANCE, Blessing, CheckKind, CheckResult

Direction = Literal["higher", "lower"]
OnMissing = Literal["error", "fail"]

#: Metric-name patterns and the direction in which the metric gets better (first match wins).
DIRECTIONS: tuple[tuple[str, Direction], ...] = (
    ("acc", "higher"), ("min_class_acc", "higher"), ("robust_acc/*", "higher"),
    ("asr/*", "lower"), ("asr_lift/*", "lower"), ("scan/top_share", "lower"), ("scan/runner_up_ratio", "lower"),
    ("scan/backdoor_score", "lower"),
    ("inverted/asr", "lower"), ("inverted/asr_lift", "lower"), ("inverted/anomaly_index", "lower"),
    ("inverted/norm_ratio", "higher"), ("margin/pvalue", "higher"), ("margin/suspect_pvalue", "higher"),
    ("margin/ratio", "lower"), ("universal/budget_ratio", "higher"),
)

#: Known metrics that are not rates in [0, 1], with their range (first match wins); every other metric with a
#: direction in :data:`DIRECTIONS` is a rate.
RANGES: tuple[tuple[str, float, float], ...] = (
    ("asr_lift/*", -1.0, 1.0), ("inverted/asr_lift", -1.0, 1.0),
    ("scan/backdoor_score", 0.0, math.inf), ("scan/runner_up_ratio", 1.0, math.inf),
    ("inverted/norm_ratio", 0.0, math.inf), ("universal/budget_ratio", 0.0, math.inf),
    ("inverted/anomaly_index", -math.inf, math.inf), ("margin/ratio", -math.inf, math.inf),
)

#: Every metric the evaluation produces, as fnmatch patterns (``tests/test_evaluate.py`` checks a real evaluation
#: against it). A gate check whose metric or pattern can match none of these is refused when params.yaml loads.
METRIC_FAMILIES: tuple[str, ...] = (
    "acc", "min_class_acc", "per_class_acc/*", "asr/*", "asr_lift/*", "clean_rate/*", "robust_acc/*", "n/*",
    "eval_time_s",
    "scan/flip_rate", "scan/top_label", "scan/top_share", "scan/runner_up_ratio", "scan/backdoor_score",
    "inverted/asr", "inverted/clean_rate", "inverted/asr_lift", "inverted/anomaly_index", "inverted/norm_ratio",
    "inverted/mask_l1", "inverted/target", "margin/pvalue", "margin/suspect_pvalue", "margin/suspect",
    "margin/target", "margin/ratio", "universal/budget_ratio", "universal/budget", "universal/target",
)

#: Metrics whose presence shows that an attack probe was evaluated.
PROBE_PATTERN = "asr/*"


class MissingMetricError(ParamsError):
    """A metric or fact a check needs is not in the evidence (a gate that names what the evaluation does not
    produce is a misconfigured gate: exit code 2)."""


def _literal_prefix(pattern: str) -> str:
    cut = min((i for i, ch in enumerate(pattern) if ch in "*?["), default=len(pattern))
    return pattern[:cut]


def is_wildcard(metric: str) -> bool:
    return any(ch in metric for ch in "*?[")


def could_match(metric: str) -> bool:
    """Whether a metric name or pattern can match a metric of :data:`METRIC_FAMILIES` (names are case-sensitive)."""
    if not is_wildcard(metric):
        return any(fnmatch.fnmatchcase(metric, family) for family in METRIC_FAMILIES)
    prefix = _literal_prefix(metric)
    return any(_literal_prefix(f).startswith(prefix) or prefix.startswith(_literal_prefix(f)) for f in METRIC_FAMILIES)


def infer_direction(metric: str) -> Direction | None:
    """Direction of a metric name or pattern from :data:`DIRECTIONS`, or None when unknown."""
    for pattern, direction in DIRECTIONS:
        if fnmatch.fnmatchcase(metric, pattern):
            return direction
    return None


def value_range(metric: str) -> tuple[float, float] | None:
    """The values a known metric (name or pattern) can take (:data:`RANGES`; [0, 1] for the other rates), or None
    for a metric of the user's own."""
    if infer_direction(metric) is None:
        return None
    return next(((low, high) for pattern, low, high in RANGES if fnmatch.fnmatchcase(metric, pattern)), (0.0, 1.0))


def _finite(what: str, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{what} {value} is invalid: must be a finite number")
    return value


class Condition(BaseModel):
    """When a check applies: the *candidate's* ``metric`` at or above ``min`` and at or below ``max``.

    A check about what purification removed means something only where there was something to remove: the
    candidate's reconstructed trigger is a trigger only when the candidate looks backdoored. Where it does not,
    the smallest class's stamp is an ordinary adversarial patch, and any model fine-tuned from the candidate
    obeys it as the candidate does: without the condition, ``params.yaml``'s check on that stamp rejected all six
    benign GTSRB candidates it was run on (BENCHMARKS.md, *A benign candidate through the step*).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str = Field(min_length=1)
    min: float | None = None
    max: float | None = None

    @field_validator("min", "max")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        return _finite("bound", value)

    @model_validator(mode="after")
    def _consistent(self) -> Condition:
        where = f"condition on the candidate's {self.metric!r}"
        if is_wildcard(self.metric) or not could_match(self.metric):
            raise ValueError(f"{where}: must name one metric of the evaluation ({', '.join(METRIC_FAMILIES)})")
        if self.min is None and self.max is None:
            raise ValueError(f"{where} has no bound: set min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"{where}: min={self.min} is above max={self.max}; min must be <= max")
        return self

    def holds(self, value: float) -> bool:
        return ((self.min is None or value >= self.min - TOLERANCE) and
                (self.max is None or value <= self.max + TOLERANCE))

    def describe(self) -> str:
        bounds = [f">= {self.min:g}" if self.min is not None else "", f"<= {self.max:g}" if self.max is not None else ""]
        return f"the candidate's {self.metric} {' and '.join(b for b in bounds if b)}"


class MetricCheck(BaseModel):
    """Thresholds on one metric (or every metric matching a wildcard pattern).

    Attributes:
        metric: metric name or fnmatch pattern (``acc``, ``asr/*``, ``robust_acc/badnets``).
        min: the hardened value must be >= this.
        max: the hardened value must be <= this.
        max_drop: the hardened value may be at most this much below the candidate's (higher-is-better metrics).
        max_increase: the hardened value may be at most this much above the candidate's (lower-is-better metrics).
        direction: overrides :data:`DIRECTIONS`; needed for change thresholds on metrics it does not know.
        when: the check applies only where the candidate meets this :class:`Condition`; elsewhere it is
            recorded as not applied (and passes), with the candidate's value. A condition metric missing from
            the candidate's evidence is a missing metric (``on_missing``): it never lets the check off.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str = Field(min_length=1)
    min: float | None = None
    max: float | None = None
    max_drop: float | None = Field(default=None, ge=0)
    max_increase: float | None = Field(default=None, ge=0)
    direction: Direction | None = None
    when: Condition | None = None

    @field_validator("min", "max", "max_drop", "max_increase")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        return _finite("threshold", value)

    @model_validator(mode="after")
    def _consistent(self) -> MetricCheck:
        where = f"check on {self.metric!r}"
        if not could_match(self.metric) and self.direction is None:
            raise ValueError(f"{where}: no metric of the evaluation can match it (names are case-sensitive); the "
                             f"evaluation produces {', '.join(METRIC_FAMILIES)} (a metric of your own needs an "
                             "explicit direction: higher or lower)")
        if all(v is None for v in (self.min, self.max, self.max_drop, self.max_increase)):
            raise ValueError(f"{where} has no threshold: set at least one of min, max, max_drop, max_increase")
        bounds = value_range(self.metric)
        if bounds is not None:  # a known metric: a threshold it can never reach is a typo
            low, high = bounds
            what = "a rate" if bounds == (0.0, 1.0) else f"in [{low:g}, {high:g}]"
            for key, lo, hi in (("min", low, high), ("max", low, high), ("max_drop", 0.0, high - low),
                                ("max_increase", 0.0, high - low)):
                value = getattr(self, key)
                if value is not None and not lo <= value <= hi:
                    raise ValueError(f"{where}: {key}={value} is outside [{lo:g}, {hi:g}] ({self.metric} is {what})")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"{where}: min={self.min} is above max={self.max}; min must be <= max")
        direction = self.resolved_direction
        for key, wrong in (("max_drop", "lower"), ("max_increase", "higher")):
            if getattr(self, key) is None:
                continue
            if direction is None:
                raise ValueError(f"{where}: {key} needs a direction; set direction: higher or lower "
                                 f"(known metrics: {[p for p, _ in DIRECTIONS]})")
            if direction == wrong:
                other = "max_increase" if key == "max_drop" else "max_drop"
                raise ValueError(f"{where}: {key} is invalid for a metric that is better when {direction}; use {other}")
        return self

    @property
    def resolved_direction(self) -> Direction | None:
        """The explicit direction, else the inferred one."""
        return self.direction or infer_direction(self.metric)

    def tightened(self, margin: float) -> MetricCheck:
        """This check with every threshold made stricter by ``margin`` (a share, like the thresholds): ``min``
        rises, ``max``, ``max_drop`` and ``max_increase`` fall (not below 0). A value that passes it passes the
        original check with at least ``margin`` to spare."""
        if margin < 0 or not math.isfinite(margin):
            raise ValueError(f"margin={margin} is invalid: must be a finite number >= 0")
        lower = {k: max(0.0, v - margin) for k in ("max", "max_drop", "max_increase")
                 if (v := getattr(self, k)) is not None}
        raised = {"min": self.min + margin} if self.min is not None else {}
        return self.model_copy(update=lower | raised)


def _default_checks() -> list[MetricCheck]:
    return [MetricCheck(metric="acc", max_drop=0.02), MetricCheck(metric="asr_lift/*", max=0.05)]


class GateConfig(BaseModel):
    """The ``gate`` section of ``params.yaml``.

    Attributes:
        metrics: metric checks (default: ACC may drop at most 0.02; on every probe, ASR at most 0.05 above the
            rate at which the model sends the same classes' clean images to the target, ``asr_lift/*``).
        required_facts: facts that must be True (default: ONNX parity and fold check passed).
        allow_no_probes: bless without any ASR evidence (default False: no probes means not blessed).
        on_missing: ``error`` raises :class:`MissingMetricError` for a missing metric or fact, ``fail``
            records a failed check instead.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    metrics: list[MetricCheck] = Field(default_factory=_default_checks, min_length=1)
    required_facts: list[str] = Field(default_factory=lambda: ["onnx_parity", "fold_check"])
    allow_no_probes: bool = False
    on_missing: OnMissing = "error"


def _fmt(value: float) -> str:
    return f"{value:.4f}"


def _number(evidence: Mapping[str, Any], name: str, which: str) -> float:
    value = evidence[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{which} metric {name!r} is {value!r}: a gate check needs a number")
    return float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def expand(pattern: str, evidence: Mapping[str, Any]) -> list[str]:
    """Numeric metric names matching ``pattern`` (sorted); a plain name is returned as is, present or not."""
    if not any(ch in pattern for ch in "*?["):
        return [pattern]
    return sorted(name for name, value in evidence.items() if fnmatch.fnmatchcase(name, pattern) and _is_number(value))


def _missing(name: str, kind: CheckKind, metric: str, threshold: float | bool | None, what: str, on_missing: OnMissing) -> CheckResult:
    message = f"{what} is missing from the evidence"
    if on_missing == "error":
        raise MissingMetricError(f"gate check {name!r} needs {message}")
    return CheckResult(name=name, kind=kind, metric=metric, value=None, threshold=threshold,
                       passed=False, reason=f"Failed because {message}.")


def _value_check(metric: str, kind: Literal["min", "max"], value: float, threshold: float) -> CheckResult:
    op = ">=" if kind == "min" else "<="
    if not math.isfinite(value):
        passed, reason = False, f"{metric} is {value}, not a finite number."
    else:
        passed = value >= threshold - TOLERANCE if kind == "min" else value <= threshold + TOLERANCE
        bound = "minimum" if kind == "min" else "maximum"
        verdict = "meets" if passed else "violates"
        reason = f"{metric} is {_fmt(value)}, which {verdict} the {bound} {_fmt(threshold)}."
    return CheckResult(name=f"{metric} {op} {threshold:g}", kind=kind, metric=metric, value=value,
                       threshold=threshold, passed=passed, reason=reason)


def _change_check(metric: str, kind: Literal["max_drop", "max_increase"], value: float, baseline: float,
                  threshold: float) -> CheckResult:
    change = baseline - value if kind == "max_drop" else value - baseline
    word = "drop" if kind == "max_drop" else "increase"
    if not (math.isfinite(value) and math.isfinite(baseline)):
        passed, reason = False, f"{metric} went from {baseline} to {value}; the change is not a finite number."
    else:
        passed = change <= threshold + TOLERANCE
        verdict = "within" if passed else "beyond"
        reason = (f"{metric} went from {_fmt(baseline)} (candidate) to {_fmt(value)}, a {word} of {_fmt(change)}, "
                  f"{verdict} the allowed {word} of {_fmt(threshold)}.")
    return CheckResult(name=f"{metric} {word} <= {threshold:g}", kind=kind, metric=metric, value=value,
                       threshold=threshold, baseline=baseline, passed=passed, reason=reason)


def _not_applied(check: MetricCheck, before: Mapping[str, Any], on_missing: OnMissing) -> CheckResult | None:
    """The record of ``check`` left out by its condition, or None when it applies (no condition, or met)."""
    when = check.when
    if when is None:
        return None
    name = f"{check.metric} (when {when.describe()})"
    if when.metric not in before:
        return _missing(name, "condition", when.metric, None, f"the candidate's metric {when.metric!r} (the condition)",
                        on_missing)
    value = _number(before, when.metric, "candidate")
    if not math.isfinite(value) or when.holds(value):  # a value that cannot be compared lets nothing off
        return None
    missed = when.min if when.min is not None and value < when.min - TOLERANCE else when.max
    return CheckResult(name=name, kind="condition", metric=when.metric, value=value, threshold=missed, passed=True,
                       reason=f"Not applied: the candidate's {when.metric} is {_fmt(value)}, and the check applies "
                              f"only when {when.describe()}.")


def _metric_results(check: MetricCheck, before: Mapping[str, Any], after: Mapping[str, Any],
                    on_missing: OnMissing) -> list[CheckResult]:
    skipped = _not_applied(check, before, on_missing)
    if skipped is not None:
        return [skipped]
    results: list[CheckResult] = []
    matched = expand(check.metric, after)
    probe_family = check.metric.startswith(("asr/", "asr_lift/", "clean_rate/", "robust_acc/"))
    if not matched and probe_family and not expand(PROBE_PATTERN, after):
        return []  # no probe at all: the probes check (allow_no_probes) decides
    if not matched:  # a pattern that matches nothing cannot be evaluated: it never passes by omission
        return [_missing(f"{check.metric} (pattern)", "pattern", check.metric, None,
                         f"every metric matching {check.metric!r} (the hardened model has "
                         f"{', '.join(sorted(k for k, v in after.items() if _is_number(v))) or 'none'})", on_missing)]
    for metric in matched:
        for kind in ("min", "max", "max_drop", "max_increase"):
            threshold = getattr(check, kind)
            if threshold is None:
                continue
            if metric not in after:
                results.append(_missing(f"{metric} {kind}", kind, metric, threshold, f"metric {metric!r} of the hardened model", on_missing))
            elif kind in ("min", "max"):
                results.append(_value_check(metric, kind, _number(after, metric, "hardened"), threshold))  # type: ignore[arg-type]
            elif metric not in before:
                results.append(_missing(f"{metric} {kind}", kind, metric, threshold, f"metric {metric!r} of the candidate (baseline)", on_missing))
            else:
                results.append(_change_check(metric, kind, _number(after, metric, "hardened"),  # type: ignore[arg-type]
                                             _number(before, metric, "candidate"), threshold))
    return results


def _fact_result(name: str, facts: Mapping[str, Any], on_missing: OnMissing) -> CheckResult:
    if name not in facts:
        return _missing(name, "fact", name, True, f"fact {name!r}", on_missing)
    value = facts[name]
    if not isinstance(value, bool):
        raise TypeError(f"fact {name!r} is {value!r}: facts must be True or False")
    reason = f"{name} {'passed' if value else 'did not pass'}."
    return CheckResult(name=name, kind="fact", metric=name, value=value, threshold=True, passed=value, reason=reason)


def _probe_result(after: Mapping[str, Any], allow_no_probes: bool) -> CheckResult:
    probes = expand(PROBE_PATTERN, after)
    if probes:
        reason = f"{len(probes)} attack probe(s) evaluated: {', '.join(p.split('/', 1)[1] for p in probes)}."
        passed = True
    elif allow_no_probes:
        reason, passed = "No attack probe was evaluated; allowed by allow_no_probes, so ASR is not evidenced.", True
    else:
        reason = ("No attack probe was evaluated, so there is no ASR evidence; configure probes or set "
                  "allow_no_probes: true.")
        passed = False
    return CheckResult(name="attack probes evaluated", kind="probes", metric=PROBE_PATTERN, value=float(len(probes)),
                       threshold=None if allow_no_probes else 1.0, passed=passed, reason=reason)


def evaluate_gate(config: GateConfig | Mapping[str, Any], before: Mapping[str, Any], after: Mapping[str, Any],
                  facts: Mapping[str, bool]) -> Blessing:
    """Run every check of ``config`` and return the blessing.

    Args:
        config: a :class:`GateConfig` or the raw ``gate`` mapping (validated here).
        before: metrics of the candidate (baseline of change thresholds).
        after: metrics of the hardened model.
        facts: named booleans, e.g. ``{"onnx_parity": True, "fold_check": True}``.

    Raises:
        pydantic.ValidationError: an invalid raw config (the message names the key and value).
        MissingMetricError: a needed metric or fact is missing and ``on_missing`` is ``error``.
        TypeError: a checked metric is not a number, or a fact is not a bool.
    """
    config = config if isinstance(config, GateConfig) else GateConfig.model_validate(config)
    checks = [_probe_result(after, config.allow_no_probes)]
    for check in config.metrics:
        checks += _metric_results(check, before, after, config.on_missing)
    checks += [_fact_result(name, facts, config.on_missing) for name in config.required_facts]
    failed = [c.name for c in checks if not c.passed]
    skipped = sum(c.kind == "condition" and c.passed for c in checks)
    aside = f" ({skipped} of them not applied: the candidate does not meet their condition)" if skipped else ""
    summary = (f"Blessed: all {len(checks)} checks passed{aside}." if not failed else
               f"Not blessed: {len(failed)} of {len(checks)} checks failed ({'; '.join(failed)}).")
    return Blessing(inputs={}, blessed=not failed, summary=summary, checks=checks,
                    created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
