"""Model packages: round trip, and every way a hostile or broken package is refused."""

import json
import logging

import pytest
import safetensors.torch
import torch

from harden.integrity import sha256_file
from harden.package import InputSpec, ModelSpec, PackageError, load_package, save_package


def _edit_json(pkg, **changes):
    spec = json.loads((pkg / "model.json").read_text())
    spec.update(changes)
    (pkg / "model.json").write_text(json.dumps(spec))


def _rewrite_weights(pkg, state):
    """Replace the weights and re-record their sha256, so that only the content check can object."""
    safetensors.torch.save_file(state, str(pkg / "model.safetensors"))
    _edit_json(pkg, weights_sha256=sha256_file(pkg / "model.safetensors"))


def test_round_trip_outputs_identical(make_package):
    net, spec, pkg = make_package()
    loaded, loaded_spec = load_package(pkg)
    x = torch.rand(5, 3, 32, 32)
    assert not loaded.training
    assert torch.equal(net(x), loaded(x))
    assert loaded_spec.model_dump(exclude={"weights_sha256"}) == spec.model_dump(exclude={"weights_sha256"})
    assert loaded_spec.weights_sha256 == sha256_file(pkg / "model.safetensors")


def test_save_replaces_existing_package_atomically(make_package, tmp_path):
    _, _, pkg = make_package(seed=0)
    _, _, again = make_package(seed=1)
    assert again == pkg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]  # no temporary or .old leftovers


def test_failed_save_leaves_previous_package(make_package):
    net, spec, pkg = make_package()
    before = sha256_file(pkg / "model.safetensors")
    wrong = spec.model_copy(update={"num_classes": 5})
    with pytest.raises(PackageError, match="classifier"):
        save_package(net, wrong, pkg)
    assert sha256_file(pkg / "model.safetensors") == before
    load_package(pkg)


def test_unknown_builder_refused(make_package):
    _, _, pkg = make_package()
    _edit_json(pkg, builder="evil.module.Backdoor")
    with pytest.raises(PackageError, match="evil.module.Backdoor.*allow-list"):
        load_package(pkg)


def test_unknown_spec_key_refused(make_package):
    _, _, pkg = make_package()
    _edit_json(pkg, entry_point="os.system")
    with pytest.raises(PackageError, match="entry_point"):
        load_package(pkg)


def test_tampered_sha256_refused(make_package):
    _, _, pkg = make_package()
    _edit_json(pkg, weights_sha256="0" * 64)
    with pytest.raises(PackageError, match="sha256"):
        load_package(pkg)


@pytest.mark.parametrize("rerecord_sha", [False, True], ids=["sha-mismatch", "sha-rerecorded"])
def test_truncated_safetensors_refused(make_package, rerecord_sha):
    _, _, pkg = make_package()
    weights = pkg / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    if rerecord_sha:  # a supplier who re-records the digest of the truncated file: the parse still refuses it
        _edit_json(pkg, weights_sha256=sha256_file(weights))
    with pytest.raises(PackageError, match="truncated or corrupt" if rerecord_sha else "sha256"):
        load_package(pkg)


def test_a_package_without_the_weights_digest_is_refused(make_package):
    _, _, pkg = make_package()
    _edit_json(pkg, weights_sha256=None)
    with pytest.raises(PackageError, match="weights_sha256 is missing"):
        load_package(pkg)


def test_missing_weights_refused(make_package):
    _, _, pkg = make_package()
    (pkg / "model.safetensors").unlink()
    with pytest.raises(PackageError, match="model.safetensors is missing"):
        load_package(pkg)


def test_wrong_key_refused(make_package):
    net, _, pkg = make_package()
    state = dict(net.state_dict())
    state["classifier.extra"] = state.pop("classifier.bias")
    _rewrite_weights(pkg, state)
    with pytest.raises(PackageError, match=r"missing \['classifier.bias'\].*unexpected \['classifier.extra'\]"):
        load_package(pkg)


def test_wrong_shape_refused(make_package):
    net, _, pkg = make_package()
    state = dict(net.state_dict())
    state["features.0.weight"] = torch.zeros(8, 3, 5, 5)
    _rewrite_weights(pkg, state)
    with pytest.raises(PackageError, match=r"'features.0.weight' has shape \(8, 3, 5, 5\).*\(8, 3, 3, 3\)"):
        load_package(pkg)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_refused(make_package, bad):
    net, _, pkg = make_package()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["features.1.weight"][3] = bad
    _rewrite_weights(pkg, state)
    with pytest.raises(PackageError, match="'features.1.weight' has 1 non-finite"):
        load_package(pkg)


def test_num_classes_mismatch_refused(make_package):
    _, _, pkg = make_package()
    _edit_json(pkg, num_classes=5)
    with pytest.raises(PackageError, match=r"'classifier.weight' has shape \(10, 32\).*\(5, 32\)"):
        load_package(pkg)


def test_spec_validation_names_the_value():
    with pytest.raises(ValueError, match="kwargs.num_classes=5 != num_classes=10"):
        ModelSpec(builder="small_cnn", kwargs={"num_classes": 5}, num_classes=10,
                  input=InputSpec(channels=3, height=32, width=32, mean=[0.5] * 3, std=[0.25] * 3))
    with pytest.raises(ValueError, match="input.std has 1 values, expected channels=3"):
        InputSpec(channels=3, height=32, width=32, mean=[0.5] * 3, std=[0.25])


def test_input_size_inconsistent_with_model_refused(make_package):
    _, _, pkg = make_package()
    _edit_json(pkg, input={"channels": 1, "height": 32, "width": 32, "mean": [0.5], "std": [0.25]})
    with pytest.raises(PackageError, match=r"does not accept input \(1, 1, 32, 32\)"):
        load_package(pkg)


