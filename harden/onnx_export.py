"""ONNX export of a hardened model, and the ONNX Runtime vs PyTorch parity check.

Decision: input normalisation is baked into the graph. The exported module is
``Normalized(net, mean, std)``, so the ONNX input ``"input"`` is a float32 NCHW image batch in [0, 1] and the
output ``"logits"`` is ``(N, num_classes)``. Deployment then needs no side channel for mean/std (the most
common silent accuracy loss when a model changes hands), the registered ONNX file is self-describing, and
the parity check covers the normalisation too. The cost, one subtract and one divide per pixel, is negligible.

Steps (after timm ``onnx_export.py``): export with the current exporter (``torch.onnx.export(dynamo=True)``,
onnxscript) and a dynamic batch dimension; ``onnx.checker.check_model``; write atomically; then
:func:`check_parity` runs ONNX Runtime and PyTorch on the same batches and passes only when the max abs
logit difference is within ``atol`` and argmax agreement is 100 %.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
from torch import nn

from harden.integrity import atomic_file

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
#: ONNX Runtime's own default severity for its default logger (warnings and up); it has no getter to read it back.
ORT_DEFAULT_SEVERITY = 2
_ORT_FATAL_ONLY = 4


@dataclass
class ParityReport:
    """ONNX Runtime vs PyTorch on named batches.

    Attributes:
        max_abs_diff: largest absolute logit difference over all batches.
        argmax_agreement: fraction of samples (all batches) whose predicted class agrees.
        batches: per batch name: ``n``, ``max_abs_diff``, ``argmax_agreement``.
        provider: the ONNX Runtime execution provider that actually ran.
        passed: ``max_abs_diff <= atol`` and ``argmax_agreement == 1.0``.
        atol: the tolerance applied.
    """

    max_abs_diff: float
    argmax_agreement: float
    batches: dict[str, dict]
    provider: str
    passed: bool
    atol: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for evidence files and MLflow)."""
        return asdict(self)


def _eval(model: nn.Module) -> dict[nn.Module, bool]:
    """Put ``model`` in eval mode; returns every submodule's previous mode for :func:`_restore`."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    return modes


def _restore(modes: dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int], path: str | Path, *,
                opset: int | None = None) -> Path:
    """Export ``model`` (normally ``Normalized(net)``) to ONNX at ``path``, checked and written atomically.

    The module is exported in eval mode (each submodule's previous mode is restored afterwards), as a single file with
    inline weights, a dynamic batch dimension, input ``"input"`` and output ``"logits"``.

    Args:
        model: the module to export; it takes images in [0, 1].
        input_shape: ``(channels, height, width)`` of one image.
        path: destination ``.onnx`` file.
        opset: ONNX opset version; ``None`` uses the exporter's default.

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        ValueError: ``input_shape`` is not three positive ints.
        onnx.checker.ValidationError: the exported graph is invalid (nothing is written to ``path``).
    """
    if len(input_shape) != 3 or any(int(d) <= 0 for d in input_shape):
        raise ValueError(f"input_shape must be (channels, height, width) > 0, got {input_shape}")
    path = Path(path)
    example = torch.rand(2, *input_shape)
    modes = _eval(model)
    try:
        with atomic_file(path) as tmp:
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), opset_version=opset,
                external_data=False, verbose=False,
            )
            if program is None:  # only the legacy TorchScript exporter returns nothing
                raise RuntimeError("torch.onnx.export returned no program (the dynamo exporter always returns one)")
            program.save(str(tmp), external_data=False)
            onnx.checker.check_model(str(tmp), full_check=True)
    finally:
        _restore(modes)
    return path


def onnx_session(path: str | Path) -> ort.InferenceSession:
    """An ONNX Runtime session: CUDA provider first when a GPU is usable, else CPU.

    onnxruntime-gpu lists the CUDA provider even without a GPU and falls back to CPU silently; use
    :func:`session_provider` to record which provider actually runs.
    """
    providers = ["CPUExecutionProvider"]
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), providers=providers)


@contextlib.contextmanager
def quiet_gpu_provider_probe() -> Iterator[None]:
    """On a machine without a usable GPU, keep ONNX Runtime and MLflow quiet about a CUDA provider they cannot start.

    MLflow's onnx flavour checks a logged model's input example by opening it with the providers its MLmodel
    declares (CUDA first, which is right for serving). With onnxruntime-gpu on a CPU-only machine that throwaway
    session prints a red error (the CUDA library fails to load), ONNX Runtime's warning and MLflow's, about nothing
    the logged model carries. Within this block, where torch sees no GPU, ONNX Runtime logs only fatal errors and
    the ``mlflow.onnx`` logger only errors; both are restored after. Where a GPU is usable, nothing is silenced: a
    provider that fails to start there is worth hearing.
    """
    if torch.cuda.is_available():
        yield
        return
    mlflow_onnx = logging.getLogger("mlflow.onnx")
    level = mlflow_onnx.level
    ort.set_default_logger_severity(_ORT_FATAL_ONLY)
    mlflow_onnx.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ort.set_default_logger_severity(ORT_DEFAULT_SEVERITY)
        mlflow_onnx.setLevel(level)


def session_provider(sess: ort.InferenceSession) -> str:
    """The execution provider that actually runs ``sess`` (the first one ONNX Runtime kept)."""
    return sess.get_providers()[0]


def onnx_predict_logits(sess: ort.InferenceSession, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``sess`` on images ``x`` (N, C, H, W, [0, 1]), computed in chunks of ``batch_size``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    x = x.detach().to("cpu", torch.float32)
    outs = [torch.from_numpy(sess.run([OUTPUT_NAME], {INPUT_NAME: chunk.numpy()})[0])
            for chunk in x.split(batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def check_parity(onnx_path: str | Path, model: nn.Module, batches: dict[str, torch.Tensor], *,
                 atol: float = 1e-4) -> ParityReport:
    """Compare ONNX Runtime on ``onnx_path`` with ``model`` (eval mode, CPU) on each named batch.

    Args:
        onnx_path: the exported file.
        model: the PyTorch module that was exported (same input convention).
        batches: e.g. ``{"clean": real images, "random": torch.rand(...)}``; each non-empty.
        atol: max allowed absolute logit difference.

    Raises:
        ValueError: ``batches`` is empty or holds an empty batch.
    """
    if not batches or any(len(b) == 0 for b in batches.values()):
        raise ValueError(f"check_parity needs non-empty batches, got sizes {({k: len(v) for k, v in batches.items()})}")
    sess = onnx_session(onnx_path)
    modes = _eval(model)
    per_batch: dict[str, dict] = {}
    agree_total, n_total, worst = 0, 0, 0.0
    try:
        for name, x in batches.items():
            with torch.no_grad():
                ref = model(x.to(torch.float32)).cpu()
            got = onnx_predict_logits(sess, x)
            diff = float((got - ref).abs().max()) if got.shape == ref.shape else math.inf
            agree = int((got.argmax(1) == ref.argmax(1)).sum()) if got.shape == ref.shape else 0
            per_batch[name] = {"n": len(x), "max_abs_diff": diff, "argmax_agreement": agree / len(x)}
            worst = diff if math.isnan(diff) or diff > worst else worst
            agree_total, n_total = agree_total + agree, n_total + len(x)
    finally:
        _restore(modes)
    agreement = agree_total / n_total
    passed = math.isfinite(worst) and worst <= atol and agree_total == n_total
    return ParityReport(max_abs_diff=worst, argmax_agreement=agreement, batches=per_batch,
                        provider=session_provider(sess), passed=passed, atol=atol)
