"""``params.yaml``: one validated section per concern, shared by the CLI, the DVC stages and the KFP components.

Sections: ``base`` (seed, device, registry), ``data`` (clean and test sets), ``candidate`` (what to pull, and the
offline demo candidate), ``purify`` (the purifier, ``method``, and its config's fields), ``policy`` (fallback
purifications), ``export`` (ONNX), ``probes`` (attack probes and the trigger-free scan), ``gate`` (promotion
checks), ``promote`` (registration). Unknown keys, wrong types and out-of-range values are refused with
:class:`ParamsError`, whose message names the key (``purify.lr``), the value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from harden.errors import ParamsError
from harden.probes import Probe
from harden.gate import GateConfig
from nft_core.config import CONFIGS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``NAME@ALIAS`` or ``NAME/VERSION`` (see harden.registry).
MODEL_REF = re.compile(r"^(?:models:/)?(?P<name>[^@/\s]+)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>[0-9]+))$")
DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")


def check_tracking_uri(uri: str) -> str:
    """A registry URI the step can use: ``sqlite:///PATH`` (PATH not a directory) or ``http(s)://HOST[:PORT]``.

    ``file://`` stores have no model registry, and a bare path is a file store; both fail later and obscurely.
    """
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.name:
            raise ValueError(f"{uri!r} names no database file (sqlite:///PATH/mlflow.db)")
        if path.is_dir():
            raise ValueError(f"{uri!r} points at a directory; name the database file inside it (.../mlflow.db)")
        return uri
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https") and parts.hostname:
        return uri
    raise ValueError(f"{uri!r} is not a registry URI this step supports: use sqlite:///PATH/mlflow.db (embedded) "
                     "or http(s)://HOST:PORT (an mlflow server)")


class BaseParams(_Section):
    seed: int = Field(0, ge=0, description="seed of data splits, the demo candidate and every purifier")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu' or 'cuda[:N]'")
    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking/registry URI (sqlite file or http server)")

    @field_validator("tracking_uri")
    @classmethod
    def _registry_uri(cls, value: str) -> str:
        return check_tracking_uri(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE.match(value):
            raise ValueError(f"{value!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value


class DataParams(_Section):
    train: str = Field("synthetic:n=10000,seed=0", description="dataset spec the clean set is drawn from (train split)")
    test: str = Field("synthetic:n=2000,seed=0", description="dataset spec of the test set (loaded with train=False)")
    clean_fraction: float | None = Field(0.02, gt=0, le=1, description="share of `train` used as clean data")
    clean_per_class: int | None = Field(None, ge=1, description="or: this many clean samples per class")
    download: bool = Field(False, description="let torchvision datasets download (off: this must run offline)")

    @model_validator(mode="after")
    def _one_size(self) -> DataParams:
        if (self.clean_fraction is None) == (self.clean_per_class is None):
            raise ValueError("set exactly one of data.clean_fraction and data.clean_per_class (the other to null)")
        return self


class DemoCandidateParams(_Section):
    enabled: bool = Field(True, description="build and register the demo candidate; false when hardening your own model")
    builder: str = Field("small_cnn", description="architecture of the demo candidate (allow-listed builder)")
    attack: str = Field("badnets", description="backdoor planted in the demo candidate")
    target: int = Field(0, ge=0, description="attack target label")
    mode: Literal["all2one", "all2all"] = "all2one"
    poison_rate: float = Field(0.1, gt=0, lt=1, description="share of training images poisoned")
    epochs: int = Field(12, ge=1, description="training epochs of the demo candidate")


class CandidateParams(_Section):
    model: str = Field("models:/nft-demo@candidate",
                       description="registry reference: models:/NAME@ALIAS or models:/NAME/VERSION")
    allow_pickle: bool = Field(False, description="explicit opt-in to unpickle a pickled candidate (runs its code!)")
    demo: DemoCandidateParams = DemoCandidateParams()

    @field_validator("model")
    @classmethod
    def _model_ref(cls, value: str) -> str:
        if not MODEL_REF.match(value.strip()):
            raise ValueError(f"{value!r} is not a model reference: use models:/NAME@ALIAS or models:/NAME/VERSION")
        return value


#: The discriminator of the ``purify`` section and of each ``policy.fallbacks`` entry.
METHOD = "method"

#: Config fields that come from elsewhere: ``base.seed``, ``base.device``, and the caller (progress bar).
_RUNTIME = frozenset({"seed", "device", "progress"})

#: A config check's message, ``NFTConfig.lr=-0.1 is invalid: must be a finite number > 0``: the field and why.
_CHECK = re.compile(r"^\w+\.(?P<field>\w+)=.*? is invalid: (?P<reason>.*)$", re.DOTALL)


class PurifyParams(_Section):
    """One purification: ``method`` (a key of :data:`nft_core.config.CONFIGS`) and that method's config fields.

    The base of the variants :data:`PURIFY_VARIANTS` builds from the config dataclasses; stages take it as the
    type of the ``purify`` section and of each fallback."""

    method: str

    @model_validator(mode="after")
    def _valid_config(self) -> PurifyParams:
        """Run the config dataclass's own range checks now, so a bad value fails when params load, not mid-run."""
        try:
            self.config()
        except ValueError as err:  # "FTConfig.lr=-0.1 is invalid: must be ..." -> an error on the field `lr`
            check = _CHECK.match(str(err))
            if check is None:  # a message of another shape: reported on the section as it is
                raise
            field = check["field"]
            raise ValidationError.from_exception_data(type(self).__name__, [InitErrorDetails(
                type=PydanticCustomError("config_check", check["reason"]), loc=(field,),
                input=getattr(self, field))]) from None
        return self

    def config(self, seed: int = 0, device: str = "auto", progress: bool = True) -> Any:
        """The method's config dataclass these params describe, with the run's seed, device and progress setting."""
        runtime: dict[str, Any] = {"seed": seed, "device": device, "progress": progress}
        return CONFIGS[self.method](**self.model_dump(exclude={METHOD}), **runtime)


