"""``params.yaml`` validation: the repository's file is valid, and every kind of mistake is refused with a
:class:`ParamsError` that names the bad key and what is allowed; ``nft-harden check-params`` exits 2 / 0."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from harden.params import Params, ParamsError, load_params, parse_params
from pipeline_fixtures import REPO, describe, run_cli, tiny_params, write_params


@pytest.fixture(scope="module")
def repo_params() -> dict[str, Any]:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repo_params_validate(repo_params: dict[str, Any]) -> None:
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    # What the file says is what was loaded (no key silently dropped or defaulted).
    assert params.nft.epochs == repo_params["nft"]["epochs"]
    assert params.candidate.model == repo_params["candidate"]["model"]
    assert [p.attack for p in params.probes.attacks] == [p["attack"] for p in repo_params["probes"]["attacks"]]
    assert len(params.gate.metrics) == len(repo_params["gate"]["metrics"])
    assert params.promote.alias == repo_params["promote"]["alias"]


def test_tiny_params_validate() -> None:
    params = parse_params(tiny_params())
    assert params.data.clean_per_class == 5 and params.data.clean_fraction is None
    assert params.nft.epochs == 3 and params.candidate.demo.epochs == 2


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
    ("unknown-nft-key", _set("nft.foo", 1), [r"nft\.foo", r"[Ee]xtra inputs are not permitted|not permitted"]),
    ("unknown-gate-key", _set("gate.typo", True), [r"gate\.typo", r"not permitted"]),
    ("unknown-section", _set("bogus", {}), [r"(?m)^\s*bogus:", r"not permitted"]),
    ("epochs-not-int", _set("nft.epochs", "ten"), [r"nft\.epochs", r"integer", r"'ten'"]),
    ("negative-lr", _set("nft.lr", -0.1), [r"\bnft\b", r"\blr=-0\.1", r"> 0"]),
    ("mix-alpha-zero", _set("nft.mix_alpha", 0), [r"\bnft\b", r"\bmix_alpha=0", r"> 0"]),
    ("schedule-alpha-above-1", _set("nft.schedule_alpha", 1.5), [r"\bnft\b", r"\bschedule_alpha=1\.5", r"\(0, 1\]"]),
    ("momentum-1", _set("nft.momentum", 1.0), [r"\bmomentum=1\.0", r"\[0, 1\)"]),
    ("unknown-defense", _set("nft.defense", "magic"), [r"nft\.defense", r"'nft'", r"'fip'"]),
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


@pytest.mark.parametrize("text, pattern", [("nft: [unclosed", r"not valid YAML"),
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
    assert resolved["nft"]["epochs"] == repo_params["nft"]["epochs"]

    raw = copy.deepcopy(repo_params)
    raw["nft"]["schedule_alpha"] = 1.5
    bad = run_cli(["check-params", "--params", str(write_params(tmp_path / "bad.yaml", raw))], cwd=tmp_path)
    assert bad.returncode == 2, describe(bad)
    assert "schedule_alpha=1.5" in bad.stderr and "Traceback" not in bad.stderr, describe(bad)

    missing = run_cli(["check-params"], cwd=tmp_path)  # default ./params.yaml, absent here
    assert missing.returncode == 2, describe(missing)
    assert "params.yaml" in missing.stderr, describe(missing)


def test_the_schema_knows_every_attack_and_defense_by_name() -> None:
    """The schema lists the names itself (so it imports no torch); they must stay those of the registries."""
    from harden.params import _DEFENSES
    from harden.probes import ATTACK_NAMES
    from nft_core.attacks import ATTACKS
    from nft_core.defenses import DEFENSES

    assert ATTACK_NAMES == ATTACKS
    assert sorted(_DEFENSES) == sorted(DEFENSES)


def test_the_schema_and_the_cli_import_no_torch() -> None:
    """`check-params` answers before torch, onnxruntime, mlflow or kfp would have loaded (about a second each)."""
    import subprocess
    import sys

    code = ("import sys, harden.params, pipeline.cli, harden.stage_table; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'mlflow', 'torchvision', 'kfp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
