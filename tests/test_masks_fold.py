"""Masks attach without changing the model, train alone, and fold back exactly."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from nft_core.fold import fold_masks
from nft_core.masks import (
    attach_masks,
    forward_order,
    load_mask_state,
    mask_l1_distance,
    mask_modules,
    mask_parameters,
    mask_state,
)
from nft_core.models import Normalized, build_model

ARCHS = [("small_cnn", {}), ("preact_resnet18", {"width": 8}), ("small_vit", {"dim": 24, "depth": 2, "heads": 2})]


def _model(builder, kwargs):
    torch.manual_seed(0)
    return Normalized(build_model(builder, num_classes=10, **kwargs), [0.5] * 3, [0.25] * 3)


def _randomise_masks(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in mask_parameters(model):
            p.copy_(torch.rand(p.shape, generator=g) * 0.9 + 0.1)


@pytest.mark.parametrize("placement", ["norm", "weight"])
@pytest.mark.parametrize("builder,kwargs", ARCHS, ids=[a[0] for a in ARCHS])
def test_fold_equals_masked_model(builder, kwargs, placement):
    model = _model(builder, kwargs)
    reference = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    classes = {name: type(m) for name, m in model.named_modules()}
    x = torch.rand(6, 3, 32, 32)
    layers = attach_masks(model, placement, x[:1])
    assert len(layers) > 0
    _randomise_masks(model)
    model.eval()
    with torch.no_grad():
        masked = model(x)
        folded = fold_masks(model)(x)
    assert (masked - folded).abs().max().item() <= 1e-5
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == reference
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


@pytest.mark.parametrize("placement", ["norm", "weight"])
def test_masks_start_at_one_and_do_not_change_outputs(placement):
    model = _model("small_cnn", {}).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        attach_masks(model, placement, x[:1])
        after = model(x)
    assert torch.equal(before, after)
    assert all(torch.all(p == 1) for p in mask_parameters(model))


@pytest.mark.parametrize("placement", ["norm", "weight"])
@pytest.mark.parametrize("builder,kwargs", ARCHS, ids=[a[0] for a in ARCHS])
def test_every_mask_gets_a_gradient_and_nothing_else(builder, kwargs, placement):
    model = _model(builder, kwargs)
    x = torch.rand(8, 3, 32, 32)
    attach_masks(model, placement, x[:1])
    model.train()
    nn.functional.cross_entropy(model(x), torch.arange(8) % 10).backward()
    masks = {id(p) for p in mask_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in masks:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("placement,first", [("weight", "net.features.0"), ("norm", "net.features.1")])
def test_first_layer_skipped_and_layers_in_forward_order(placement, first):
    model = _model("small_cnn", {})
    x = torch.rand(1, 3, 32, 32)
    order = forward_order(model, placement, x)
    assert order[0] == first
    layers = attach_masks(model, placement, x)
    assert [layer.name for layer in layers] == order[1:]
    assert [layer.index for layer in layers] == list(range(1, len(order)))
    assert not parametrize.is_parametrized(dict(model.named_modules())[first])


def test_forward_order_differs_from_registration_order():
    class Reversed(nn.Module):  # registers b before a, runs a before b
        def __init__(self):
            super().__init__()
            self.b = nn.Linear(4, 2)
            self.a = nn.Linear(3, 4)

        def forward(self, x):
            return self.b(self.a(x))

    model = Reversed()
    layers = attach_masks(model, "weight", torch.rand(1, 3), skip_first=False)
    assert [layer.name for layer in layers] == ["a", "b"]


def test_bias_is_never_masked():
    model = _model("small_vit", {"dim": 24, "depth": 1, "heads": 2})
    attach_masks(model, "weight", torch.rand(1, 3, 32, 32))
    for m in model.modules():
        if parametrize.is_parametrized(m):
            assert list(m.parametrizations.keys()) == ["weight"]
            if getattr(m, "bias", None) is not None:
                assert isinstance(m.bias, nn.Parameter) and not m.bias.requires_grad


def test_regulariser_matches_hand_computation():
    model = _model("small_cnn", {})
    attach_masks(model, "norm", torch.rand(1, 3, 32, 32))
    values = []
    with torch.no_grad():
        for i, p in enumerate(mask_parameters(model)):
            v = torch.linspace(0.2, 1.0, p.numel()) ** (i + 1)
            p.copy_(v)
            values.extend(v.tolist())
    expected = sum(abs(v - 1) for v in values)
    assert mask_l1_distance(model).item() == pytest.approx(expected, rel=1e-5)


def test_attach_twice_and_nothing_to_mask_are_errors():
    model = _model("small_cnn", {})
    x = torch.rand(1, 3, 32, 32)
    attach_masks(model, "norm", x)
    with pytest.raises(ValueError, match="already carries"):
        attach_masks(model, "weight", x)
    with pytest.raises(ValueError, match="no layers to mask"):
        attach_masks(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), "norm", x)
    with pytest.raises(ValueError, match="placement"):
        attach_masks(_model("small_cnn", {}), "gamma", x)


def test_mask_modules_sorted_by_layer_index():
    model = _model("preact_resnet18", {"width": 8})
    attach_masks(model, "weight", torch.rand(1, 3, 32, 32))
    assert [m.layer_index for _, m in mask_modules(model)] == list(range(1, len(mask_modules(model)) + 1))


def test_mask_state_round_trip_and_mismatch():
    source = _model("small_cnn", {})
    x = torch.rand(1, 3, 32, 32)
    attach_masks(source, "weight", x)
    _randomise_masks(source)
    state = mask_state(source)
    target = _model("small_cnn", {})
    attach_masks(target, "weight", x)
    load_mask_state(target, state)
    assert torch.equal(torch.cat(list(mask_state(target).values())), torch.cat(list(state.values())))
    other = _model("small_cnn", {})
    attach_masks(other, "norm", x)
    with pytest.raises(ValueError, match="do not match"):
        load_mask_state(other, state)


def test_masks_are_made_on_the_device_of_the_weights_they_scale():
    # the first GPU run failed here: masks were created on the CPU beside CUDA weights. The meta device stands
    # in for CUDA on a machine without one (a forward pass on meta tensors runs shapes only).
    torch.manual_seed(0)
    for placement in ("norm", "weight"):
        model = build_model("preact_resnet18", num_classes=10, width=4).to("meta")
        attach_masks(model, placement, torch.zeros(1, 3, 32, 32, device="meta"))
        assert {p.device.type for p in mask_parameters(model)} == {"meta"}
    from nft_core.defenses.anp import attach_perturbations

    model = build_model("preact_resnet18", num_classes=10, width=4).to("meta")
    attach_perturbations(model, torch.zeros(1, 3, 32, 32, device="meta"))
    assert {p.device.type for p in model.parameters() if p.requires_grad} == {"meta"}
