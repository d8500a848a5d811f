"""``nft-harden``: one command per stage, ``run`` for all of them, ``demo`` for the offline walk-through, and
``pipeline compile|run-local`` for Kubeflow. Every command reads ``params.yaml`` and calls the stage
functions of :mod:`harden.stages`; known failures exit with the codes of :data:`harden.errors.EXIT_CODES`."""

from __future__ import annotations

import functools
import logging
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


def main() -> None:
    app()
