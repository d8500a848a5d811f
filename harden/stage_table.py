"""The one table of the hardening step's stages.

Each :class:`Stage` names what it reads (stage outputs and data files, as paths under the repository's layout),
what it writes, the ``params.yaml`` sections it reads, the code whose change must re-run it, and how to call it.
The CLI's per-stage commands and ``nft-harden run`` are generated from :data:`STAGES`; ``tests/test_stage_table.py``
checks ``dvc.yaml`` (deps, params, outputs of every stage) and the Kubeflow pipeline's task graph against it.
Adding a stage is one entry here plus its function in :mod:`harden.stages` (and its component, for Kubeflow).

This module imports neither torch nor the stage code: calling a stage imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harden.params import Params
    from harden.stages import Layout

#: Code every stage runs through (stage functions and the records that chain their outputs).
STAGE_CODE = ("harden/stages.py", "harden/records.py")


@dataclass(frozen=True)
class Stage:
    """One stage.

    Attributes:
        name: the DVC stage name (``dvc repro NAME``).
        command: the ``nft-harden`` command.
        summary: one line, the command's help.
        reads: stage outputs and data files it reads (paths relative to the repository, default layout).
        writes: what it writes (the DVC ``outs``/``metrics``).
        params: ``params.yaml`` sections (or ``section.key``) it reads.
        code: source paths whose change must re-run it (besides :data:`STAGE_CODE`).
        call: ``call(params, layout, progress)`` runs it and returns its record.
        describe: the line the CLI prints about the record.
        kfp_task: the Kubeflow component's task name (None: not a pipeline task).
        progress: the command has ``--progress/--no-progress``.
        verdict: the command has ``--strict``: exit 10 unless ``verdict(record)`` (the gate blessed the model).
        uncached: DVC outputs that are not cached (``cache: false``).
        metrics: DVC metrics files among ``writes``.
        headline: the headline metrics file ``dvc.yaml``'s command asks for (``--headline PATH``, an option of
            this command only; the CLI writes it only when asked), among ``metrics``.
    """

    name: str
    command: str
    summary: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    params: tuple[str, ...]
    code: tuple[str, ...]
    call: Callable[[Params, Layout, bool], Any]
    describe: Callable[[Any, Params, Layout], str]
    kfp_task: str | None
    progress: bool = False
    verdict: Callable[[Any], bool] | None = None
    uncached: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    headline: str | None = None

    @property
    def dvc_cmd(self) -> str:
        """The stage's ``cmd`` in ``dvc.yaml``."""
        return f"nft-harden {self.command}" + (f" --headline {self.headline}" if self.headline else "")

    @property
    def deps(self) -> tuple[str, ...]:
        """Everything whose change must re-run this stage (the DVC ``deps``)."""
        return (*self.reads, *self.code, *STAGE_CODE)


# --------------------------------------------------------------------------------------------- calls ------
# Thin adapters from (params, layout) to the stage functions' explicit arguments; imports happen on call.

def _prepare(p: Params, layout: Layout, progress: bool) -> Any:
    from harden import stages
    return stages.prepare_data(p.data, p.base.seed, layout.clean, layout.test)


def _candidate(p: Params, layout: Layout, progress: bool) -> Any:
    from harden import stages
    return stages.make_demo_candidate(p, layout.stage("candidate"), progress=progress)


def _pull(p: Params, layout: Layout, progress: bool) -> Any:
    from harden import stages
    return stages.pull_stage(p.candidate, p.base.tracking_uri, layout.stage("pull"))


def _purify(p: Params, layout: Layout, progress: bool) -> Any:
    from harden import stages
    return stages.purify_stage(p.purify, p.base, layout.stage("pull"), layout.clean, layout.stage("purify"),
                               policy=p.policy, probes=p.probes, gate=p.gate, progress=progress)


def _fold(p: Params, layout: Layout, progress: bool) -> Any:
    from harden import stages
    return stages.fold_stage(layout.stage("pull"), layout.stage("purify"), layout.clean, layout.stage("fold"))


