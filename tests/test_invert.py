"""Trigger reconstruction (Neural Cleanse): a planted shortcut needs a far smaller mask than any other class."""

import math

import pytest
import torch
from torch import nn

from nft_core.invert import anomaly_indices, reconstruct_triggers, stamp

K, SIZE, TARGET = 8, 16, 3


class Planted(nn.Module):
    """A nearest-template classifier (each class a random image; moving an image to another class means
    repainting much of it) plus, when ``planted``, a backdoor: a white 2x2 patch in the top-left corner adds a
    large logit to TARGET."""

    def __init__(self, planted: bool = True) -> None:
        super().__init__()
        self.templates = nn.Parameter(torch.rand(K, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
        self.planted = planted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = -200 * (x[:, None] - self.templates[None]).pow(2).mean((2, 3, 4))
        if self.planted:
            bump = 60 * torch.sigmoid(10 * (x[:, :, :2, :2].mean((1, 2, 3)) - 0.6))
            logits = logits + bump[:, None] * nn.functional.one_hot(torch.tensor(TARGET), K)
        return logits


def data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Images near their class's template, dimmed so that no patch fires by chance."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % K
    x = 0.7 * Planted().templates.detach()[y] + 0.3 * torch.rand(n, 3, SIZE, SIZE, generator=g)
    x[:, :, :2, :2] *= 0.7
    return x, y


def test_anomaly_index_is_distance_below_the_median_in_mad_units():
    norms = [1.0, 10.0, 11.0, 12.0, 9.0, 10.0, 14.0]  # median 10, |n - 10| = 9 0 1 2 1 0 4, MAD 1
    index = anomaly_indices(norms)
    assert index[0] == pytest.approx(9 / 1.4826) and index[1] == 0 and index[6] == pytest.approx(-4 / 1.4826)
    assert anomaly_indices([5.0, 5.0, 5.0, 1.0]) == [0.0, 0.0, 0.0, math.inf]  # zero MAD: below the median is inf


def test_the_planted_target_is_the_suspect_and_the_model_is_untouched():
    model = Planted().train()
    x, y = data()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    inv = reconstruct_triggers(model, x, y, steps=150, batch_size=16, classes_per_chunk=2)
    assert torch.equal(torch.get_rng_state(), rng) and model.training  # global RNG and train mode as they were
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in params.items())
    assert all(p.grad is None for p in model.parameters())
    assert inv.masks.shape == (K, 1, SIZE, SIZE) and inv.patterns.shape == (K, 3, SIZE, SIZE)
    assert 0 <= inv.masks.min() and inv.masks.max() <= 1 and 0 <= inv.patterns.min() and inv.patterns.max() <= 1
    assert inv.suspect == TARGET and inv.anomaly_index > 2 and inv.norm_ratio < 1 / 3, (inv.norms, inv.anomaly)
    assert inv.norms[TARGET] < 0.5 * min(n for k, n in enumerate(inv.norms) if k != TARGET)
    mask, pattern = inv.trigger()
    assert inv.success[TARGET] >= 0.9  # the reconstruction is a working trigger
    others = x[y != TARGET]
    assert (model(stamp(others, mask, pattern)).argmax(1) == TARGET).float().mean() == pytest.approx(inv.success[TARGET])
    again = reconstruct_triggers(model, x, y, steps=150, batch_size=16, classes_per_chunk=5)
    assert again.suspect == TARGET  # chunking changes the batches, not the finding


def test_a_model_without_a_shortcut_is_not_flagged():
    x, y = data()
    inv = reconstruct_triggers(Planted(planted=False), x, y, steps=150, batch_size=16)
    assert inv.norm_ratio > 0.8, inv.norms  # every class needs about the same stamp


@pytest.mark.parametrize("kwargs, message", [({"steps": 0}, "steps=0"), ({"batch_size": 0}, "batch_size=0"),
                                             ({"success_threshold": 0.0}, "success_threshold"),
                                             ({"num_classes": 9}, "num_classes=9")])
def test_invalid_settings(kwargs, message):
    x, y = data(8)
    with pytest.raises(ValueError, match=message):
        reconstruct_triggers(Planted(), x, y, **kwargs)


def test_mismatched_inputs():
    with pytest.raises(ValueError, match="3 images and 2 labels"):
        reconstruct_triggers(Planted(), torch.rand(3, 3, SIZE, SIZE), torch.zeros(2, dtype=torch.long))
