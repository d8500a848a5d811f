"""The before/after summary printed by ``nft-harden run`` and ``nft-harden demo``, read back from the registry
(what a reviewer sees in the MLflow UI), so the printout shows what was actually registered."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow import MlflowClient

STATUS_TAG = "hardening.status"
REASONS_TAG = "hardening.reasons"

#: After a rejection: for a failed check on this metric family (as its reason names it), the parameters to look at.
HINTS = {
    "acc ": "clean accuracy fell: purify.lr or purify.epochs lower, or more clean data (data.clean_fraction)",
    "asr_lift/": "a probe's backdoor survived: purify.epochs or purify.adv_share higher, or policy.fallbacks",
    "scan/backdoor_score": "the hardened model still looks backdoored: another purify.method or policy.fallbacks",
    "inverted/": "the reconstructed trigger still works: another purify.method or policy.fallbacks",
    "fold_check": "folding changed the outputs or left non-finite weights: purify.lr lower (runs/fold/fold.json)",
    "onnx_parity": "ONNX Runtime disagrees with PyTorch: export.opset or export.atol (runs/export/parity.json)",
}

#: Rows printed as plain numbers rather than percentages.
PLAIN = frozenset({"scan/backdoor_score"})


@dataclass
class VersionSummary:
    """A registered hardened version: verdict, alias, before/after metrics and where its report is."""

    name: str
    version: int
    status: str
    reasons: str
    alias: str
    alias_version: int | None
    report_uri: str
    rows: list[tuple[str, float | None, float | None]] = field(default_factory=list)


def latest_version_summary(name: str, alias: str, tracking_uri: str) -> VersionSummary:
    """Summarise the newest version of ``name`` from the registry."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise LookupError(f"registered model {name!r} has no versions in {tracking_uri}")
    mv = max(versions, key=lambda v: int(v.version))
    if not mv.run_id:
        raise LookupError(f"version {mv.version} of {name!r} has no run: it was not registered by this step")
    run = client.get_run(mv.run_id)
    metrics = run.data.metrics
    keys = ["acc"] + sorted({k.split("/", 1)[1] for k in metrics
                             if k.startswith(("candidate/asr/", "candidate/asr_lift/", "candidate/robust_acc/"))})
    keys += [k for k in ("inverted/asr", "scan/backdoor_score") if f"candidate/{k}" in metrics]
    rows = [(k, metrics.get(f"candidate/{k}"), metrics.get(f"hardened/{k}")) for k in keys]
    rows.append(("purify wall time (s)", None, metrics.get("purify_wall_time_s")))
    aliases = client.get_registered_model(name).aliases
    return VersionSummary(name=name, version=int(mv.version), status=mv.tags.get(STATUS_TAG, "?"),
                          reasons=mv.tags.get(REASONS_TAG, ""), alias=alias,
                          alias_version=int(aliases[alias]) if alias in aliases else None,
                          report_uri=f"{run.info.artifact_uri}/evidence/report.html", rows=rows)


def render(s: VersionSummary, tracking_uri: str) -> str:
    """A plain-text table and verdict."""
    def fmt(v: float | None, metric: str) -> str:
        if v is None:
            return "-"
        return f"{v:.1f}" if metric.endswith("(s)") else f"{v:.2f}" if metric in PLAIN else f"{100 * v:.2f} %"

    lines = [f"{'metric':<28}{'candidate':>12}{'hardened':>12}", "-" * 52]
    for metric, before, after in s.rows:
        lines.append(f"{metric:<28}{fmt(before, metric):>12}{fmt(after, metric):>12}")
    verdict = "BLESSED" if s.status == "blessed" else s.status.upper()
    lines += ["", f"gate: {verdict}" + (f" ({s.reasons})" if s.reasons else "")]
    hints = [hint for family, hint in HINTS.items() if family in s.reasons]
    if s.status != "blessed" and hints:
        lines.append("what to look at: " + "; ".join(hints))
    lines += [f"registered: models:/{s.name}/{s.version}",
              f"alias: @{s.alias} -> " + (f"version {s.alias_version}" if s.alias_version else "(not set)"),
              f"report: {s.report_uri}", f"registry: {tracking_uri}"]
    page = f"#/models/{s.name}/versions/{s.version}"
    if tracking_uri.startswith("sqlite:///"):
        lines += [f"open it with: mlflow ui --backend-store-uri {tracking_uri}",
                  f"version page: http://127.0.0.1:5000/{page}"]
    else:
        lines.append(f"version page: {tracking_uri.rstrip('/')}/{page}")
    return "\n".join(lines)