def _export(p: Params, layout: Layout, progress: bool) -> Any:
    from harden import stages
    return stages.export_stage(p.export, p.base.seed, layout.stage("fold"), layout.clean, layout.stage("export"))


def _evaluate(p: Params, layout: Layout, progress: bool) -> Any:
    from harden import stages
    return stages.evaluate_stage(p.probes, p.base.seed, layout.stage("pull"), layout.stage("purify"),
                                 layout.stage("fold"), layout.stage("export"), layout.test, layout.stage("evaluate"),
                                 progress=progress)


def _gate(p: Params, layout: Layout, progress: bool) -> Any:
    from harden import stages
    return stages.gate_stage(p.gate, layout.stage("evaluate"), layout.stage("fold"), layout.stage("export"),
                             layout.stage("gate"))


def _report(p: Params, layout: Layout, progress: bool) -> Any:
    from harden import stages
    return stages.report_stage(p, layout.stage("pull"), layout.stage("purify"), layout.stage("fold"),
                               layout.stage("export"), layout.stage("evaluate"), layout.stage("gate"),
                               layout.stage("report"), headline=layout.headline)


def _promote(p: Params, layout: Layout, progress: bool) -> Any:
    from harden import stages
    return stages.promote_stage(p, experiment=stages.dvc_experiment(), pull_dir=layout.stage("pull"),
                                fold_dir=layout.stage("fold"), export_dir=layout.stage("export"),
                                clean_npz=layout.clean, test_npz=layout.test, purify_dir=layout.stage("purify"),
                                evaluate_dir=layout.stage("evaluate"), gate_dir=layout.stage("gate"),
                                report_dir=layout.stage("report"), out_dir=layout.stage("promote"))


def _candidate_line(s: dict[str, Any], p: Params, layout: Layout) -> str:
    if "skipped" in s:
        return f"skipped: {s['skipped']}"
    return (f"registered {s['name']} version {s['version']} as @{s['alias']} ({s['attack']} backdoor, "
            f"{s['train_images']} training images) in {p.base.tracking_uri}")


def _promote_line(r: Any, p: Params, layout: Layout) -> str:
    if not r.registered:
        return f"registered nothing, moved no alias: {r.reason}"
    moved = f"; @{r.alias} -> version {r.version}" if r.alias_moved else f"; @{r.alias} unchanged"
    return f"registered {r.name} version {r.version} ({r.status}){moved}"


