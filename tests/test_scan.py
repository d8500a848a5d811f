"""Trigger-free scan (PBE observation): adversarial labels of a backdoored model pile onto the target."""

import pytest
import torch
from torch import nn

from harden.evaluate import runner_up_ratio, scan_metrics
from nft_core.attacks import make_attack
from nft_core.data import ImageData, make_synthetic
from nft_core.metrics import attack_success_rate, predict
from nft_core.scan import adversarial_label_concentration
from nft_core.train import make_backdoored_candidate

K, SIZE, TARGET = 5, 16, 0  # the target is not the synthetic task's natural adversarial sink (label 2, diamond)


def linear_model(scale: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, K))
    with torch.no_grad():
        model[1].weight.mul_(scale)
    return model.train()


def test_histogram_counts_only_flips_and_restores_state():
    model = linear_model()
    x, y = torch.rand(40, 3, 8, 8), torch.arange(40) % K
    rng = torch.get_rng_state()
    result = adversarial_label_concentration(model, x, y, eps=0.5, steps=5, batch_size=16)
    assert torch.equal(torch.get_rng_state(), rng) and model.training  # global RNG and train mode untouched
    assert sum(result.label_histogram) == result.n_flipped > 0 and len(result.label_histogram) == K
    assert result.top_share == max(result.label_histogram) / result.n_flipped
    assert result.label_histogram[result.top_label] == max(result.label_histogram)
    again = adversarial_label_concentration(model, x, y, eps=0.5, steps=5, batch_size=40)
    assert again == result  # deterministic from the seed, independent of the batch size


def test_nothing_flips_under_a_tiny_budget():
    model = linear_model(scale=0.0)  # constant logits: no perturbation changes a prediction
    y = predict(model, torch.rand(10, 3, 8, 8))
    result = adversarial_label_concentration(model, torch.rand(10, 3, 8, 8), y, eps=1e-3, steps=1)
    assert (result.top_label, result.top_share, result.n_flipped, result.flip_rate) == (None, 0.0, 0, 0.0)


def test_stage_wrapper_reports_every_class_s_share_of_the_flips():
    model = linear_model()
    test = ImageData(x=(torch.rand(40, 3, 8, 8) * 255).to(torch.uint8), y=torch.arange(40) % K, num_classes=K)
    metrics = scan_metrics(model, test, samples=40, eps=0.5, steps=5, batch_size=16)
    shares = metrics["scan/label_shares"]
    flips = [round(s * 40 * metrics["scan/flip_rate"], 6) for s in shares]  # shares of whole flips, summing to 1
    assert len(shares) == K and sum(shares) == pytest.approx(1) and all(f == int(f) for f in flips)
    assert shares[metrics["scan/top_label"]] == metrics["scan/top_share"] == max(shares)
    still = scan_metrics(linear_model(scale=0.0), ImageData(x=test.x, y=predict(linear_model(scale=0.0), test.images()),
                                                            num_classes=K), samples=40, eps=1e-3, steps=1)
    assert still["scan/label_shares"] == [0.0] * K  # nothing flipped: no share, not a division by zero
    assert "scan/runner_up_ratio" not in still  # absent, so a gate check on it cannot pass
    top, second = sorted(shares, reverse=True)[:2]
    assert metrics["scan/runner_up_ratio"] == top / second


def test_runner_up_ratio_needs_two_classes_that_drew_flips():
    assert runner_up_ratio([0.5, 0.1, 0.4]) == pytest.approx(1.25)
    assert runner_up_ratio([0.0, 1.0, 0.0]) is None and runner_up_ratio([0.0, 0.0]) is None and runner_up_ratio([1.0]) is None


@pytest.mark.parametrize("kwargs, message", [({"eps": 0.0}, "eps"), ({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size")])
def test_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        adversarial_label_concentration(linear_model(), torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), **kwargs)


def test_mismatched_inputs():
    with pytest.raises(ValueError, match="3 images and 2 labels"):
        adversarial_label_concentration(linear_model(), torch.rand(3, 3, 8, 8), torch.zeros(2, dtype=torch.long))


@pytest.fixture(scope="module")
def models():
    """A blend-backdoored and a clean SmallCNN trained on the same synthetic data (~15 s each on one core)."""
    train = make_synthetic(2500, seed=0, num_classes=K, image_size=SIZE)
    attack = make_attack("blend", target=TARGET, num_classes=K, image_shape=(3, SIZE, SIZE))
    trained = {kind: make_backdoored_candidate(train, attack, builder_kwargs={"width": 8}, poison_rate=rate,
                                               epochs=12, progress=False, device="cpu")[0]
               for kind, rate in (("backdoored", 0.1), ("clean", 0.0))}
    return trained, attack, make_synthetic(200, seed=0, train=False, num_classes=K, image_size=SIZE)


@pytest.mark.slow
def test_scan_separates_backdoored_from_clean(models):
    trained, attack, test = models
    x, y_true, y_target = attack.probe(test)
    assert attack_success_rate(predict(trained["backdoored"], x), y_true, y_target) > 0.8  # the backdoor is there
    assert attack_success_rate(predict(trained["clean"], x), y_true, y_target) < 0.2
    scans = {kind: adversarial_label_concentration(model, test.images(), test.y) for kind, model in trained.items()}
    bad, clean = scans["backdoored"], scans["clean"]
    assert bad.top_label == TARGET and bad.top_share >= 0.5
    assert clean.top_label != TARGET and clean.label_histogram[TARGET] / clean.n_flipped < 0.3
    assert bad.top_share > clean.top_share + 0.1
    metrics = scan_metrics(trained["backdoored"], test, samples=200)  # the stage wrapper reports the same scan
    assert (metrics["scan/top_label"], metrics["scan/top_share"]) == (TARGET, pytest.approx(bad.top_share, abs=0.05))
    shares = metrics["scan/label_shares"]  # what the report plots: every class's share of the flips
    assert len(shares) == K and sum(shares) == pytest.approx(1) and max(shares) == metrics["scan/top_share"]
