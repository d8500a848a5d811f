"""The hardening pipeline (KFP v2).

    validate-params -> prepare-data ─┐
                       pull ─────────┴─> purify (GPU) -> fold -> export -> evaluate -> gate -> report -> register
                                                                     └─ dsl.If(blessed) -> move-alias

- ``params.yaml`` is the one pipeline parameter (a string); ``validate-params`` checks it first and passes
  the resolved parameters on as an artifact, so a bad setting fails before any GPU is requested.
- ``purify`` requests an accelerator (type and count configurable) and, through kfp-kubernetes, a node selector
  and tolerations for the GPU node pool.
- Registry steps (``pull``, ``register``, ``move-alias``) retry with backoff and are never cached: the registry
  is outside KFP's view (an alias can move without any input changing).
- Other steps use KFP caching. Note that the *local* runner keys its cache by artifact URI, not content; on a
  cluster, caching keys the component spec and inputs.
"""


from dataclasses import dataclass, field
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components import (evaluate_op, export_op, fold_op, gate_op, move_alias_op, prepare_data_op, pull_op, purify_op,
                        register_op, report_op, validate_params_op)
from components.stages import DEFAULT_IMAGE


@dataclass(frozen=True)
class GpuPlacement:
    """Where the purify task runs on a cluster.

    Attributes:
        accelerator: accelerator resource type (``nvidia.com/gpu``); empty string to run purify on CPU.
        count: accelerators requested (limit).
        node_selector: node labels the pod must match (e.g. ``{"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}``).
        tolerations: taints tolerated, each ``{"key", "operator", "value", "effect"}`` (e.g. the GPU pool's
            ``nvidia.com/gpu=present:NoSchedule``).
    """

    accelerator: str = "nvidia.com/gpu"
    count: int = 1
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])


def build_pipeline(image: str = DEFAULT_IMAGE, gpu: GpuPlacement = GpuPlacement(), retries: int = 3):
    """The pipeline function, with every task in ``image`` and purify placed per ``gpu``."""

    @dsl.pipeline(name="nft-harden", description="Purify a candidate classifier from the MLflow registry with NFT, "
                  "export ONNX, gate promotion on ASR/ACC evidence, register with lineage.")
    def harden_pipeline(params_yaml: str) -> bool:
        checked = validate_params_op(params_yaml=params_yaml).set_display_name("validate-params")
        params = checked.outputs["params"]
        data = prepare_data_op(params=params).set_display_name("prepare-data")
        pulled = pull_op(params=params).set_display_name("pull-candidate")
        pulled.set_caching_options(False).set_retry(num_retries=retries, backoff_duration="10s", backoff_factor=2)
        purified = purify_op(params=params, candidate=pulled.outputs["candidate"],
                             clean=data.outputs["clean"]).set_display_name("purify")
        if gpu.accelerator:
            purified.set_accelerator_type(gpu.accelerator).set_accelerator_limit(gpu.count)
        for key, value in gpu.node_selector.items():
            kubernetes.add_node_selector(purified, label_key=key, label_value=value)
        for t in gpu.tolerations:
            kubernetes.add_toleration(purified, key=t.get("key"), operator=t.get("operator", "Equal"),
                                      value=t.get("value"), effect=t.get("effect"))
        folded = fold_op(candidate=pulled.outputs["candidate"], purified=purified.outputs["purified"],
                         clean=data.outputs["clean"]).set_display_name("fold")
        exported = export_op(params=params, hardened=folded.outputs["hardened"],
                             clean=data.outputs["clean"]).set_display_name("export-onnx")
        evaluated = evaluate_op(params=params, candidate=pulled.outputs["candidate"],
                                purified=purified.outputs["purified"], hardened=folded.outputs["hardened"],
                                onnx_model=exported.outputs["onnx_model"], test=data.outputs["test"])
        evaluated.set_display_name("evaluate")
        gated = gate_op(params=params, evaluation=evaluated.outputs["evaluation"],
                        hardened=folded.outputs["hardened"], onnx_model=exported.outputs["onnx_model"])
        gated.set_display_name("gate")
        reported = report_op(params=params, candidate=pulled.outputs["candidate"],
                             purified=purified.outputs["purified"], hardened=folded.outputs["hardened"],
                             onnx_model=exported.outputs["onnx_model"], evaluation=evaluated.outputs["evaluation"],
                             blessing=gated.outputs["blessing"]).set_display_name("report")
        registered = register_op(params=params, candidate=pulled.outputs["candidate"],
                                 hardened=folded.outputs["hardened"], onnx_model=exported.outputs["onnx_model"],
                                 clean=data.outputs["clean"], test=data.outputs["test"],
                                 purified=purified.outputs["purified"], evaluation=evaluated.outputs["evaluation"],
                                 blessing=gated.outputs["blessing"], report=reported.outputs["report"])
        registered.set_display_name("register").set_caching_options(False)
        registered.set_retry(num_retries=retries, backoff_duration="10s", backoff_factor=2)
        with dsl.If(gated.outputs["Output"] == True, name="blessed"):  # noqa: E712 (a KFP condition, not Python)
            moved = move_alias_op(params=params, version=registered.outputs["Output"])
            moved.set_display_name("move-alias").set_caching_options(False)
            moved.set_retry(num_retries=retries, backoff_duration="10s", backoff_factor=2)
        for task in (checked, data, pulled, purified, folded, exported, evaluated, gated, reported, registered, moved):
            task.set_container_image(image)
        return gated.outputs["Output"]

    return harden_pipeline


def compile_pipeline(out: str | Path, image: str = DEFAULT_IMAGE, gpu: GpuPlacement = GpuPlacement()) -> Path:
    """Write the pipeline's IR YAML (what a KFP cluster runs) to ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(image, gpu), package_path=str(out))
    return out


def run_local(params_yaml: str, pipeline_root: str | Path, *, log: str | Path | None = None) -> bool:
    """Run the whole pipeline with ``kfp.local`` (each component a subprocess of this Python environment).

    With ``log``, the components' output goes to that file and the terminal shows one line per finished task
    (:func:`pipeline.terminal.tasks_to_log`). Returns whether the gate blessed the hardened model. Resource
    requests (GPU) are ignored locally.
    """
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(Path(pipeline_root).resolve()),
               raise_on_error=True)
    if log is None:
        return bool(build_pipeline()(params_yaml=params_yaml).output)
    from pipeline.terminal import tasks_to_log

    try:
        with tasks_to_log(Path(log)):
            return bool(build_pipeline()(params_yaml=params_yaml).output)
    except Exception as err:
        err.add_note(f"the components' output, with the failed task's traceback, is in {log}")
        raise