STAGES: tuple[Stage, ...] = (
    Stage("prepare", "prepare", "Draw the clean set and the test set (data/clean.npz, data/test.npz).",
          reads=(), writes=("data/clean.npz", "data/test.npz"), params=("base", "data"), code=("nft_core/data",),
          call=_prepare, kfp_task="prepare-data-op",
          describe=lambda s, p, l: (f"clean set: {s['clean']['n']} images -> {l.clean}; test set: "
                                    f"{s['test']['n']} images -> {l.test}")),
    Stage("candidate", "make-candidate",
          "Train a backdoored demo candidate on the offline data and register it as candidate.model.",
          reads=(), writes=("runs/candidate",), uncached=("runs/candidate",), params=("base", "data", "candidate"),
          code=("nft_core/attacks", "nft_core/models", "nft_core/train.py", "harden/registry"),
          call=_candidate, describe=_candidate_line, kfp_task=None, progress=True),
    Stage("pull", "pull", "Pull candidate.model from the registry and verify the package.",
          reads=("runs/candidate/candidate.json",), writes=("runs/pull",),
          params=("base", "candidate.model", "candidate.allow_pickle"),
          code=("harden/registry", "harden/package.py"), call=_pull, kfp_task="pull-op",
          describe=lambda r, p, l: f"pulled {r.model_name} version {r.version} -> {l.stage('pull')}"),
    Stage("purify", "purify", "Purify the pulled candidate on the clean set (NFT or another defense).",
          reads=("runs/pull", "data/clean.npz"), writes=("runs/purify",),
          params=("base", "purify", "policy", "probes", "gate"),
          code=("nft_core",), call=_purify, kfp_task="purify-op", progress=True,
          describe=lambda r, p, l: (f"{r.defense}: {r.wall_time_s:.1f}s on {r.clean_samples} clean images"
                                    + (" (policy: " + ", ".join(a.word for a in r.attempts) + ")"
                                       if r.holdout_samples else "") + f" -> {l.stage('purify')}")),
    Stage("fold", "fold", "Fold the masks into the weights and check the folded model.",
          reads=("runs/pull", "runs/purify", "data/clean.npz"), writes=("runs/fold",), params=(),
          code=("nft_core/fold.py", "nft_core/masks.py"), call=_fold, kfp_task="fold-op",
          describe=lambda r, p, l: (f"fold check {'passed' if r.passed else 'FAILED'} (max |diff| {r.max_abs_diff}) "
                                    f"-> {l.stage('fold')}")),
    Stage("export", "export", "Export the hardened model to ONNX and check it against PyTorch with ONNX Runtime.",
          reads=("runs/fold", "data/clean.npz"), writes=("runs/export",), params=("base.seed", "export"),
          code=("harden/onnx_export.py",), call=_export, kfp_task="export-op",
          describe=lambda r, p, l: (f"ONNX parity {'passed' if r.passed else 'FAILED'}: max |diff| "
                                    f"{r.max_abs_diff:.2e}, argmax agreement {r.argmax_agreement:.4f} on "
                                    f"{r.provider} -> {l.stage('export')}")),
    Stage("evaluate", "evaluate",
          "Evaluate the candidate (PyTorch) and the hardened ONNX model on the test set and every probe.",
          reads=("runs/pull", "runs/purify", "runs/fold", "runs/export", "data/test.npz"),
          writes=("runs/evaluate/metrics.json", "runs/evaluate/inversion.safetensors"),
          uncached=("runs/evaluate/metrics.json", "runs/evaluate/inversion.safetensors"), params=("base.seed", "probes"),
          code=("harden/evaluate.py", "nft_core/attacks", "nft_core/metrics.py", "nft_core/scan.py",
                "nft_core/invert.py"),
          call=_evaluate, kfp_task="evaluate-op", progress=True,
          describe=lambda r, p, l: (f"ACC {r.candidate['acc']:.4f} -> {r.hardened['acc']:.4f}; metrics -> "
                                    f"{l.stage('evaluate')}")),
    Stage("gate", "gate", "Apply the promotion gate and write blessing.json.",
          reads=("runs/evaluate/metrics.json", "runs/fold/fold.json", "runs/export/parity.json"),
          writes=("runs/gate/blessing.json",), uncached=("runs/gate/blessing.json",), params=("gate",),
          code=("harden/gate.py",), call=_gate, kfp_task="gate-op", verdict=lambda b: b.blessed,
          describe=lambda b, p, l: b.summary),
    Stage("report", "report", "Render the HTML/Markdown report and plots.",
          reads=("runs/pull", "runs/purify", "runs/fold/fold.json", "runs/export/parity.json",
                 "runs/evaluate/metrics.json", "runs/evaluate/inversion.safetensors", "runs/gate/blessing.json"),
          writes=("runs/report", "metrics.json"), metrics=("metrics.json",), uncached=("metrics.json",),
          headline="metrics.json", params=("base", "gate", "promote"),
          code=("harden/report.py", "harden/plots.py", "harden/templates", "harden/gate.py"), call=_report,
          kfp_task="report-op", describe=lambda f, p, l: (f"report: {f.html} and {f.markdown}"
                                                          + (f"; headline metrics: {f.headline}" if f.headline else ""))),
    Stage("promote", "promote",
          "Register the hardened version with its evidence; move the alias only if the gate blessed it.",
          reads=("data/clean.npz", "data/test.npz", "runs/pull", "runs/purify", "runs/fold", "runs/export",
                 "runs/evaluate/metrics.json", "runs/gate/blessing.json", "runs/report"),
          writes=("runs/promote/registered.json",), uncached=("runs/promote/registered.json",),
          params=("base", "gate", "promote"), code=("harden/registry", "harden/gate.py"), call=_promote,
          kfp_task="register-op", verdict=lambda r: r.blessed, describe=_promote_line),
)

STAGE_BY_NAME = {s.name: s for s in STAGES}