def test_pickle_refused_and_never_unpickled(make_package, malicious_pickle, tmp_path):
    _, _, pkg = make_package()
    marker = tmp_path / "pwned"
    (pkg / "model.safetensors").unlink()
    (pkg / "model.pkl").write_bytes(malicious_pickle(marker))
    with pytest.raises(PackageError, match=r"model.pkl.*allow_pickle=True"):
        load_package(pkg)
    assert not marker.exists()


def test_pickle_opt_in_warns_and_loads_weights(make_package, tmp_path, caplog):
    net, _, pkg = make_package()
    (pkg / "model.safetensors").unlink()
    torch.save(net, pkg / "model.pt")
    with caplog.at_level(logging.WARNING, logger="harden.package"):
        loaded, _ = load_package(pkg, allow_pickle=True)
    assert "allow_pickle=True" in caplog.text
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(net(x), loaded(x))


# ------------------------------------------------- issue 12: a supplier's model.json is verified first ------

BOMBS = {  # model.json edits of a hostile supplier, and what the refusal must name
    "billion-classes": ({"num_classes": 1_000_000_000}, "num_classes"),
    "many-classes-small-weights": ({"num_classes": 999_999}, r"'classifier.weight' has shape \(10, 32\)"),
    "huge-width": ({"kwargs": {"width": 1_000_000}}, r"has shape \(8, 3, 3, 3\).*\(1000000, 3, 3, 3\)"),
    "huge-input": ({"input": {"channels": 3, "height": 100_000, "width": 100_000, "mean": [0.5] * 3,
                              "std": [0.25] * 3}}, "input.height"),
    "big-architecture": ({"builder": "torchvision.vit_h_14", "kwargs": {}}, "keys do not match"),
    "unknown-kwarg": ({"kwargs": {"width": 8, "depth_multiplier": 3}}, "cannot be built with kwargs"),
    "long-list-kwarg": ({"kwargs": {"width": 8, "layers": list(range(1000))}}, "kwargs.layers is a list of 1000"),
    "nested-kwarg": ({"kwargs": {"width": {"$ref": "x"}}}, "kwargs.width must be"),
    "tiny-std": ({"input": {"channels": 3, "height": 32, "width": 32, "mean": [0.5] * 3, "std": [1e-300] * 3}},
                 "input.std"),
}


@pytest.mark.parametrize("bomb", list(BOMBS))
def test_a_hostile_model_spec_is_refused_before_anything_is_built(make_package, bomb):
    changes, message = BOMBS[bomb]
    _, _, pkg = make_package()
    _edit_json(pkg, **changes)
    with pytest.raises(PackageError, match=message):
        load_package(pkg)


def test_a_spec_file_too_large_to_be_a_spec_is_refused_unread(make_package):
    _, _, pkg = make_package()
    _edit_json(pkg, kwargs={"width": 8, "layers": list(range(3_000_000))})
    with pytest.raises(PackageError, match="a model spec is at most"):
        load_package(pkg)


@pytest.mark.parametrize("dtype, fill, message", [
    (torch.float64, 1e300, "stored as F64"),        # finite in float64, inf in float32
    (torch.int32, 1, "stored as I32"),
    (torch.float16, float("inf"), "non-finite"),
])
def test_weight_dtypes_outside_float32_16_bf16_or_non_finite_after_the_cast_are_refused(make_package, dtype,
                                                                                         fill, message):
    net, _, pkg = make_package()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["features.0.weight"] = torch.full_like(state["features.0.weight"], fill, dtype=dtype)
    _rewrite_weights(pkg, state)
    with pytest.raises(PackageError, match=message):
        load_package(pkg)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_loaded_as_float32(make_package, dtype):
    net, _, pkg = make_package()
    _rewrite_weights(pkg, {k: v.to(dtype) if v.is_floating_point() else v for k, v in net.state_dict().items()})
    loaded, _ = load_package(pkg)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded(x), net(x), atol=0.05)


MEMORY_PROBE = """
import json, resource, sys, time
from harden.package import PackageError, load_package
import torch, torchvision  # imported before the baseline, as in the pull stage
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    load_package(sys.argv[1])
    refused = False
except PackageError:
    refused = True
print(json.dumps({"refused": refused, "seconds": time.perf_counter() - start,
                  "extra_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def test_a_memory_bomb_package_is_refused_without_allocating_it(make_package):
    """A billion-class head behind a huge width used to allocate until the machine died; now the shapes are
    compared on the meta device first. Peak memory is measured in a fresh process (no timing asserted)."""
    import subprocess
    import sys

    _, _, pkg = make_package()
    _edit_json(pkg, num_classes=999_999, kwargs={"width": 100_000})
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(pkg)], capture_output=True, text=True,
                         timeout=300, check=True)
    result = json.loads(out.stdout)
    assert result["refused"] and result["extra_mib"] < 200, result


def test_every_allow_listed_builder_can_be_checked_without_allocating_it():
    """The meta-device build is how packages are verified before anything is allocated; a builder that cannot
    run on meta (RegNet computes its widths with tensors) must still be checkable, or its packages would not load."""
    from nft_core.models import available_builders

    spec = {"num_classes": 10, "input": InputSpec(channels=3, height=32, width=32, mean=[0.5] * 3, std=[0.25] * 3)}
    for builder in available_builders():
        state = ModelSpec(builder=builder, **spec).build(device="meta").state_dict()
        assert all(t.device.type == "meta" for t in state.values() if t.is_floating_point() and t.dim() > 1), builder


def test_a_regnet_package_round_trips(make_package):
    net, _, pkg = make_package(builder="torchvision.regnet_x_400mf")
    loaded, _ = load_package(pkg)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded(x), net(x))