def _variant(method: str, config: type) -> type[PurifyParams]:
    """``method``'s variant: ``method: Literal[method]`` and every field of ``config`` but the runtime ones, with
    its type and default (a field added to the dataclass appears here, and in ``params.yaml``, by itself)."""
    hints = typing.get_type_hints(config)
    fields = {f.name: (hints[f.name], f.default) for f in dataclasses.fields(config) if f.name not in _RUNTIME}
    return create_model(f"{config.__name__.removesuffix('Config')}Params", __base__=PurifyParams,  # type: ignore[call-overload]
                        __doc__=f"``method: {method}``: the fields of :class:`~nft_core.config.{config.__name__}`.",
                        **{METHOD: (Literal[method], ...)}, **fields)


#: method name -> the params variant of its config (one per :data:`nft_core.config.CONFIGS` entry)
PURIFY_VARIANTS: dict[str, type[PurifyParams]] = {method: _variant(method, config) for method, config in CONFIGS.items()}

if typing.TYPE_CHECKING:  # every variant is a PurifyParams; the union is built at run time
    Purify = PurifyParams
else:
    #: a purification as ``params.yaml`` writes it: the variant named by ``method`` (required: no silent default)
    Purify = Annotated[typing.Union[tuple(PURIFY_VARIANTS.values())], Field(discriminator=METHOD)]


class PolicyParams(_Section):
    """The hardening policy: when the ``purify`` section's purification does not pass the gate's checks on clean
    data held out of purification, try the fallbacks in order; the first attempt that passes wins (the best one
    when none does, and the gate then rejects it on the test set as before). With no fallbacks the whole clean
    set purifies once and nothing is held out. A fallback is written like the ``purify`` section (``method`` and
    changes to that method's defaults) and validated with it when the params load."""

    fallbacks: list[Purify] = Field(default_factory=list,
                                    description="purifications tried in order after the purify section's")
    holdout: float = Field(0.2, gt=0, lt=1, description="share of the clean set held out to judge attempts (with fallbacks)")
    budget_s: float = Field(3600.0, gt=0, description="no attempt starts after this much purification wall time")
    margin: float = Field(0.01, ge=0, lt=0.5,
                          description="an attempt passes the held-out checks only with this much to spare on each "
                                      "(a share: 0.01 is one point), since a few hundred held-out images are a "
                                      "noisy judge of the test set")


class ExportParams(_Section):
    opset: int | None = Field(None, ge=18, description="ONNX opset (default: the exporter's)")
    atol: float = Field(1e-4, gt=0, description="max |torch - onnxruntime| on logits for the parity check")
    parity_samples: int = Field(256, ge=1, description="clean images in the parity batch (plus as many random ones)")


class ScanParams(_Section):
    enabled: bool = Field(True, description="run the trigger-free adversarial-label scan")
    samples: int = Field(500, ge=10, description="clean test images attacked")
    eps: float = Field(8 / 255, gt=0, le=1, description="L-inf radius of the untargeted PGD")
    steps: int = Field(10, ge=1)


class InversionParams(_Section):
    """Trigger reconstruction (Neural Cleanse) on the candidate and on the hardened model."""

    enabled: bool = Field(True, description="reconstruct every class's trigger; the candidate's suspect becomes a probe")
    samples: int = Field(200, ge=10, description="clean test images the triggers are reconstructed from")
    steps: int = Field(100, ge=1, description="optimisation steps per class")
    batch_size: int = Field(16, ge=1, description="images per step (each stamped once per class)")
    lr: float = Field(0.2, gt=0, description="Adam's learning rate on the masks and patterns")
    init_cost: float = Field(0.01, gt=0, description="initial weight of the mask's L1 norm (adapted as it goes)")


