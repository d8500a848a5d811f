"""The hardening pipeline (KFP v2).

    validate-params -> prepare-data ─┐
                       pull ─────────┴─> purify (GPU) -> fold -> export -> evaluate -> gate -> report -> register
                                                                     └─ dsl.If(blessed) -> move-alias

- Run parameters: ``params_yaml`` (the whole parameter file; its default is the ``params.yaml`` the pipeline
  was compiled with) and, beside it, the settings a run most often changes (:data:`harden.params.OVERRIDES`:
  the model reference, tracking URI, alias, purify method and the gate's two main bounds). An override left
  empty keeps what ``params_yaml`` says. ``validate-params`` checks the result first and passes the resolved
  parameters on as an artifact, so a bad setting fails before any GPU is requested; inside a cluster it also
  refuses an sqlite tracking URI (each pod would open its own empty registry).
- Every task requests CPU and memory (:data:`RESOURCES`); ``purify`` also requests an accelerator (type and
  count configurable) and, through kfp-kubernetes, a node selector and tolerations for the GPU node pool.
- Credentials come from Kubernetes secrets (:class:`Secrets`, kfp-kubernetes), as environment variables of the
  tasks that need them: MLflow's on the registry tasks, the object store's on the tasks that read data or
  registry artifacts (``s3://`` and ``gs://`` data specs are read through fsspec).
- Registry steps (``pull``, ``register``, ``move-alias``) retry with backoff and are never cached: the registry
  is outside KFP's view (an alias can move without any input changing).
- Other steps use KFP caching. Note that the *local* runner keys its cache by artifact URI, not content; on a
  cluster, caching keys the component spec and inputs.
"""


import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kfp import compiler, dsl, kubernetes

from components import (evaluate_op, export_op, fleet_summary_op, fold_op, gate_op, move_alias_op, prepare_data_op,
                        pull_op, purify_op, register_op, report_op, validate_params_op)
from components.stages import DEFAULT_IMAGE, UNSET
from harden.integrity import write_bytes_atomic


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


@dataclass(frozen=True)
class Resources:
    """CPU and memory a task requests, as Kubernetes quantities (``"500m"``, ``"4"``; ``"2G"``); the memory is
    also its limit (a task over it is killed, not its node)."""

    cpu: str
    memory: str


#: Requests per task (display name); tasks not named get :data:`DEFAULT_RESOURCES`. Purify trains on the
#: clean set, evaluate runs the adversarial scan and the trigger reconstruction (both CPU-heavy off the GPU).
RESOURCES: dict[str, Resources] = {
    "purify": Resources(cpu="4", memory="16G"),
    "evaluate": Resources(cpu="4", memory="8G"),
    "export-onnx": Resources(cpu="2", memory="4G"),
    "prepare-data": Resources(cpu="1", memory="4G"),
    "report": Resources(cpu="1", memory="4G"),
}
DEFAULT_RESOURCES = Resources(cpu="1", memory="2G")


@dataclass(frozen=True)
class Secrets:
    """Kubernetes secrets mounted as environment variables (kfp-kubernetes ``use_secret_as_env``).

    Attributes:
        mlflow: secret holding ``mlflow_keys`` (MLflow reads them as its tracking credentials); set on the tasks
            that talk to the registry (pull, register, move-alias).
        storage: secret holding ``storage_keys`` (credentials of the object store behind ``s3://``/``gs://``
            data specs and MLflow's artifact store); set on prepare-data, pull, register and move-alias.
        mlflow_keys: keys of the ``mlflow`` secret, each becoming the environment variable of the same name.
        storage_keys: keys of the ``storage`` secret, likewise.
    """

    mlflow: str | None = None
    storage: str | None = None
    mlflow_keys: tuple[str, ...] = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    storage_keys: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def _place(task: dsl.PipelineTask, name: str, image: str) -> dsl.PipelineTask:
    """Name the task and run it in ``image`` with its CPU and memory requests (:data:`RESOURCES`)."""
    need = RESOURCES.get(name, DEFAULT_RESOURCES)
    task.set_display_name(name).set_container_image(image)
    task.set_cpu_request(need.cpu).set_memory_request(need.memory).set_memory_limit(need.memory)
    return task


