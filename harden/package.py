"""The model package: the unit that is pulled from the registry, purified, folded and registered.

A package is a directory with two files:

- ``model.json``: :class:`ModelSpec` (format version, allow-listed ``builder`` + ``kwargs``, ``num_classes``,
  input spec, optional class names, sha256 of the weights);
- ``model.safetensors``: the bare network's state dict (no normalisation wrapper, no pickled code).

Loading never executes code from the package: the architecture comes from the allow-list in
:func:`nft_core.models.build_model`, the weights from safetensors. Pickled models (``.pt``/``.pkl``,
``mlflow.pytorch`` directories) are refused unless the caller opts in with ``allow_pickle=True``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from harden.errors import PackageError
from harden.integrity import atomic_dir, sha256_file, write_json_atomic
from nft_core.models import Normalized, available_builders, build_model

logger = logging.getLogger(__name__)

SPEC_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
#: File suffixes treated as pickles (torch.save, pickle, joblib, Lightning checkpoints).
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib"})


class InputSpec(BaseModel):
    """What the model takes: ``channels`` x ``height`` x ``width`` images in [0, 1], normalised by mean/std."""

    model_config = ConfigDict(extra="forbid")

    channels: int = Field(gt=0)
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _per_channel(self) -> InputSpec:
        for key in ("mean", "std"):
            values = getattr(self, key)
            if len(values) != self.channels:
                raise ValueError(f"input.{key} has {len(values)} values, expected channels={self.channels}")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"input.{key} must be finite, got {values}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"input.std must be positive, got {self.std}")
        return self


class ModelSpec(BaseModel):
    """Contents of ``model.json``; validated on construction (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    builder: str
    kwargs: dict[str, Any] = {}
    num_classes: int = Field(gt=0)
    input: InputSpec
    class_names: list[str] | None = None
    #: sha256 of ``model.safetensors``; written by :func:`save_package`, checked by :func:`load_package`.
    weights_sha256: str | None = None

    @field_validator("format_version")
    @classmethod
    def _known_format(cls, value: int) -> int:
        if value != FORMAT_VERSION:
            raise ValueError(f"format_version {value} is not supported (expected {FORMAT_VERSION})")
        return value

    @field_validator("builder")
    @classmethod
    def _allow_listed(cls, value: str) -> str:
        if value not in available_builders():
            raise ValueError(f"builder {value!r} is not on the allow-list (nft_core.models / torchvision.<name>)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if "weights" in self.kwargs or "weights_backbone" in self.kwargs:
            raise ValueError("kwargs may not request pretrained weights ('weights'/'weights_backbone')")
        if self.kwargs.get("num_classes", self.num_classes) != self.num_classes:
            raise ValueError(f"kwargs.num_classes={self.kwargs['num_classes']} != num_classes={self.num_classes}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names, num_classes={self.num_classes}")
        return self

    def build(self) -> nn.Module:
        """The bare architecture with random weights, from the allow-list."""
        return build_model(self.builder, **{**self.kwargs, "num_classes": self.num_classes})

    def wrap(self, net: nn.Module) -> Normalized:
        """``net`` behind this spec's input normalisation (inputs in [0, 1])."""
        return Normalized(net, self.input.mean, self.input.std)


def _bare(net: nn.Module) -> nn.Module:
    return net.net if isinstance(net, Normalized) else net


def _check_state(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], where: str) -> None:
    """Raise :class:`PackageError` unless ``state`` has exactly the keys/shapes of ``reference``, all finite."""
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    if missing or unexpected:
        raise PackageError(f"{where}: keys do not match the architecture: missing {missing[:5]}"
                           f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                           f"{'...' if len(unexpected) > 5 else ''}")
    for key, ref in reference.items():
        value = state[key]
        if tuple(value.shape) != tuple(ref.shape):
            raise PackageError(f"{where}: key {key!r} has shape {tuple(value.shape)}, "
                               f"the architecture expects {tuple(ref.shape)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise PackageError(f"{where}: key {key!r} has {bad} non-finite values (NaN/Inf)")


def _check_head(net: nn.Module, spec: ModelSpec, where: str) -> None:
    """One forward pass of a zero image: the output must be ``(1, num_classes)``."""
    x = torch.zeros(1, spec.input.channels, spec.input.height, spec.input.width)
    try:
        with torch.no_grad():
            out = net(x)
    except RuntimeError as err:
        raise PackageError(f"{where}: the model does not accept input {tuple(x.shape)} "
                           f"from the input spec: {err}") from err
    if tuple(out.shape) != (1, spec.num_classes):
        raise PackageError(f"{where}: the model outputs shape {tuple(out.shape)}, "
                           f"num_classes={spec.num_classes} expects (1, {spec.num_classes})")


def save_package(net: nn.Module, spec: ModelSpec, out_dir: str | Path) -> Path:
    """Write ``net`` (bare or :class:`Normalized`) as a package at ``out_dir``, atomically.

    The package is assembled in a temporary directory next to ``out_dir`` and renamed into place, so an
    existing package at ``out_dir`` is only ever replaced by a complete one.

    Returns:
        ``out_dir`` as a :class:`Path`.

    Raises:
        PackageError: the network's state dict does not match ``spec``'s architecture or is not finite.
    """
    out_dir = Path(out_dir)
    bare = _bare(net)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in bare.state_dict().items()}
    _check_state(state, spec.build().state_dict(), f"save_package({str(out_dir)!r})")
    with atomic_dir(out_dir) as tmp:
        safetensors.torch.save_file(state, str(tmp / WEIGHTS_FILE))
        recorded = spec.model_copy(update={"weights_sha256": sha256_file(tmp / WEIGHTS_FILE)})
        write_json_atomic(tmp / SPEC_FILE, recorded.model_dump(mode="json"))
    return out_dir


def read_spec(path: str | Path) -> ModelSpec:
    """Parse and validate a ``model.json``.

    Raises:
        PackageError: unreadable, not JSON, or invalid (the message names the key and value).
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PackageError(f"{path}: cannot read model spec: {err}") from err
    try:
        return ModelSpec.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']} (got {e.get('input')!r})"
                             for e in err.errors())
        raise PackageError(f"{path}: invalid model spec: {problems}") from err


def find_pickles(root: str | Path) -> list[Path]:
    """Pickled model files under ``root``: pickle suffixes, and the data of ``mlflow.pytorch`` models."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def _load_pickle_state(path: Path) -> dict[str, torch.Tensor]:
    """Unpickle ``path`` (code may run!) and return a state dict. Only under ``allow_pickle=True``."""
    logger.warning("allow_pickle=True: unpickling %s with torch.load(weights_only=False); this runs any code "
                   "the file contains", path)
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, nn.Module):
        return _bare(obj).state_dict()
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise PackageError(f"{path}: unpickled a {type(obj).__name__}, expected an nn.Module or a state dict")