class MarginParams(_Section):
    """The maximum-margin statistic (MM-BD) on the candidate and on the hardened model: needs no images."""

    enabled: bool = Field(True, description="find every class's largest reachable margin; flag an outlier")
    starts: int = Field(8, ge=1, description="random starting images per class")
    steps: int = Field(200, ge=1, description="Adam steps of margin ascent")
    lr: float = Field(0.05, gt=0, description="Adam's learning rate, in [0, 1] pixel units")


class UniversalParams(_Section):
    """The smallest universal additive perturbation of every class, on the candidate and on the hardened model:
    a trigger added to the whole image (SIG's sinusoid, a blend) makes its target's far smaller."""

    enabled: bool = Field(True, description="search every class's smallest universal L-inf perturbation; flag an outlier")
    samples: int = Field(200, ge=10, description="clean test images the perturbations are searched on")
    steps: int = Field(100, ge=1, description="signed-gradient steps per class")
    batch_size: int = Field(16, ge=1, description="images per step (each perturbed once per class)")
    success_threshold: float = Field(0.8, gt=0, le=1,
                                     description="share of other classes' images a perturbation must send to its class")


class ProbesParams(_Section):
    attacks: list[Probe] = Field(default_factory=list, description="attack probes measuring ASR")
    scan: ScanParams = ScanParams()
    inversion: InversionParams = InversionParams()
    margin: MarginParams = MarginParams()
    universal: UniversalParams = UniversalParams()


class PromoteParams(_Section):
    name: str = Field("nft-demo-hardened", min_length=1, description="registered model receiving the hardened version")
    alias: str = Field("champion", pattern=r"^[A-Za-z0-9_-]{1,255}$",
                       description="serving alias moved to a blessed version (not 'latest' or 'v<N>', which MLflow reserves)")
    register_experiments: bool = Field(False, description="register (and move the alias) also inside a DVC experiment "
                                       "(`dvc exp run`); false: promote there registers nothing and says so")

    @field_validator("alias")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
            raise ValueError(f"alias {value!r} is reserved by MLflow ('latest' and 'v<number>'); choose another name")
        return value


#: Why a file with an ``nft`` section is refused, and what to change.
NFT_SECTION_MOVED = ("the `nft` section is now `purify` with `method: nft`; `defense` became `method`; `options` "
                     "moved into the section (its keys flat beside `method`), and a `policy.fallbacks` entry "
                     "`{defense: NAME, options: {...}}` is now `{method: NAME, ...}`")


class Params(_Section):
    base: BaseParams = BaseParams()
    data: DataParams = DataParams()
    candidate: CandidateParams = CandidateParams()
    purify: Purify  # required: which purifier runs is never left to a default
    policy: PolicyParams = PolicyParams()
    export: ExportParams = ExportParams()
    probes: ProbesParams = ProbesParams()
    gate: GateConfig = GateConfig()
    promote: PromoteParams = PromoteParams()

    @model_validator(mode="before")
    @classmethod
    def _no_nft_section(cls, raw: Any) -> Any:
        """Refuse a file written before the ``purify`` section with what to change, not a bare "extra input"."""
        if isinstance(raw, dict) and "nft" in raw:
            raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(
                type=PydanticCustomError("section_moved", NFT_SECTION_MOVED), loc=("nft",), input=raw["nft"])])
        return raw


def _key(loc: tuple[int | str, ...], raw: Any) -> tuple[str, str | None]:
    """The dotted ``params.yaml`` key of an error's location, and the purification method it lies under (if any).

    Pydantic puts a discriminated union's tag into the location (``purify.nft.lr``); the file has no such key,
    so it is dropped (``purify.lr``), recognised by walking ``raw`` as the value of the mapping's ``method``."""
    parts: list[str] = []
    node, method, untagged = raw, None, None
    for part in loc:
        if isinstance(node, dict) and node is not untagged and node.get(METHOD) == part:
            method, untagged = str(part), node
            continue
        parts.append(str(part))
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(parts) or "<root>", method


def _describe(err: ValidationError, raw: Any) -> str:
    """One line per error of validating ``raw``: the key as ``params.yaml`` writes it, what is wrong, the value."""
    lines = []
    for e in err.errors():
        key, method = _key(e["loc"], raw)
        if e["type"] == "config_check":  # a purifier config's own check
            lines.append(f"  {key}={e['input']!r} is invalid: {e['msg']}")
        elif e["type"] == "extra_forbidden" and method is not None:
            lines.append(f"  {key} is not a field of method {method!r}")
        elif e["type"] == "union_tag_not_found":  # pydantic: "Unable to extract tag using discriminator 'method'"
            lines.append(f"  {key}.{METHOD}: Field required (one of {', '.join(map(repr, PURIFY_VARIANTS))})")
        else:
            got = "" if e["type"] == "missing" or isinstance(e.get("input"), dict) else f" (got {e.get('input')!r})"
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}{got}")
    return "\n".join(lines)


class StrictLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no type hints
    """``yaml.SafeLoader`` that refuses duplicate keys, anchors and aliases.

    A duplicate ``gate:`` key would otherwise let the second silently win, and aliases are how a YAML
    "billion laughs" bomb expands a few hundred bytes into gigabytes; ``params.yaml`` needs neither.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} is not allowed in params.yaml "
                                              "(anchors and aliases are refused)", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, f"anchor &{event.anchor} is not allowed in params.yaml "
                                              "(anchors and aliases are refused)", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str) -> Any:
    """Parse ``params.yaml`` text strictly (:class:`StrictLoader`); errors raise :class:`ParamsError`."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ParamsError(f"{source} is not valid YAML: {err}") from err


def parse_params(raw: dict[str, Any] | None, source: str = "params") -> Params:
    """Validate a parsed ``params.yaml`` mapping."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(f"{source} is invalid:\n{_describe(err, raw)}") from err


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``.

    Raises:
        ParamsError: the file is missing, not YAML, not a mapping, or invalid.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from err
    return parse_params_text(text, str(path))


def parse_params_text(text: str, source: str) -> Params:
    """Parse (strictly: no duplicate keys, anchors or aliases) and validate ``params.yaml`` text."""
    raw = load_yaml(text, source)
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{source} must be a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw, source)


#: Settings a pipeline run may override without editing the YAML: name -> what it sets (see :func:`apply_overrides`).
OVERRIDES: dict[str, str] = {
    "candidate_model": "candidate.model",
    "tracking_uri": "base.tracking_uri",
    "promote_name": "promote.name",
    "promote_alias": "promote.alias",
    "purify_method": "purify.method (the method's paper defaults unless the YAML already names that method)",
    "max_acc_drop": "gate.metrics: max_drop of the `acc` check",
    "max_asr_lift": "gate.metrics: max of the `asr_lift/*` check",
}


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any], source: str = "overrides") -> dict[str, Any]:
    """A copy of a parsed ``params.yaml`` mapping with the :data:`OVERRIDES` that are set (not ``None``) applied.

    A gate threshold override needs its check in ``gate.metrics`` (it changes a bound, it never adds a check);
    an unknown name raises :class:`ParamsError`. Validate the result with :func:`parse_params`.
    """
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ParamsError(f"{source}: unknown override(s) {unknown}; known: {sorted(OVERRIDES)}")
    out = copy.deepcopy(raw)

    def section(name: str) -> dict[str, Any]:
        value = out.setdefault(name, {})
        if not isinstance(value, dict):
            raise ParamsError(f"{source}: cannot override inside `{name}`, which is not a mapping")
        return value

    set_ = {k: v for k, v in overrides.items() if v is not None}
    if "candidate_model" in set_:
        section("candidate")["model"] = set_["candidate_model"]
    if "tracking_uri" in set_:
        section("base")["tracking_uri"] = set_["tracking_uri"]
    if "promote_name" in set_:
        section("promote")["name"] = set_["promote_name"]
    if "promote_alias" in set_:
        section("promote")["alias"] = set_["promote_alias"]
    if "purify_method" in set_ and section("purify").get("method") != set_["purify_method"]:
        out["purify"] = {"method": set_["purify_method"]}
    for name, metric, bound in (("max_acc_drop", "acc", "max_drop"), ("max_asr_lift", "asr_lift/*", "max")):
        if name not in set_:
            continue
        checks = section("gate").get("metrics")
        if checks is None:  # the gate's default checks, written out so that one bound can change
            checks = section("gate")["metrics"] = [c.model_dump(exclude_defaults=True)
                                                   for c in GateConfig().metrics]
        matching = [c for c in checks if isinstance(c, dict) and c.get("metric") == metric]
        if not matching:
            raise ParamsError(f"{source}: {name} sets the {bound} of the gate's `{metric}` check, and gate.metrics "
                              f"has no such check")
        for check in matching:
            check[bound] = set_[name]
    return out


def parse_params_with_overrides(text: str, source: str, overrides: dict[str, Any]) -> Params:
    """:func:`parse_params_text` with :func:`apply_overrides` applied before validation."""
    raw = load_yaml(text, source)
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{source} must be a mapping of sections, got {type(raw).__name__}")
    return parse_params(apply_overrides(raw or {}, overrides, source), source)


def local_tracking_uri(uri: str) -> bool:
    """Whether ``uri`` names a registry only the local machine sees (an sqlite file): each pod of a cluster
    run would open its own empty one."""
    return urlsplit(uri).scheme in ("sqlite", "file", "")