def build_pipeline(image: str = DEFAULT_IMAGE, gpu: GpuPlacement = GpuPlacement(), retries: int = 3, *,
                   params_yaml: str = "", tracking_uri: str | None = None, secrets: Secrets = Secrets()):
    """The pipeline function, with every task in ``image``, purify placed per ``gpu``, ``params_yaml`` as the
    default of the run parameter of that name (empty: a run that gives none fails validation) and
    ``tracking_uri`` as the default of that override."""

    @dsl.pipeline(name="nft-harden", description="Purify a candidate classifier from the MLflow registry with NFT, "
                  "export ONNX, gate promotion on ASR/ACC evidence, register with lineage.")
    def harden_pipeline(params_yaml: str = params_yaml, candidate_model: str = "", tracking_uri: str = tracking_uri or "",
                        promote_name: str = "", promote_alias: str = "", purify_method: str = "",
                        max_acc_drop: float = UNSET, max_asr_lift: float = UNSET) -> bool:
        """Harden one candidate. Overrides left empty (a bound left negative) keep what params_yaml says.

        Args:
            params_yaml: the whole params.yaml (every stage's settings); the fields below override it.
            candidate_model: what to harden, models:/NAME@ALIAS or models:/NAME/VERSION (empty: params_yaml's).
            tracking_uri: MLflow tracking/registry URI, http(s)://HOST:PORT on a cluster (empty: params_yaml's).
            promote_name: registered model receiving the hardened version (empty: params_yaml's).
            promote_alias: alias the hardened version gets when blessed (empty: params_yaml's).
            purify_method: nft, ft, fp, anp, ft_sam, pbe or fip at its defaults (empty: params_yaml's).
            max_acc_drop: largest clean-accuracy drop the gate accepts, e.g. 0.03 (negative: params_yaml's).
            max_asr_lift: largest ASR above the model's own rate on clean images, e.g. 0.05 (negative: params_yaml's).
        """
        def place(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
            return _place(task, name, image)

        checked = place(validate_params_op(params_yaml=params_yaml, candidate_model=candidate_model,
                                           tracking_uri=tracking_uri, promote_name=promote_name,
                                           promote_alias=promote_alias,
                                           purify_method=purify_method, max_acc_drop=max_acc_drop,
                                           max_asr_lift=max_asr_lift), "validate-params")
        params = checked.outputs["params"]
        data = place(prepare_data_op(params=params), "prepare-data")
        pulled = place(pull_op(params=params), "pull-candidate")
        pulled.set_caching_options(False).set_retry(num_retries=retries, backoff_duration="10s", backoff_factor=2)
        purified = place(purify_op(params=params, candidate=pulled.outputs["candidate"],
                                   clean=data.outputs["clean"]), "purify")
        if gpu.accelerator:
            purified.set_accelerator_type(gpu.accelerator).set_accelerator_limit(gpu.count)
        for key, value in gpu.node_selector.items():
            kubernetes.add_node_selector(purified, label_key=key, label_value=value)
        for t in gpu.tolerations:
            kubernetes.add_toleration(purified, key=t.get("key"), operator=t.get("operator", "Equal"),
                                      value=t.get("value"), effect=t.get("effect"))
        folded = place(fold_op(candidate=pulled.outputs["candidate"], purified=purified.outputs["purified"],
                               clean=data.outputs["clean"]), "fold")
        exported = place(export_op(params=params, hardened=folded.outputs["hardened"],
                                   clean=data.outputs["clean"]), "export-onnx")
        evaluated = evaluate_op(params=params, candidate=pulled.outputs["candidate"],
                                purified=purified.outputs["purified"], hardened=folded.outputs["hardened"],
                                onnx_model=exported.outputs["onnx_model"], test=data.outputs["test"])
        place(evaluated, "evaluate")
        gated = gate_op(params=params, evaluation=evaluated.outputs["evaluation"],
                        hardened=folded.outputs["hardened"], onnx_model=exported.outputs["onnx_model"])
        place(gated, "gate")
        reported = place(report_op(params=params, candidate=pulled.outputs["candidate"],
                                   purified=purified.outputs["purified"], hardened=folded.outputs["hardened"],
                                   onnx_model=exported.outputs["onnx_model"],
                                   evaluation=evaluated.outputs["evaluation"], blessing=gated.outputs["blessing"]),
                         "report")
        registered = register_op(params=params, candidate=pulled.outputs["candidate"],
                                 hardened=folded.outputs["hardened"], onnx_model=exported.outputs["onnx_model"],
                                 clean=data.outputs["clean"], test=data.outputs["test"],
                                 purified=purified.outputs["purified"], evaluation=evaluated.outputs["evaluation"],
                                 blessing=gated.outputs["blessing"], report=reported.outputs["report"])
        place(registered, "register").set_caching_options(False)
        registered.set_retry(num_retries=retries, backoff_duration="10s", backoff_factor=2)
        with dsl.If(gated.outputs["Output"] == True, name="blessed"):  # noqa: E712 (a KFP condition, not Python)
            moved = move_alias_op(params=params, version=registered.outputs["Output"])
            place(moved, "move-alias").set_caching_options(False)
            moved.set_retry(num_retries=retries, backoff_duration="10s", backoff_factor=2)
        for secret, keys, users in ((secrets.mlflow, secrets.mlflow_keys, (pulled, registered, moved)),
                                    (secrets.storage, secrets.storage_keys, (data, pulled, registered, moved))):
            for task in users if secret else ():
                kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={k: k for k in keys})
        return gated.outputs["Output"]

    return harden_pipeline


