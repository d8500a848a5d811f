"""``nft-harden``: one command per stage, ``run`` for all of them, ``demo`` for the offline walk-through, and
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

from harden.errors import EXIT_CODES, DataError, GateRejected

_EPILOG = "Exit codes: " + "; ".join(f"{code} = {text}" for code, text in EXIT_CODES.items())
app = typer.Typer(help=__doc__, epilog=_EPILOG, no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False)
pipeline_app = typer.Typer(help="Kubeflow Pipelines: compile the pipeline, or run it locally with kfp.local.",
                           no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read")]
RunsOpt = Annotated[Path, typer.Option("--runs", help="directory of the stage outputs")]
DataOpt = Annotated[Path, typer.Option("--data", help="directory of the clean/test npz files")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="exit 10 when the gate rejects the model (for CI)")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="show progress bars")]


def exit_code(err: BaseException) -> int | None:
    """The documented exit code of a foreseen failure, None for anything else."""
    from harden.evaluate import ProbeError
    from harden.package import PackageError
    from harden.params import ParamsError
    from harden.registry import RegistryError

    for kind, code in ((ParamsError, 2), (PackageError, 3), (RegistryError, 4), (DataError, 5), (ProbeError, 6),
                       (GateRejected, 10)):
        if isinstance(err, kind):
            return code
    return None


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


def _ctx(params: Path, runs: Path, data: Path):
    from harden.params import load_params
    from harden.stages import Layout

    return load_params(params), Layout(runs=runs, data=data)


@app.command("check-params")
@_command
def check_params(params: ParamsOpt = Path("params.yaml")) -> None:
    """Validate params.yaml and print the resolved configuration."""
    from harden.params import load_params

    typer.echo(load_params(params).model_dump_json(indent=2))


@app.command()
@_command
def prepare(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"), data: DataOpt = Path("data")) -> None:
    """Draw the clean set and the test set (data/clean.npz, data/test.npz)."""
    from harden.stages import prepare_data

    p, layout = _ctx(params, runs, data)
    summary = prepare_data(p.data, p.base.seed, layout.clean, layout.test)
    typer.echo(f"clean set: {summary['clean']['n']} images -> {layout.clean}; test set: {summary['test']['n']} images -> {layout.test}")


@app.command("make-candidate")
@_command
def make_candidate(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"), data: DataOpt = Path("data"),
                   progress: ProgressOpt = True) -> None:
    """Train a backdoored demo candidate on the offline data and register it as candidate.model."""
    from harden.stages import make_demo_candidate

    p, layout = _ctx(params, runs, data)
    s = make_demo_candidate(p, layout.stage("candidate"), progress=progress)
    if "skipped" in s:
        typer.echo(f"skipped: {s['skipped']}")
        return
    typer.echo(f"registered {s['name']} version {s['version']} as @{s['alias']} ({s['attack']} backdoor, "
               f"{s['train_images']} training images) in {p.base.tracking_uri}")


@app.command()
@_command
def pull(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"), data: DataOpt = Path("data")) -> None:
    """Pull candidate.model from the registry and verify the package."""
    from harden.stages import pull_stage

    p, layout = _ctx(params, runs, data)
    prov = pull_stage(p.candidate, p.base.tracking_uri, layout.stage("pull"))
    typer.echo(f"pulled {prov.model_name} version {prov.version} -> {layout.stage('pull')}")


@app.command()
@_command
def purify(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"), data: DataOpt = Path("data"),
           progress: ProgressOpt = True) -> None:
    """Purify the pulled candidate on the clean set (NFT or another defense)."""
    from harden.stages import purify_stage

    p, layout = _ctx(params, runs, data)
    s = purify_stage(p.nft, p.base, layout.stage("pull"), layout.clean, layout.stage("purify"), progress=progress)
    typer.echo(f"{s['defense']}: {s['wall_time_s']:.1f}s on {s['clean_samples']} clean images -> {layout.stage('purify')}")


@app.command()
@_command
def fold(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"), data: DataOpt = Path("data")) -> None:
    """Fold the masks into the weights and check the folded model."""
    from harden.stages import fold_stage

    _, layout = _ctx(params, runs, data)
    r = fold_stage(layout.stage("pull"), layout.stage("purify"), layout.clean, layout.stage("fold"))
    typer.echo(f"fold check {'passed' if r['passed'] else 'FAILED'} (max |diff| {r['max_abs_diff']}) -> {layout.stage('fold')}")


@app.command()
@_command
def export(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"), data: DataOpt = Path("data")) -> None:
    """Export the hardened model to ONNX and check it against PyTorch with ONNX Runtime."""
    from harden.stages import export_stage

    p, layout = _ctx(params, runs, data)
    r = export_stage(p.export, p.base.seed, layout.stage("fold"), layout.clean, layout.stage("export"))
    typer.echo(f"ONNX parity {'passed' if r['passed'] else 'FAILED'}: max |diff| {r['max_abs_diff']:.2e}, "
               f"argmax agreement {r['argmax_agreement']:.4f} on {r['provider']} -> {layout.stage('export')}")


@app.command()
@_command
def evaluate(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"), data: DataOpt = Path("data")) -> None:
    """Evaluate the candidate (PyTorch) and the hardened ONNX model on the test set and every probe."""
    from harden.stages import evaluate_stage

    p, layout = _ctx(params, runs, data)
    m = evaluate_stage(p.probes, p.base.seed, layout.stage("pull"), layout.stage("purify"), layout.stage("fold"),
                       layout.stage("export"), layout.test, layout.stage("evaluate"))
    typer.echo(f"ACC {m['candidate']['acc']:.4f} -> {m['hardened']['acc']:.4f}; metrics -> {layout.stage('evaluate')}")


@app.command()
@_command
def gate(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"), data: DataOpt = Path("data"),
         strict: StrictOpt = False) -> None:
    """Apply the promotion gate and write blessing.json."""
    from harden.stages import gate_stage

    p, layout = _ctx(params, runs, data)
    b = gate_stage(p.gate, layout.stage("evaluate"), layout.stage("fold"), layout.stage("export"), layout.stage("gate"))
    typer.echo(b.summary)
    if strict and not b.blessed:
        raise GateRejected(b.summary)


@app.command()
@_command
def report(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"), data: DataOpt = Path("data")) -> None:
    """Render the HTML/Markdown report and plots."""
    from harden.stages import report_stage

    p, layout = _ctx(params, runs, data)
    files = report_stage(p, layout.stage("pull"), layout.stage("purify"), layout.stage("evaluate"),
                         layout.stage("gate"), layout.stage("report"))
    typer.echo(f"report: {files.html} and {files.markdown}")


@app.command()
@_command
def promote(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"), data: DataOpt = Path("data"),
            strict: StrictOpt = False) -> None:
    """Register the hardened version with its evidence; move the alias only if the gate blessed it."""
    p, layout = _ctx(params, runs, data)
    r = _register(p, layout)
    typer.echo(f"registered {r['name']} version {r['version']} ({r['status']})"
               + (f"; @{r['alias']} -> version {r['version']}" if r["alias_moved"] else f"; @{r['alias']} unchanged"))
    if strict and not r["blessed"]:
        raise GateRejected(r["summary"])


def _register(p, layout) -> dict:
    from harden.stages import register_stage

    return register_stage(p, pull_dir=layout.stage("pull"), fold_dir=layout.stage("fold"),
                          export_dir=layout.stage("export"), clean_npz=layout.clean, test_npz=layout.test,
                          purify_dir=layout.stage("purify"), evaluate_dir=layout.stage("evaluate"),
                          gate_dir=layout.stage("gate"), report_dir=layout.stage("report"),
                          out_dir=layout.stage("promote"))


@app.command()
@_command
def run(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"), data: DataOpt = Path("data"),
        with_candidate: Annotated[bool, typer.Option(help="first build and register the offline demo candidate")] = False,
        strict: StrictOpt = False, progress: ProgressOpt = True) -> None:
    """Run every stage in this process, in order (prepare ... promote)."""
    from harden import stages
    from harden.summary import latest_version_summary, render

    p, layout = _ctx(params, runs, data)
    steps = [("prepare", lambda: stages.prepare_data(p.data, p.base.seed, layout.clean, layout.test))]
    if with_candidate:
        steps.append(("make-candidate", lambda: stages.make_demo_candidate(p, layout.stage("candidate"), progress=progress)))
    steps += [
        ("pull", lambda: stages.pull_stage(p.candidate, p.base.tracking_uri, layout.stage("pull"))),
        ("purify", lambda: stages.purify_stage(p.nft, p.base, layout.stage("pull"), layout.clean,
                                               layout.stage("purify"), progress=progress)),
        ("fold", lambda: stages.fold_stage(layout.stage("pull"), layout.stage("purify"), layout.clean, layout.stage("fold"))),
        ("export", lambda: stages.export_stage(p.export, p.base.seed, layout.stage("fold"), layout.clean,
                                               layout.stage("export"))),
        ("evaluate", lambda: stages.evaluate_stage(p.probes, p.base.seed, layout.stage("pull"), layout.stage("purify"),
                                                   layout.stage("fold"), layout.stage("export"), layout.test,
                                                   layout.stage("evaluate"))),
        ("gate", lambda: stages.gate_stage(p.gate, layout.stage("evaluate"), layout.stage("fold"),
                                           layout.stage("export"), layout.stage("gate"))),
        ("report", lambda: stages.report_stage(p, layout.stage("pull"), layout.stage("purify"),
                                               layout.stage("evaluate"), layout.stage("gate"), layout.stage("report"))),
        ("promote", lambda: _register(p, layout)),
    ]
    timings: list[tuple[str, float]] = []
    for name, step in steps:
        typer.secho(f"== {name}", bold=True)
        t0 = time.perf_counter()
        result = step()
        timings.append((name, time.perf_counter() - t0))
    typer.echo(render(latest_version_summary(p.promote.name, p.promote.alias, p.base.tracking_uri), p.base.tracking_uri))
    typer.echo("stage wall times: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings)
               + f" (total {sum(s for _, s in timings):.1f}s)")
    if strict and not result["blessed"]:
        raise GateRejected(result["summary"])


@app.command()
@_command
def demo(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"), data: DataOpt = Path("data")) -> None:
    """Offline walk-through: build a backdoored candidate, register it, run the Kubeflow pipeline locally, and
    print what was registered."""
    from harden.stages import make_demo_candidate
    from harden.summary import latest_version_summary, render
    from pipeline import run_local

    p, layout = _ctx(params, runs, data)
    t0 = time.perf_counter()
    typer.secho("== 1/2 training a backdoored demo candidate and registering it", bold=True)
    c = make_demo_candidate(p, layout.stage("candidate"))
    typer.echo(f"registered {c['name']} version {c['version']} as @{c['alias']} ({c['attack']} backdoor)")
    typer.secho("== 2/2 running the Kubeflow pipeline locally (kfp.local, one subprocess per component)", bold=True)
    run_local(params.read_text(), layout.stage("kfp"))
    typer.echo("")
    typer.echo(render(latest_version_summary(p.promote.name, p.promote.alias, p.base.tracking_uri), p.base.tracking_uri))
    typer.echo(f"pipeline outputs: {layout.stage('kfp')}   (total {time.perf_counter() - t0:.0f}s)")


ImageOpt = Annotated[str, typer.Option(help="container image of every component (see the Dockerfile)")]


@pipeline_app.command("compile")
@_command
def pipeline_compile(out: Annotated[Path, typer.Option(help="IR YAML to write")] = Path("pipeline.yaml"),
                     image: ImageOpt = "nft-harden:0.1.0",
                     gpu: Annotated[str, typer.Option(help="accelerator resource for purify ('' = CPU)")] = "nvidia.com/gpu",
                     gpu_count: Annotated[int, typer.Option(min=1)] = 1,
                     node_selector: Annotated[list[str], typer.Option(help="KEY=VALUE node label for purify")] = [],
                     no_default_toleration: Annotated[bool, typer.Option(help="drop the nvidia.com/gpu:NoSchedule toleration")] = False) -> None:
    """Compile the Kubeflow pipeline to IR YAML (submit it with the KFP UI or kfp.Client)."""
    from pipeline import GpuPlacement, compile_pipeline

    bad = [s for s in node_selector if "=" not in s]
    if bad:
        raise typer.BadParameter(f"--node-selector needs KEY=VALUE, got {bad}")
    placement = GpuPlacement(accelerator=gpu, count=gpu_count, node_selector=dict(s.split("=", 1) for s in node_selector),
                             **({"tolerations": []} if no_default_toleration else {}))
    typer.echo(f"wrote {compile_pipeline(out, image, placement)}")


@pipeline_app.command("run-local")
@_command
def pipeline_run_local(params: ParamsOpt = Path("params.yaml"), runs: RunsOpt = Path("runs"),
                       strict: StrictOpt = False) -> None:
    """Run the whole pipeline with kfp.local against the registry in params.yaml."""
    from harden.params import load_params
    from harden.summary import latest_version_summary, render
    from pipeline import run_local

    p = load_params(params)
    blessed = run_local(params.read_text(), runs / "kfp")
    typer.echo(render(latest_version_summary(p.promote.name, p.promote.alias, p.base.tracking_uri), p.base.tracking_uri))
    if strict and not blessed:
        raise GateRejected("the gate rejected the hardened model (see the registered version's reasons)")


def main() -> None:
    app()
