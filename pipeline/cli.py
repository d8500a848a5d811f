"""``nft-harden``, the top of the layers (it drives :mod:`harden`'s stages and this package's Kubeflow pipeline,
and nothing imports it): one command per stage, ``run`` for all of them, ``demo`` for the offline walk-through, and
``pipeline compile|run-local`` for Kubeflow. Every command reads ``params.yaml`` and calls the stage
functions of :mod:`harden.stages`; known failures exit with the codes of :data:`harden.errors.EXIT_CODES`."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from harden.errors import EXIT_CODES, GateRejected, exit_code
from harden.stage_table import STAGES, Stage

_EPILOG = "Exit codes: " + "; ".join(f"{code} = {text}" for code, text in EXIT_CODES.items())
app = typer.Typer(help=__doc__, epilog=_EPILOG, no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False)
pipeline_app = typer.Typer(help="Kubeflow Pipelines: compile the pipeline, or run it locally with kfp.local.",
                           no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")

#: Where the local pipeline run's component output goes, inside the pipeline root.
PIPELINE_LOG = "pipeline.log"

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read")]
RunsOpt = Annotated[Path, typer.Option("--runs", help="directory of the stage outputs")]
DataOpt = Annotated[Path, typer.Option("--data", help="directory of the clean/test npz files")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="exit 10 when the gate rejects the model (for CI)")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="show progress bars")]
HeadlineOpt = Annotated[Path | None, typer.Option(
    "--headline", help="also write the headline metrics (flat, numeric: acc, asr/<probe>, blessed 0/1, purify_s, "
                       "the candidate's as candidate/...) to this JSON file (dvc.yaml: metrics.json)")]


def _command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Map foreseen failures to a one-line error and their exit code; let bugs raise with a traceback."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            return func(*args, **kwargs)
        except Exception as err:
            code = exit_code(err)
            if code is None:
                raise
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code) from err
    return wrapper


def _ctx(params: Path, runs: Path, data: Path, headline: Path | None = None):
    from harden.params import load_params
    from harden.stages import Layout

    return load_params(params), Layout(runs=runs, data=data, headline=headline)


@app.command("check-params")
@_command
def check_params(params: ParamsOpt = Path("params.yaml")) -> None:
    """Validate params.yaml and print the resolved configuration."""
    from harden.params import load_params

    typer.echo(load_params(params).model_dump_json(indent=2))


def _stage_command(stage: Stage) -> None:
    """Register ``nft-harden <stage.command>`` from its entry in the stage table."""
    def invoke(params: Path, runs: Path, data: Path, progress: bool = True, strict: bool = False,
               headline: Path | None = None) -> None:
        p, layout = _ctx(params, runs, data, headline)
        record = stage.call(p, layout, progress)
        typer.echo(stage.describe(record, p, layout))
        if strict and stage.verdict is not None and not stage.verdict(record):
            raise GateRejected(record.summary)

    if stage.progress:
        def command(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"),
                    data: DataOpt = Path("data"), progress: ProgressOpt = True) -> None:
            invoke(params, runs, data, progress=progress)
    elif stage.headline is not None:
        def command(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"),  # type: ignore[misc]
                    data: DataOpt = Path("data"), headline: HeadlineOpt = None) -> None:
            invoke(params, runs, data, headline=headline)
    elif stage.verdict is not None:
        def command(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"),  # type: ignore[misc]
                    data: DataOpt = Path("data"), strict: StrictOpt = False) -> None:
            invoke(params, runs, data, strict=strict)
    else:
        def command(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"),  # type: ignore[misc]
                    data: DataOpt = Path("data")) -> None:
            invoke(params, runs, data)
    command.__doc__ = stage.summary
    command.__name__ = stage.command.replace("-", "_")
    app.command(stage.command)(_command(command))


for _stage in STAGES:
    _stage_command(_stage)


@app.command()
@_command
def run(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"), data: DataOpt = Path("data"),
        with_candidate: Annotated[bool, typer.Option(help="first build and register the offline demo candidate")] = False,
        strict: StrictOpt = False, progress: ProgressOpt = True) -> None:
    """Run every stage in this process, in order (prepare ... promote)."""
    from harden.summary import latest_version_summary, render

    p, layout = _ctx(params, runs, data)
    steps = [stage for stage in STAGES if stage.name != "candidate" or with_candidate]
    timings: list[tuple[str, float]] = []
    for stage in steps:
        typer.secho(f"== {stage.command}", bold=True)
        t0 = time.perf_counter()
        result = stage.call(p, layout, progress)
        timings.append((stage.command, time.perf_counter() - t0))
    typer.echo(render(latest_version_summary(p.promote.name, p.promote.alias, p.base.tracking_uri), p.base.tracking_uri))
    typer.echo("stage wall times: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings)
               + f" (total {sum(s for _, s in timings):.1f}s)")
    if strict and not result.blessed:
        raise GateRejected(result.summary)


@app.command()
@_command
def demo(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"), data: DataOpt = Path("data")) -> None:
    """Offline walk-through: build a backdoored candidate, register it, run the Kubeflow pipeline locally, and
    print what was registered."""
    from harden.stages import make_demo_candidate
    from harden.summary import latest_version_summary, render
    from pipeline.harden_pipeline import run_local

    p, layout = _ctx(params, runs, data)
    t0 = time.perf_counter()
    typer.secho("== 1/2 training a backdoored demo candidate and registering it", bold=True)
    c = make_demo_candidate(p, layout.stage("candidate"))
    typer.echo(f"registered {c['name']} version {c['version']} as @{c['alias']} ({c['attack']} backdoor)")
    log = layout.stage("kfp") / PIPELINE_LOG
    typer.secho(f"== 2/2 running the Kubeflow pipeline locally (kfp.local, one subprocess per component; "
                f"their output: {log})", bold=True)
    run_local(params.read_text(), layout.stage("kfp"), log=log)
    typer.echo("")
    typer.echo(render(latest_version_summary(p.promote.name, p.promote.alias, p.base.tracking_uri), p.base.tracking_uri))
    typer.echo(f"pipeline outputs: {layout.stage('kfp')}   (total {time.perf_counter() - t0:.0f}s)")


ImageOpt = Annotated[str, typer.Option(help="container image of every component (see the Dockerfile)")]
FleetOpt = Annotated[list[str], typer.Option("--fleet-model", help="REF[=HARDENED_NAME]: the fleet pipeline instead, "
                                             "hardening each model given (repeat the option; the name defaults to "
                                             "NAME-hardened)")]


@pipeline_app.command("compile")
@_command
def pipeline_compile(out: Annotated[Path, typer.Option(help="IR YAML to write")] = Path("pipeline.yaml"),
                     params: Annotated[Path, typer.Option("--params", "-p", help="params.yaml: the default of the "
                                                          "run's params_yaml parameter")] = Path("params.yaml"),
                     tracking_uri: Annotated[str | None, typer.Option(help="MLflow server the cluster reaches, "
                                                                      "http(s)://HOST:PORT (default: params.yaml's; "
                                                                      "an sqlite file is refused)")] = None,
                     image: ImageOpt = "nft-harden:0.1.0",
                     gpu: Annotated[str, typer.Option(help="accelerator resource for purify ('' = CPU)")] = "nvidia.com/gpu",
                     gpu_count: Annotated[int, typer.Option(min=1)] = 1,
                     node_selector: Annotated[list[str], typer.Option(help="KEY=VALUE node label for purify")] = [],
                     no_default_toleration: Annotated[bool, typer.Option("--no-default-toleration", help="drop the nvidia.com/gpu:NoSchedule toleration")] = False,
                     mlflow_secret: Annotated[str | None, typer.Option(help="Kubernetes secret with MLFLOW_TRACKING_USERNAME "
                                                                       "and MLFLOW_TRACKING_PASSWORD (registry tasks)")] = None,
                     storage_secret: Annotated[str | None, typer.Option(help="Kubernetes secret with AWS_ACCESS_KEY_ID and "
                                                                        "AWS_SECRET_ACCESS_KEY (tasks reading data or "
                                                                        "registry artifacts)")] = None,
                     fleet_model: FleetOpt = []) -> None:
    """Compile the Kubeflow pipeline to IR YAML (submit it with the KFP UI or kfp.Client)."""
    from harden.errors import ParamsError
    from pipeline.harden_pipeline import GpuPlacement, Secrets, compile_pipeline, fleet_models

    bad = [s for s in node_selector if "=" not in s]
    if bad:
        raise typer.BadParameter(f"--node-selector needs KEY=VALUE, got {bad}")
    placement = GpuPlacement(accelerator=gpu, count=gpu_count, node_selector=dict(s.split("=", 1) for s in node_selector),
                             **({"tolerations": []} if no_default_toleration else {}))
    try:
        text = params.read_text()
    except OSError as err:
        raise ParamsError(f"cannot read {params}: {err.strerror or err}") from err
    written = compile_pipeline(out, image, placement, params_yaml=text, tracking_uri=tracking_uri,
                               secrets=Secrets(mlflow=mlflow_secret, storage=storage_secret),
                               fleet=fleet_models(fleet_model) if fleet_model else None)
    typer.echo(f"wrote {written}")


@pipeline_app.command("run-local")
@_command
def pipeline_run_local(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"),
                       strict: StrictOpt = False, fleet_model: FleetOpt = []) -> None:
    """Run the whole pipeline with kfp.local against the registry in params.yaml (with --fleet-model, the fleet
    pipeline over those models)."""
    from harden.params import load_params
    from harden.summary import latest_version_summary, render
    from pipeline.harden_pipeline import fleet_models, run_local

    p = load_params(params)
    fleet = fleet_models(fleet_model) if fleet_model else None
    log = runs / "kfp" / PIPELINE_LOG
    typer.echo(f"running the {'fleet ' if fleet else ''}pipeline with kfp.local; the components' output goes to {log}")
    blessed = run_local(params.read_text(), runs / "kfp", log=log, fleet=fleet)
    for name in [m["promote_name"] for m in fleet] if fleet else [p.promote.name]:
        typer.echo(render(latest_version_summary(name, p.promote.alias, p.base.tracking_uri), p.base.tracking_uri))
    if strict and not blessed:
        raise GateRejected("the gate rejected a hardened model (see the registered version's reasons)")


def main() -> None:
    app()