def build_fleet_pipeline(image: str = DEFAULT_IMAGE, gpu: GpuPlacement = GpuPlacement(), retries: int = 3, *,
                         params_yaml: str = "", tracking_uri: str | None = None, secrets: Secrets = Secrets(),
                         models: list[dict[str, str]] | None = None, parallelism: int = 2):
    """The fleet pipeline: the hardening pipeline once per model, at most ``parallelism`` at a time
    (``dsl.ParallelFor``), then a summary of every verdict.

    ``models`` (the default of the run parameter of that name) lists ``{"candidate_model": REF,
    "promote_name": NAME}``: each candidate's hardened versions go to their own registered model.
    """
    harden = build_pipeline(image, gpu, retries, params_yaml=params_yaml, tracking_uri=tracking_uri, secrets=secrets)

    @dsl.pipeline(name="nft-harden-fleet", description="Harden several candidates from the MLflow registry, each "
                  "with the nft-harden pipeline, and summarise the verdicts.")
    def fleet_pipeline(models: list = list(models or []), params_yaml: str = params_yaml,
                       tracking_uri: str = tracking_uri or "") -> bool:
        """Harden every model of ``models``; the output says whether every one was blessed.

        Args:
            models: [{"candidate_model": "models:/NAME@ALIAS", "promote_name": "NAME-hardened"}, ...].
            params_yaml: the whole params.yaml, shared by every model (its candidate and promote name are
                replaced by each item's).
            tracking_uri: MLflow tracking/registry URI, http(s)://HOST:PORT on a cluster (empty: params_yaml's).
        """
        with dsl.ParallelFor(items=models, parallelism=parallelism, name="each-model") as item:
            one = harden(params_yaml=params_yaml, tracking_uri=tracking_uri, candidate_model=item.candidate_model,
                         promote_name=item.promote_name)
        summary = _place(fleet_summary_op(models=models, blessed=dsl.Collected(one.output)), "fleet-summary", image)
        return summary.outputs["Output"]

    return fleet_pipeline


