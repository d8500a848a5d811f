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
from collections.abc import Iterator
from contextlib import contextmanager
from contextlib import nullcontext as _nullcontext
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
#: Resource bounds checked before anything is built from a supplier's ``model.json``.
MAX_SPEC_BYTES = 1 << 20
MAX_SIDE = 2048
MAX_CHANNELS = 16
MAX_CLASSES = 1_000_000
MAX_KWARG_LIST = 64
#: Floating dtypes a package may store (cast to the architecture's float32 on load), by safetensors name.
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
#: Integer buffers (BatchNorm's step counter) may be stored as int64.
INT_DTYPES = {"I64": torch.int64}
#: File suffixes treated as pickles (torch.save, pickle, joblib, Lightning checkpoints).
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib"})


class InputSpec(BaseModel):
    """What the model takes: ``channels`` x ``height`` x ``width`` images in [0, 1], normalised by mean/std."""

    model_config = ConfigDict(extra="forbid")

    channels: int = Field(gt=0, le=MAX_CHANNELS)
    height: int = Field(gt=0, le=MAX_SIDE)
    width: int = Field(gt=0, le=MAX_SIDE)
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
        if not all(1e-3 <= s <= 1e3 for s in self.std):
            raise ValueError(f"input.std must lie in [0.001, 1000] (images are in [0, 1]), got {self.std}")
        if not all(abs(m) <= 1e3 for m in self.mean):
            raise ValueError(f"input.mean must lie in [-1000, 1000], got {self.mean}")
        return self


class ModelSpec(BaseModel):
    """Contents of ``model.json``; validated on construction (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    builder: str
    kwargs: dict[str, Any] = {}
    num_classes: int = Field(gt=0, le=MAX_CLASSES)
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
        for key, value in self.kwargs.items():
            items = value if isinstance(value, list) else [value]
            if isinstance(value, list) and len(value) > MAX_KWARG_LIST:
                raise ValueError(f"kwargs.{key} is a list of {len(value)} values (at most {MAX_KWARG_LIST})")
            if not all(v is None or isinstance(v, (bool, int, float, str)) for v in items):
                raise ValueError(f"kwargs.{key} must be a number, string, bool, null or a short list of them")
        if "weights" in self.kwargs or "weights_backbone" in self.kwargs:
            raise ValueError("kwargs may not request pretrained weights ('weights'/'weights_backbone')")
        if self.kwargs.get("num_classes", self.num_classes) != self.num_classes:
            raise ValueError(f"kwargs.num_classes={self.kwargs['num_classes']} != num_classes={self.num_classes}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names, num_classes={self.num_classes}")
        return self

    def build(self, device: str | torch.device | None = None) -> nn.Module:
        """The bare architecture with random weights, from the allow-list (``device="meta"``: shapes only, no
        memory). A builder that refuses the kwargs raises :class:`PackageError` naming them."""
        kwargs = {**self.kwargs, "num_classes": self.num_classes}
        try:
            try:
                with torch.device(device) if device is not None else _nullcontext():
                    return build_model(self.builder, **kwargs)
            except NotImplementedError:  # a builder that computes with tensors (RegNet's widths) cannot run on meta
                if str(device) != "meta":
                    raise
                with _parameters_on_meta():
                    return build_model(self.builder, **kwargs)
        except (TypeError, ValueError, RuntimeError, AssertionError) as err:
            raise PackageError(f"model.json: builder {self.builder!r} cannot be built with kwargs "
                               f"{sorted(self.kwargs)}: {err}") from err

    def wrap(self, net: nn.Module) -> Normalized:
        """``net`` behind this spec's input normalisation (inputs in [0, 1])."""
        return Normalized(net, self.input.mean, self.input.std)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with every parameter moved to the meta device as it is registered (before its
    initialisation touches memory): for builders that cannot run entirely on meta."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _bare(net: nn.Module) -> nn.Module:
    return net.net if isinstance(net, Normalized) else net


def _check_keys(present: set[str], expected: set[str], where: str) -> None:
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise PackageError(f"{where}: keys do not match the architecture: missing {missing[:5]}"
                           f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                           f"{'...' if len(unexpected) > 5 else ''}")


