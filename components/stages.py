"""The components (see the package docstring). Bodies import inside the function: KFP ships each function's
source to the container on its own. No `from __future__ import annotations` here: KFP reads the
annotations as types."""


from typing import List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

#: Image the components run in unless the pipeline sets another (it does: see pipeline.build_pipeline).
DEFAULT_IMAGE = "nft-harden:0.1.0"

component = dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)


#: Default of a numeric run parameter left unset (KFP's local runner cannot take None defaults; bounds are >= 0).
#: Component signatures write it out as -1.0: KFP ships a component's source alone, without this module.
UNSET = -1.0


@component
def validate_params_op(params_yaml: str, params: Output[Artifact], candidate_model: str = "", tracking_uri: str = "",
                       promote_name: str = "", promote_alias: str = "", purify_method: str = "",
                       max_acc_drop: float = -1.0, max_asr_lift: float = -1.0):
    """Validate params.yaml with the run's overrides (those not empty, bounds not negative) once, up front, and
    hand the resolved parameters to every other component. Inside a cluster an sqlite registry is refused."""
    import os

    from harden.errors import ParamsError
    from harden.integrity import write_json_atomic
    from harden.params import local_tracking_uri, parse_params_with_overrides

    given = {"candidate_model": candidate_model, "tracking_uri": tracking_uri, "promote_name": promote_name,
             "promote_alias": promote_alias,
             "purify_method": purify_method, "max_acc_drop": max_acc_drop, "max_asr_lift": max_asr_lift}
    resolved = parse_params_with_overrides(params_yaml, "params_yaml", {
        k: v for k, v in given.items() if v != "" and not (isinstance(v, float) and v < 0)})
    if os.environ.get("KUBERNETES_SERVICE_HOST") and local_tracking_uri(resolved.base.tracking_uri):
        raise ParamsError(f"tracking_uri {resolved.base.tracking_uri!r} is a file inside this pod: every task "
                          "would open its own empty registry; set tracking_uri to http(s)://HOST:PORT")
    write_json_atomic(params.path, resolved.model_dump(mode="json"))
    params.metadata.update({"defense": resolved.purify.method, "candidate": resolved.candidate.model})


@component
def prepare_data_op(params: Input[Artifact], clean: Output[Dataset], test: Output[Dataset]):
    """Draw the clean set and load the test set (npz files)."""
    from pathlib import Path

    from harden.params import load_params
    from harden.stages import prepare_data

    p = load_params(params.path)
    summary = prepare_data(p.data, p.base.seed, Path(clean.path), Path(test.path))
    clean.metadata.update(summary["clean"])
    test.metadata.update(summary["test"])


@component
def pull_op(params: Input[Artifact], candidate: Output[Model]):
    """Pull the candidate from the MLflow registry and verify its package."""
    from pathlib import Path

    from harden.params import load_params
    from harden.stages import pull_stage

    p = load_params(params.path)
    prov = pull_stage(p.candidate, p.base.tracking_uri, Path(candidate.path))
    candidate.metadata.update({"model_name": prov.model_name, "version": prov.version, "run_id": prov.run_id or "",
                               "source_uri": prov.source_uri, "sha256": prov.package_sha256})


@component
def purify_op(params: Input[Artifact], candidate: Input[Model], clean: Input[Dataset], purified: Output[Artifact],
              metrics: Output[Metrics]):
    """Purify the candidate on the clean set (runs on the GPU node)."""
    from pathlib import Path

    from harden.params import load_params
    from harden.stages import purify_stage

    p = load_params(params.path)
    s = purify_stage(p.purify, p.base, Path(candidate.path), Path(clean.path), Path(purified.path), policy=p.policy,
                     probes=p.probes, gate=p.gate, progress=True)
    purified.metadata.update({"defense": s.defense, "device": s.device or ""})
    metrics.log_metric("purify_wall_time_s", s.wall_time_s)
    metrics.log_metric("clean_samples", s.clean_samples)


@component
def fold_op(candidate: Input[Model], purified: Input[Artifact], clean: Input[Dataset], hardened: Output[Model],
            fold_check: Output[Metrics]) -> bool:
    """Fold the masks into the weights; returns whether the fold check passed."""
    from pathlib import Path

    from harden.stages import fold_stage

    r = fold_stage(Path(candidate.path), Path(purified.path), Path(clean.path), Path(hardened.path))
    fold_check.log_metric("fold_max_abs_diff", r.max_abs_diff)
    hardened.metadata.update({"fold_check": r.passed, "sha256": r.hardened_sha256})
    return r.passed


@component
def export_op(params: Input[Artifact], hardened: Input[Model], clean: Input[Dataset], onnx_model: Output[Model],
              parity: Output[Metrics]) -> bool:
    """Export ONNX and check ONNX Runtime against PyTorch; returns whether parity passed."""
    from pathlib import Path

    from harden.params import load_params
    from harden.stages import export_stage

    p = load_params(params.path)
    r = export_stage(p.export, p.base.seed, Path(hardened.path), Path(clean.path), Path(onnx_model.path))
    onnx_model.metadata.update({"sha256": r.onnx_sha256, "provider": r.provider, "parity": r.passed})
    parity.log_metric("onnx_max_abs_diff", r.max_abs_diff)
    parity.log_metric("onnx_argmax_agreement", r.argmax_agreement)
    return r.passed


