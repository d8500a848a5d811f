"""nft_core.attacks: each trigger changes only what it should, value range, determinism, label mapping,
poisoning rates, and probes whose ASR leaves target-class samples out."""

from __future__ import annotations

import pytest
import torch

from nft_core.attacks import ATTACKS, make_attack
from nft_core.data import make_synthetic
from nft_core.metrics import attack_success_rate


@pytest.fixture(scope="module")
def data():
    return make_synthetic(200, seed=0)


@pytest.fixture(scope="module")
def images(data):
    return data.images()


@pytest.mark.parametrize("name", ATTACKS)
def test_output_range_shape_and_determinism(name, images):
    out = make_attack(name, seed=3).apply(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, images)
    assert torch.equal(out, make_attack(name, seed=3).apply(images))


@pytest.mark.parametrize("name", ["blend", "trojan", "wanet"])
def test_seeded_pattern_depends_on_seed(name, images):
    assert not torch.equal(make_attack(name, seed=0).apply(images), make_attack(name, seed=1).apply(images))


def test_badnets_changes_only_the_patch(images):
    out = make_attack("badnets").apply(images)
    changed = (out != images).any(dim=(0, 1))
    patch = torch.zeros(32, 32, dtype=torch.bool)
    patch[28:31, 28:31] = True
    assert not changed[~patch].any()
    expected = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    assert torch.equal(out[:, :, 28:31, 28:31], expected.expand(len(images), 3, 3, 3))


def test_blend_moves_every_pixel_toward_the_pattern_by_alpha(images):
    attack = make_attack("blend", alpha=0.2)
    out = attack.apply(images)
    torch.testing.assert_close(out - images, 0.2 * (attack.pattern - images))


def test_sig_adds_a_horizontal_sinusoid(images):
    attack = make_attack("sig", delta=0.1, frequency=6)
    x = torch.full((1, 3, 32, 32), 0.5)
    diff = attack.apply(x) - x
    assert torch.allclose(diff, diff[:, :, :1, :].expand_as(diff))  # same in every row and channel
    assert diff.abs().max() == pytest.approx(0.1, abs=1e-3)
    assert (torch.fft.rfft(diff[0, 0, 0]).abs().argmax()) == 6


def test_trojan_only_touches_its_watermark_region(images):
    out = make_attack("trojan", size=8, margin=2).apply(images)
    changed = (out != images).any(dim=(0, 1))
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[22:30, 2:10] = True
    assert changed[region].any() and not changed[~region].any()


def test_wanet_warps_geometry_and_keeps_constant_images(images):
    attack = make_attack("wanet", s=1.0)
    flat = torch.full((2, 3, 32, 32), 0.3)
    torch.testing.assert_close(attack.apply(flat), flat)  # a warp moves pixels, it does not change values
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32).contiguous()
    warped = attack.apply(ramp)
    assert (warped - ramp).abs().max() > 0.01  # sampling positions moved
    assert (warped - ramp).abs().max() < 0.25  # but only by a few pixels (subtle)
    assert not torch.equal(attack.apply(images), images)


def test_clean_label_poisons_only_target_class_and_keeps_labels(data):
    attack = make_attack("clean_label", target=2)
    poisoned, index = attack.poison(data, rate=0.08, seed=0)
    assert len(index) == 16 and (data.y[index] == 2).all()
    assert torch.equal(poisoned.y, data.y)
    changed = (poisoned.x != data.x).flatten(1).any(1).nonzero().flatten()
    assert set(changed.tolist()) <= set(index.tolist())
    with pytest.raises(ValueError, match="target-class"):
        attack.poison(data, rate=0.2)


def test_clean_label_with_surrogate_perturbs_within_eps(data):
    from nft_core.models import SmallCNN

    torch.manual_seed(0)
    attack = make_attack("clean_label", target=1, eps=8 / 255, pgd_steps=2)
    plain, index = attack.poison(data, rate=0.05)
    adv, index2 = attack.poison(data, rate=0.05, surrogate=SmallCNN(width=4))
    assert torch.equal(index, index2) and torch.equal(adv.y, data.y)
    diff = (adv.x.int() - plain.x.int()).abs()
    assert diff.max() <= 9 and diff.flatten(1).any(1).nonzero().flatten().tolist() == index.tolist()


@pytest.mark.parametrize("name", [n for n in ATTACKS if n != "clean_label"])
@pytest.mark.parametrize("mode", ["all2one", "all2all"])
def test_poison_rate_and_labels(name, mode, data):
    attack = make_attack(name, target=3, mode=mode)
    poisoned, index = attack.poison(data, rate=0.1, seed=5)
    assert len(index) == 20 and len(poisoned) == len(data)
    assert torch.equal(poisoned.y[index], attack.target_labels(data.y[index]))
    rest = torch.ones(len(data), dtype=torch.bool)
    rest[index] = False
    assert torch.equal(poisoned.y[rest], data.y[rest])
    if name != "wanet":  # wanet's noise mode (off here) is the only one touching other samples
        assert torch.equal(poisoned.x[rest], data.x[rest])
    if mode == "all2one":
        assert (data.y[index] != 3).all()
    again, index2 = attack.poison(data, rate=0.1, seed=5)
    assert torch.equal(index, index2) and torch.equal(again.x, poisoned.x)


def test_wanet_noise_mode_adds_label_keeping_cross_samples(data):
    attack = make_attack("wanet", noise=True, cross_ratio=2.0)
    poisoned, index = attack.poison(data, rate=0.05)
    changed = (poisoned.x != data.x).flatten(1).any(1)
    assert changed.sum() == 30 and (poisoned.y != data.y).sum() == 10


def test_all2all_targets():
    attack = make_attack("badnets", mode="all2all", num_classes=10)
    assert attack.target_labels(torch.tensor([0, 4, 9])).tolist() == [1, 5, 0]
    assert make_attack("blend", target=7).target_labels(torch.tensor([0, 7])).tolist() == [7, 7]


def test_probe_asr_excludes_target_class(data):
    attack = make_attack("badnets", target=0)
    x, y_true, y_target = attack.probe(data)
    assert len(x) == len(data) and torch.equal(y_true, data.y) and (y_target == 0).all()
    assert torch.equal(x, (x * 255).round() / 255)  # on the 8-bit grid
    always_target = torch.zeros_like(y_true)
    assert attack_success_rate(always_target, y_true, y_target) == 1.0
    correct = y_true.clone()  # target-class samples predicted as target would count if they were not excluded
    assert attack_success_rate(correct, y_true, y_target) == 0.0


def test_validation_errors():
    with pytest.raises(ValueError, match="badnets"):
        make_attack("patch")
    with pytest.raises(ValueError, match="target 10"):
        make_attack("blend", target=10, num_classes=10)
    with pytest.raises(ValueError, match="mode"):
        make_attack("blend", mode="one2one")
    with pytest.raises(ValueError, match="clean-label"):
        make_attack("clean_label", mode="all2all")
    with pytest.raises(TypeError, match="alpha"):
        make_attack("badnets", alpha=0.3)
    with pytest.raises(ValueError, match="rate"):
        make_attack("badnets").poison(make_synthetic(20), rate=1.5)
    with pytest.raises(ValueError, match="3 x 32 x 32"):
        make_attack("badnets").apply(torch.rand(2, 1, 32, 32))
    with pytest.raises(TypeError, match="float"):
        make_attack("badnets").apply(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_sig_clean_label_option(data):
    attack = make_attack("sig", clean_label=True, target=4)
    poisoned, index = attack.poison(data, rate=0.05)
    assert (data.y[index] == 4).all() and torch.equal(poisoned.y, data.y)