def fleet_models(specs: list[str]) -> list[dict[str, str]]:
    """``REF`` or ``REF=HARDENED_NAME`` strings as fleet items; the name defaults to the candidate's name plus
    ``-hardened`` (``models:/fraud@candidate`` -> ``fraud-hardened``)."""
    from harden.errors import ParamsError
    from harden.params import MODEL_REF

    items = []
    for spec in specs:
        ref, _, name = spec.partition("=")
        match = MODEL_REF.match(ref)
        if match is None:
            raise ParamsError(f"fleet model {ref!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
        items.append({"candidate_model": ref, "promote_name": name or f"{match['name']}-hardened"})
    names = [i["promote_name"] for i in items]
    if len(set(names)) != len(names):
        raise ParamsError(f"two fleet models would register into the same hardened model: {names}")
    return items


def compile_pipeline(out: str | Path, image: str = DEFAULT_IMAGE, gpu: GpuPlacement = GpuPlacement(), *,
                     params_yaml: str, tracking_uri: str | None = None, secrets: Secrets = Secrets(),
                     fleet: list[dict[str, str]] | None = None) -> Path:
    """Write the pipeline's IR YAML (what a KFP cluster runs) to ``out``, with ``params_yaml`` (validated here)
    as the default of the run parameter and ``tracking_uri`` overriding its registry; with ``fleet`` (items of
    :func:`fleet_models`), the fleet pipeline with those models as its default.

    Raises:
        ParamsError: ``params_yaml`` is invalid, or the registry it ends up with is an sqlite file (each pod of
            a cluster run would open its own empty one).
    """
    from harden.errors import ParamsError
    from harden.params import local_tracking_uri, parse_params_with_overrides

    resolved = parse_params_with_overrides(params_yaml, "params_yaml", {"tracking_uri": tracking_uri})
    if local_tracking_uri(resolved.base.tracking_uri):
        raise ParamsError(f"tracking_uri {resolved.base.tracking_uri!r} is a file on this machine: every pod of a "
                          "cluster run would open its own empty registry; compile with --tracking-uri "
                          "http(s)://HOST:PORT (an mlflow server the cluster reaches)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fleet is None:
        pipeline = build_pipeline(image, gpu, params_yaml=params_yaml, tracking_uri=tracking_uri, secrets=secrets)
    else:
        pipeline = build_fleet_pipeline(image, gpu, params_yaml=params_yaml, tracking_uri=tracking_uri,
                                        secrets=secrets, models=fleet)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw = Path(tmp) / out.name
        compiler.Compiler().compile(pipeline, package_path=str(raw))
        text = _comment_header(raw.read_text())
        spec = next(yaml.safe_load_all(text))
        if spec["root"]["inputDefinitions"]["parameters"]["params_yaml"].get("defaultValue") != params_yaml:
            raise RuntimeError(f"the compiled pipeline does not carry params_yaml as its default ({out})")
        write_bytes_atomic(out, text.encode())
    return out


def _comment_header(text: str) -> str:
    """KFP's compiler lists the pipeline's inputs with their defaults in a comment header, and a multi-line
    default (``params_yaml``'s) breaks out of the comment, leaving the file unreadable as YAML (kfp 2.17). Turn
    the header's stray lines back into comments; the spec itself starts at its first key, ``components:``."""
    lines = text.split("\n")
    end = lines.index("components:")
    return "\n".join([line if line.startswith("#") else "#  " + line for line in lines[:end]] + lines[end:])


def run_local(params_yaml: str, pipeline_root: str | Path, *, log: str | Path | None = None,
              overrides: dict[str, str | float] | None = None, fleet: list[dict[str, str]] | None = None) -> bool:
    """Run the whole pipeline with ``kfp.local`` (each component a subprocess of this Python environment).

    ``overrides`` are run parameters beside ``params_yaml`` (:data:`harden.params.OVERRIDES`); with ``fleet``
    (items of :func:`fleet_models`) the fleet pipeline runs instead (``overrides`` may then only name
    ``tracking_uri``). With ``log``, the components' output goes to that file and the terminal shows one line
    per finished task (:func:`pipeline.terminal.tasks_to_log`). Returns whether the gate blessed the hardened
    model (with ``fleet``: every model). Resource requests (GPU, CPU, memory) and secrets are ignored locally.
    """
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(Path(pipeline_root).resolve()),
               raise_on_error=True)
    arguments: dict[str, object] = {"params_yaml": params_yaml, **(overrides or {})}
    if fleet is not None:
        pipeline, arguments["models"] = build_fleet_pipeline(parallelism=1), fleet
    else:
        pipeline = build_pipeline()

    def run() -> bool:
        return bool(pipeline(**arguments).output)

    if log is None:
        return run()
    from pipeline.terminal import tasks_to_log

    try:
        with tasks_to_log(Path(log)):
            return run()
    except Exception as err:
        err.add_note(f"the components' output, with the failed task's traceback, is in {log}")
        raise