@component
def evaluate_op(params: Input[Artifact], candidate: Input[Model], purified: Input[Artifact], hardened: Input[Model],
                onnx_model: Input[Model], test: Input[Dataset], evaluation: Output[Artifact], metrics: Output[Metrics]):
    """Evaluate candidate (PyTorch) and hardened model (ONNX Runtime) on the test set and the probes."""
    from pathlib import Path

    from harden.evaluate import flatten
    from harden.params import load_params
    from harden.stages import evaluate_stage

    p = load_params(params.path)
    m = evaluate_stage(p.probes, p.base.seed, Path(candidate.path), Path(purified.path), Path(hardened.path),
                       Path(onnx_model.path), Path(test.path), Path(evaluation.path), progress=True)
    for side in ("candidate", "hardened"):
        for key, value in flatten(getattr(m, side)).items():
            metrics.log_metric(f"{side}/{key}", value)


@component
def gate_op(params: Input[Artifact], evaluation: Input[Artifact], hardened: Input[Model], onnx_model: Input[Model],
            blessing: Output[Artifact]) -> bool:
    """Apply the promotion gate; returns whether the model is blessed."""
    from pathlib import Path

    from harden.params import load_params
    from harden.stages import gate_stage

    p = load_params(params.path)
    b = gate_stage(p.gate, Path(evaluation.path), Path(hardened.path), Path(onnx_model.path), Path(blessing.path))
    blessing.metadata.update({"blessed": b.blessed, "summary": b.summary})
    return b.blessed


@component
def report_op(params: Input[Artifact], candidate: Input[Model], purified: Input[Artifact], hardened: Input[Model],
              onnx_model: Input[Model], evaluation: Input[Artifact], blessing: Input[Artifact], report: Output[Artifact],
              html: Output[HTML], markdown: Output[Markdown]):
    """Render the reviewer's report (HTML for the KFP UI, Markdown, plots)."""
    import shutil
    from pathlib import Path

    from harden.params import load_params
    from harden.stages import report_stage

    p = load_params(params.path)
    files = report_stage(p, Path(candidate.path), Path(purified.path), Path(hardened.path), Path(onnx_model.path),
                         Path(evaluation.path), Path(blessing.path), Path(report.path))
    shutil.copyfile(files.html, html.path)
    shutil.copyfile(files.markdown, markdown.path)


@component
def register_op(params: Input[Artifact], candidate: Input[Model], hardened: Input[Model], onnx_model: Input[Model],
                clean: Input[Dataset], test: Input[Dataset], purified: Input[Artifact], evaluation: Input[Artifact],
                blessing: Input[Artifact], report: Input[Artifact], registered: Output[Artifact]) -> int:
    """Register the hardened version with its evidence and lineage (the alias is moved by move_alias_op)."""
    from pathlib import Path

    from harden.params import load_params
    from harden.stages import register_stage

    p = load_params(params.path)
    r = register_stage(p, pull_dir=Path(candidate.path), fold_dir=Path(hardened.path),
                       export_dir=Path(onnx_model.path), clean_npz=Path(clean.path), test_npz=Path(test.path),
                       purify_dir=Path(purified.path), evaluate_dir=Path(evaluation.path),
                       gate_dir=Path(blessing.path), report_dir=Path(report.path), out_dir=Path(registered.path),
                       move_alias=False)
    registered.metadata.update(r.model_dump(mode="json", exclude={"inputs"}))
    return r.version


@component
def move_alias_op(params: Input[Artifact], version: int) -> str:
    """Point the serving alias at a blessed version (runs only inside the pipeline's dsl.If on the gate)."""
    from harden.params import load_params
    from harden.registry import move_alias

    p = load_params(params.path)
    move_alias(p.promote.name, version, p.promote.alias, tracking_uri=p.base.tracking_uri)
    return f"models:/{p.promote.name}@{p.promote.alias} -> version {version}"


@component
def fleet_summary_op(models: list, blessed: List[bool], summary: Output[Markdown]) -> bool:
    """The fleet pipeline's verdicts, one row per model (a Markdown table in the KFP UI); returns whether every
    model was blessed."""
    if len(models) != len(blessed):
        raise ValueError(f"{len(models)} models but {len(blessed)} verdicts: the fleet's results are incomplete")
    rows = ["| candidate | hardened model | verdict |", "|---|---|---|"]
    rows += [f"| {m.get('candidate_model', '')} | {m.get('promote_name', '') or '(params_yaml)'} | "
             f"{'blessed' if b else 'REJECTED'} |" for m, b in zip(models, blessed)]
    with open(summary.path, "w") as f:
        f.write("\n".join(rows) + "\n")
    print(f"{len(models)} models: {sum(blessed)} blessed, {len(blessed) - sum(blessed)} rejected")
    return all(blessed)