def _check_state(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], where: str) -> None:
    """Raise :class:`PackageError` unless ``state`` has exactly the keys/shapes of ``reference``, all finite."""
    _check_keys(set(state), set(reference), where)
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
    _check_state(state, spec.build(device="meta").state_dict(), f"save_package({str(out_dir)!r})")
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
        if (size := path.stat().st_size) > MAX_SPEC_BYTES:
            raise PackageError(f"{path}: {size} bytes; a model spec is at most {MAX_SPEC_BYTES} bytes")
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


def _read_header(weights: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{key: (safetensors dtype, shape)}`` from the file's header, without reading the tensors."""
    try:
        with safetensors.safe_open(str(weights), framework="pt", device="cpu") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise PackageError(f"{weights}: cannot parse safetensors (truncated or corrupt?): {err}") from err


def _check_header(header: dict[str, tuple[str, tuple[int, ...]]], reference: dict[str, torch.Tensor],
                  where: str) -> None:
    """Keys, shapes and dtypes of the stored tensors against the architecture, before loading any of them."""
    _check_keys(set(header), set(reference), where)
    for key, ref in reference.items():
        dtype, shape = header[key]
        if shape != tuple(ref.shape):
            raise PackageError(f"{where}: key {key!r} has shape {shape}, the architecture expects {tuple(ref.shape)}")
        allowed = FLOAT_DTYPES if ref.is_floating_point() else INT_DTYPES
        if dtype not in allowed:
            raise PackageError(f"{where}: key {key!r} is stored as {dtype}; allowed: {', '.join(allowed)}")


def _cast_like(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Each tensor in its reference's dtype (float16/bfloat16 weights become float32); other dtypes are refused."""
    _check_keys(set(state), set(reference), where)
    out = {}
    for key, ref in reference.items():
        value = state[key]
        allowed = FLOAT_DTYPES if ref.is_floating_point() else INT_DTYPES
        if value.dtype not in allowed.values():
            raise PackageError(f"{where}: key {key!r} is {value.dtype}; allowed: {', '.join(allowed)}")
        out[key] = value.to(ref.dtype)
    return out


def load_package(pkg_dir: str | Path, *, allow_pickle: bool = False,
                 spec: ModelSpec | None = None) -> tuple[nn.Module, ModelSpec]:
    """Load and verify a package; returns the bare network in eval mode and its spec.

    Checks, in order, and nothing is allocated from the supplier's description until its weights agree with
    it: ``model.json`` at most 1 MiB and valid (builder on the allow-list, bounded input size, classes and
    kwargs); the architecture built on the ``meta`` device (shapes only); ``model.safetensors`` present, its
    sha256 recorded and equal; its header's keys, shapes and dtypes (float32/float16/bfloat16, int64 counters)
    equal to the architecture's; then the tensors are read, cast to float32, checked finite *after* the cast,
    the model is built and loaded, and its output is ``(1, num_classes)`` for an input of the spec's size. A
    spec declaring a billion classes or a huge width is refused by the shape comparison, in milliseconds.

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
    reference = spec.build(device="meta").state_dict()  # shapes and dtypes, no memory
    if pickles:
        state = _load_pickle_state(pickles[0])
        where = str(pickles[0])
    else:
        where = str(weights)
        if not weights.is_file():
            raise PackageError(f"{pkg_dir}: {WEIGHTS_FILE} is missing")
        if spec.weights_sha256 is None:
            raise PackageError(f"{pkg_dir / SPEC_FILE}: weights_sha256 is missing; a package records the sha256 "
                               f"of its {WEIGHTS_FILE}")
        if (actual := sha256_file(weights)) != spec.weights_sha256:
            raise PackageError(f"{weights}: sha256 {actual} differs from the recorded "
                               f"weights_sha256 {spec.weights_sha256}")
        _check_header(_read_header(weights), reference, where)  # before anything is allocated
        try:
            state = safetensors.torch.load_file(str(weights), device="cpu")
        except (safetensors.SafetensorError, OSError) as err:
            raise PackageError(f"{weights}: cannot parse safetensors (truncated or corrupt?): {err}") from err
    state = _cast_like(state, reference, where)
    _check_state(state, reference, where)
    net = spec.build()
    net.load_state_dict(state, strict=True)
    net.eval()
    _check_head(net, spec, where)
    return net, spec
