"""``params.yaml`` validation: the repository's file is valid, and every kind of mistake is refused with a
:class:`ParamsError` that names the bad key and what is allowed; ``nft-harden check-params`` exits 2 / 0. The
``purify`` section and each policy fallback are one variant per purifier config, picked by ``method``."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from harden.params import NFT_SECTION_MOVED, PURIFY_VARIANTS, Params, ParamsError, load_params, parse_params
from nft_core.config import CONFIGS
from pipeline_fixtures import REPO, describe, run_cli, tiny_params, write_params


@pytest.fixture(scope="module")
def repo_params() -> dict[str, Any]:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repo_params_validate(repo_params: dict[str, Any]) -> None:
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    # What the file says is what was loaded (no key silently dropped or defaulted).
    assert params.purify.model_dump(exclude_unset=True) == repo_params["purify"]
    assert [f.model_dump(exclude_unset=True) for f in params.policy.fallbacks] == repo_params["policy"]["fallbacks"]
    assert params.candidate.model == repo_params["candidate"]["model"]
    assert [p.attack for p in params.probes.attacks] == [p["attack"] for p in repo_params["probes"]["attacks"]]
    assert len(params.gate.metrics) == len(repo_params["gate"]["metrics"])
    assert params.promote.alias == repo_params["promote"]["alias"]
    assert parse_params(params.model_dump(mode="json")) == params  # what check-params prints loads back the same


def test_tiny_params_validate() -> None:
    params = parse_params(tiny_params())
    assert params.data.clean_per_class == 5 and params.data.clean_fraction is None
    assert params.purify.epochs == 3 and params.candidate.demo.epochs == 2


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = raw
        for key in parents:
            node = node[key]
        node[leaf] = value
    return change


def _add_probe(probe: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    return lambda raw: raw["probes"]["attacks"].append(probe)


# (id, change to the repo's params, patterns that must all appear in the message: the key, and what is allowed)
BAD = [
    ("unknown-purify-key", _set("purify.foo", 1), [r"purify\.foo is not a field of method 'nft'"]),
    ("field-of-another-method", _set("purify.rho", 1.0), [r"purify\.rho is not a field of method 'nft'"]),
    ("unknown-gate-key", _set("gate.typo", True), [r"gate\.typo", r"not permitted"]),
    ("unknown-section", _set("bogus", {}), [r"(?m)^\s*bogus:", r"not permitted"]),
    ("epochs-not-int", _set("purify.epochs", "ten"), [r"purify\.epochs", r"integer", r"'ten'"]),
    ("negative-lr", _set("purify.lr", -0.1), [r"purify\.lr=-0\.1 is invalid", r"> 0"]),
    ("mix-alpha-zero", _set("purify.mix_alpha", 0), [r"purify\.mix_alpha=0\.0 is invalid", r"> 0"]),
    ("schedule-alpha-above-1", _set("purify.schedule_alpha", 1.5), [r"purify\.schedule_alpha=1\.5", r"\(0, 1\]"]),
    ("momentum-1", _set("purify.momentum", 1.0), [r"purify\.momentum=1\.0", r"\[0, 1\)"]),
    ("lr-min-above-lr", _set("purify.lr_min", 0.5), [r"purify\.lr_min=0\.5", r"\[0, lr=0\.2\]"]),
    ("unknown-method", _set("purify.method", "magic"), [r"\bpurify:", r"'magic'", r"'nft'", r"'fip'"]),
    ("no-method", lambda raw: raw["purify"].pop("method"), [r"purify\.method: Field required", r"'ft_sam'"]),
    ("no-purify-section", lambda raw: raw.pop("purify"), [r"(?m)^\s*purify: Field required"]),
    ("fallback-field-of-another-method", _set("policy.fallbacks", [{"method": "ft_sam"}, {"method": "pbe", "rho": 1}]),
     [r"policy\.fallbacks\.1\.rho is not a field of method 'pbe'"]),
    ("fallback-out-of-range", _set("policy.fallbacks", [{"method": "ft_sam", "label_smoothing": 1.0}]),
     [r"policy\.fallbacks\.0\.label_smoothing=1\.0 is invalid", r"\[0, 1\)"]),
    ("fallback-no-method", _set("policy.fallbacks", [{"epochs": 5}]), [r"policy\.fallbacks\.0\.method: Field required"]),
    ("fallback-old-shape", _set("policy.fallbacks", [{"defense": "pbe", "options": {}}]),
     [r"policy\.fallbacks\.0\.method: Field required"]),
    ("policy-margin-negative", _set("policy.margin", -0.01), [r"policy\.margin: Input should be greater than or equal to 0 \(got -0\.01\)"]),
    ("margin-starts-zero", _set("probes.margin.starts", 0),
     [r"probes\.margin\.starts: Input should be greater than or equal to 1 \(got 0\)"]),
    ("both-clean-sizes", _set("data.clean_per_class", 5),
     [r"\bdata\b", r"data\.clean_fraction", r"data\.clean_per_class", r"exactly one"]),
    ("no-clean-size", _set("data.clean_fraction", None), [r"data\.clean_fraction", r"exactly one"]),
    ("clean-fraction-above-1", _set("data.clean_fraction", 1.5), [r"data\.clean_fraction", r"less than or equal to 1"]),
    ("unknown-probe-attack", _add_probe({"attack": "nosuch", "target": 0}),
     [r"probes\.attacks\.2", r"'nosuch'", r"badnets", r"wanet"]),
    ("probe-bad-mode", _add_probe({"attack": "badnets", "mode": "one2many"}),
     [r"probes\.attacks\.2\.mode", r"'all2one'", r"'all2all'"]),
    ("probe-two-sources", _add_probe({"attack": "badnets", "npz": "x.npz"}), [r"probes\.attacks\.2", r"exactly one"]),
    ("gate-threshold-out-of-range", lambda raw: raw["gate"]["metrics"].append({"metric": "acc", "min": 1.01}),
     [r"gate\.metrics\.\d+: check on 'acc'", r"min=1\.01", r"\[0, 1\]"]),
    ("gate-wrong-direction", lambda raw: raw["gate"]["metrics"].append({"metric": "asr/*", "max_drop": 0.1}),
     [r"gate\.metrics\.\d+: check on 'asr/\*'", r"max_drop", r"max_increase"]),
    ("scan-samples-too-few", _set("probes.scan.samples", 3),
     [r"probes\.scan\.samples", r"greater than or equal to 10"]),
    ("seed-negative", _set("base.seed", -1), [r"base\.seed", r"greater than or equal to 0"]),
    ("empty-promote-name", _set("promote.name", ""), [r"promote\.name", r"at least 1"]),
]


@pytest.mark.parametrize("change, patterns", [pytest.param(c, p, id=i) for i, c, p in BAD])
def test_bad_params_name_key_and_allowed(repo_params: dict[str, Any], change, patterns: list[str]) -> None:
    raw = copy.deepcopy(repo_params)
    change(raw)
    with pytest.raises(ParamsError) as info:
        parse_params(raw, "params.yaml")
    message = str(info.value)
    assert message.startswith("params.yaml is invalid")
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in:\n{message}"


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_every_method_loads_with_its_config_defaults(method: str) -> None:
    """``{method: NAME}`` alone is that purifier at its defaults, and its fields are exactly the config's but
    the runtime ones (so a field added to a config dataclass appears in params.yaml by itself)."""
    purify = parse_params({"purify": {"method": method}}).purify
    assert purify.config(seed=3, device="cpu", progress=False) == CONFIGS[method](seed=3, device="cpu", progress=False)
    fields = set(CONFIGS[method].__dataclass_fields__) - {"seed", "device", "progress"}
    assert set(type(purify).model_fields) == fields | {"method"}


def test_fallbacks_load_as_configs(repo_params: dict[str, Any]) -> None:
    raw = copy.deepcopy(repo_params)
    raw["policy"]["fallbacks"] = [{"method": "ft_sam"}, {"method": "pbe", "epochs": 3}, {"method": "nft", "lr": 0.1}]
    configs = [f.config(seed=1, device="cpu") for f in parse_params(raw).policy.fallbacks]
    assert [type(c) for c in configs] == [CONFIGS["ft_sam"], CONFIGS["pbe"], CONFIGS["nft"]]
    assert configs[1].epochs == 3 and configs[2].lr == 0.1 and all(c.seed == 1 for c in configs)
    assert configs[2].lr_min == CONFIGS["nft"]().lr_min  # a fallback changes the method's defaults, not `purify`'s


def test_an_nft_section_is_refused_with_what_to_change(tmp_path: Path) -> None:
    """A file written for the ``nft`` section fails closed (exit 2), saying how to migrate it."""
    old = {"nft": {"defense": "ft", "epochs": 5, "options": {"lr": 0.1}},
           "policy": {"fallbacks": [{"defense": "pbe", "options": {"epochs": 10}}]}}
    with pytest.raises(ParamsError) as info:
        parse_params(old, "params.yaml")
    assert str(info.value) == f"params.yaml is invalid:\n  nft: {NFT_SECTION_MOVED}"
    for hint in ("`purify` with `method: nft`", "`defense` became `method`", "`options` moved into the section"):
        assert hint in NFT_SECTION_MOVED
    proc = run_cli(["check-params", "--params", str(write_params(tmp_path / "old.yaml", old))], cwd=tmp_path)
    assert proc.returncode == 2 and NFT_SECTION_MOVED in proc.stderr, describe(proc)


def test_every_bad_key_is_reported_at_once(repo_params: dict[str, Any]) -> None:
    raw = copy.deepcopy(repo_params)
    raw["gate"]["typo"] = 1
    raw["export"]["atol"] = -1
    with pytest.raises(ParamsError, match=r"(?s)export\.atol.*gate\.typo|gate\.typo.*export\.atol"):
        parse_params(raw)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "params.yaml"
    with pytest.raises(ParamsError, match=re.escape(str(missing))):
        load_params(missing)


@pytest.mark.parametrize("text, pattern", [("purify: [unclosed", r"not valid YAML"),
                                           ("- a\n- b\n", r"must be a mapping of sections, got list")])
def test_unreadable_yaml(tmp_path: Path, text: str, pattern: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=pattern):
        load_params(path)


def test_check_params_cli(tmp_path: Path, repo_params: dict[str, Any]) -> None:
    good = run_cli(["check-params", "--params", str(REPO / "params.yaml")], cwd=tmp_path)
    assert good.returncode == 0, describe(good)
    resolved = yaml.safe_load(good.stdout)  # the resolved configuration, as JSON
    assert resolved["purify"].items() >= repo_params["purify"].items()  # plus the fields left at their defaults

    raw = copy.deepcopy(repo_params)
    raw["purify"]["schedule_alpha"] = 1.5
    bad = run_cli(["check-params", "--params", str(write_params(tmp_path / "bad.yaml", raw))], cwd=tmp_path)
    assert bad.returncode == 2, describe(bad)
    assert "purify.schedule_alpha=1.5" in bad.stderr and "Traceback" not in bad.stderr, describe(bad)

    missing = run_cli(["check-params"], cwd=tmp_path)  # default ./params.yaml, absent here
    assert missing.returncode == 2, describe(missing)
    assert "params.yaml" in missing.stderr, describe(missing)


def test_the_schema_knows_every_attack_and_defense_by_name() -> None:
    """The schema takes the names from torch-free modules; they must stay those of the registries."""
    from harden.probes import ATTACK_NAMES
    from nft_core.attacks import ATTACKS
    from nft_core.defenses import DEFENSES

    assert ATTACK_NAMES == ATTACKS
    assert sorted(PURIFY_VARIANTS) == sorted(DEFENSES)


def test_the_schema_and_the_cli_import_no_torch() -> None:
    """`check-params` answers before torch, onnxruntime, mlflow or kfp would have loaded (about a second each)."""
    import subprocess
    import sys

    code = ("import sys, harden.params, pipeline.cli, harden.stage_table; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'mlflow', 'torchvision', 'kfp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_run_overrides_change_only_what_they_name(repo_params: dict[str, Any]) -> None:
    """The pipeline's run parameters beside params_yaml (harden.params.OVERRIDES): each set one changes its
    setting, None leaves it, a gate bound changes the existing check's bound and never adds a check."""
    from harden.params import apply_overrides

    before = copy.deepcopy(repo_params)
    raw = apply_overrides(repo_params, {"candidate_model": "models:/other@staging", "tracking_uri": "http://mlflow:5000",
                                        "promote_alias": "prod", "purify_method": "pbe", "max_acc_drop": 0.01,
                                        "max_asr_lift": None})
    assert repo_params == before, "the input mapping must not change"
    p = parse_params(raw)
    assert (p.candidate.model, p.base.tracking_uri, p.promote.alias) == ("models:/other@staging", "http://mlflow:5000", "prod")
    assert p.purify.method == "pbe" and p.purify.config().to_dict() == CONFIGS["pbe"]().to_dict()
    assert [(c.metric, c.max_drop, c.max) for c in p.gate.metrics] == [
        (c.metric, 0.01 if c.metric == "acc" else c.max_drop, c.max) for c in parse_params(repo_params).gate.metrics]
    same_method = parse_params(apply_overrides(repo_params, {"purify_method": repo_params["purify"]["method"]}))
    assert same_method.purify == parse_params(repo_params).purify, "naming the YAML's own method keeps its settings"
    assert parse_params(apply_overrides(repo_params, {})) == parse_params(repo_params)


@pytest.mark.parametrize("overrides, pattern", [
    ({"max_acc_drop": 0.01, "gate_typo": 1}, r"unknown override\(s\) \['gate_typo'\]"),
    ({"max_asr_lift": 0.1}, r"max_asr_lift sets the max of the gate's `asr_lift/\*` check, and gate.metrics has no such check"),
])
def test_bad_run_overrides_are_refused(repo_params: dict[str, Any], overrides: dict[str, Any], pattern: str) -> None:
    from harden.params import apply_overrides

    raw = copy.deepcopy(repo_params)
    raw["gate"]["metrics"] = [{"metric": "acc", "max_drop": 0.03}]
    with pytest.raises(ParamsError, match=pattern):
        apply_overrides(raw, overrides)


def test_an_invalid_override_value_fails_validation_naming_the_key(repo_params: dict[str, Any]) -> None:
    from harden.params import apply_overrides

    with pytest.raises(ParamsError, match=r"promote.alias"):
        parse_params(apply_overrides(repo_params, {"promote_alias": "no spaces allowed"}))
    with pytest.raises(ParamsError, match=r"purify"):
        parse_params(apply_overrides(repo_params, {"purify_method": "magic"}))