def load_package(pkg_dir: str | Path, *, allow_pickle: bool = False,
                 spec: ModelSpec | None = None) -> tuple[nn.Module, ModelSpec]:
    """Load and verify a package; returns the bare network in eval mode and its spec.

    Checks, in order: ``model.json`` valid (builder on the allow-list), ``model.safetensors`` present, its
    sha256 equal to the recorded one, the file parses, every key and shape equals the built architecture,
    all floating weights finite, and the output is ``(1, num_classes)`` for an input of the spec's size.

    Args:
        pkg_dir: the package directory.
        allow_pickle: explicit opt-in to load a pickled model (``.pt``/``.pkl``/``mlflow.pytorch``) when the
            directory has no ``model.safetensors``. Unpickling runs code from the file; a WARNING is logged.
            The pickle only provides weights: the architecture still comes from the allow-list.
        spec: the spec to use instead of ``pkg_dir/model.json`` (needed for a pickle without ``model.json``).

    Raises:
        PackageError: any check fails, or the directory holds only a pickle and ``allow_pickle`` is False.
    """
    pkg_dir = Path(pkg_dir)
    if not pkg_dir.is_dir():
        raise PackageError(f"package directory {str(pkg_dir)!r} does not exist")
    weights = pkg_dir / WEIGHTS_FILE
    pickles = [] if weights.is_file() else find_pickles(pkg_dir)
    if pickles and not allow_pickle:
        raise PackageError(f"{pkg_dir}: no {WEIGHTS_FILE}, only pickled model file(s) "
                           f"{[str(p.relative_to(pkg_dir)) for p in pickles]}; refusing to unpickle untrusted "
                           "data (pass allow_pickle=True to opt in)")
    if spec is None:
        if not (pkg_dir / SPEC_FILE).is_file():
            raise PackageError(f"{pkg_dir}: {SPEC_FILE} is missing")
        spec = read_spec(pkg_dir / SPEC_FILE)
    net = spec.build()
    if pickles:
        state = _load_pickle_state(pickles[0])
        where = str(pickles[0])
    else:
        if not weights.is_file():
            raise PackageError(f"{pkg_dir}: {WEIGHTS_FILE} is missing")
        if spec.weights_sha256 is not None and (actual := sha256_file(weights)) != spec.weights_sha256:
            raise PackageError(f"{weights}: sha256 {actual} differs from the recorded "
                               f"weights_sha256 {spec.weights_sha256}")
        try:
            state = safetensors.torch.load_file(str(weights), device="cpu")
        except (safetensors.SafetensorError, OSError) as err:
            raise PackageError(f"{weights}: cannot parse safetensors (truncated or corrupt?): {err}") from err
        where = str(weights)
    _check_state(state, net.state_dict(), where)
    net.load_state_dict(state, strict=True)
    net.eval()
    _check_head(net, spec, where)
    return net, spec
