"""The smallest universal perturbation: a backdoor added to the whole image needs a far smaller one than any class."""

import math

import pytest
import torch
from torch import nn

from nft_core.perturb import smallest_perturbations

K, SIZE, TARGET = 8, 16, 5


def sinusoid() -> torch.Tensor:
    """SIG's trigger shape: a horizontal sinusoid over the whole image, 3 periods across, in [-1, 1]."""
    columns = torch.sin(2 * math.pi * 3 * torch.arange(SIZE) / SIZE)
    return columns.expand(3, SIZE, SIZE)


class Planted(nn.Module):
    """A nearest-template classifier (each class a random image) plus, when ``planted``, a SIG-like backdoor: an
    image's correlation with a sinusoid beyond what clean images show adds a large logit to TARGET."""

    def __init__(self, planted: bool = True) -> None:
        super().__init__()
        self.templates = nn.Parameter(torch.rand(K, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
        self.register_buffer("signal", sinusoid())
        self.planted = planted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = -200 * (x[:, None] - self.templates[None]).pow(2).mean((2, 3, 4))
        if self.planted:
            correlation = (x - 0.5).mul(self.signal).mean((1, 2, 3))
            bump = 60 * torch.sigmoid(200 * (correlation - 0.03))
            logits = logits + bump[:, None] * nn.functional.one_hot(torch.tensor(TARGET), K)
        return logits


def data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Images near their class's template."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % K
    return 0.7 * Planted().templates.detach()[y] + 0.3 * torch.rand(n, 3, SIZE, SIZE, generator=g), y


def test_the_planted_target_needs_the_smallest_budget_and_the_model_is_untouched():
    model = Planted().train()
    x, y = data()
    assert (model(x).argmax(1) == y).all()  # the backdoor does not fire on clean images
    params = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    found = smallest_perturbations(model, x, y, steps=150, classes_per_chunk=3)
    assert torch.equal(torch.get_rng_state(), rng) and model.training  # global RNG and train mode as they were
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in params.items())
    assert all(p.grad is None for p in model.parameters())
    assert found.perturbations.shape == (K, 3, SIZE, SIZE)
    budgets = torch.tensor(found.budgets)
    assert (found.perturbations.flatten(1).abs().amax(1) <= budgets + 1e-6).all()  # within each class's budget
    assert found.suspect == TARGET and found.budget_ratio < 0.5, found.budgets
    assert found.reached[TARGET] and found.success[TARGET] >= 0.8  # the perturbation is a working trigger
    others = x[y != TARGET]
    sent = model((others + found.perturbations[TARGET]).clamp(0, 1)).argmax(1) == TARGET
    assert sent.float().mean() == pytest.approx(found.success[TARGET])
    again = smallest_perturbations(model, x, y, steps=150, classes_per_chunk=8)
    assert again.suspect == TARGET  # chunking changes the batches, not the finding


def test_a_model_without_a_shortcut_is_not_flagged():
    x, y = data()
    found = smallest_perturbations(Planted(planted=False), x, y, steps=150)
    assert found.budget_ratio > 0.7, found.budgets  # every class needs about the same perturbation


@pytest.mark.parametrize("kwargs, message", [({"steps": 0}, "steps=0"), ({"init_budget": 0.0}, "init_budget=0.0"),
                                             ({"factor": 1.0}, "factor=1.0"),
                                             ({"success_threshold": 1.5}, "success_threshold"),
                                             ({"num_classes": 9}, "num_classes=9")])
def test_invalid_settings(kwargs, message):
    x, y = data(8)
    model = Planted().train()
    with pytest.raises(ValueError, match=message):
        smallest_perturbations(model, x, y, **kwargs)
    assert model.training  # refused before the search, in the mode it came in


def test_mismatched_inputs():
    with pytest.raises(ValueError, match="3 images and 2 labels"):
        smallest_perturbations(Planted(), torch.rand(3, 3, SIZE, SIZE), torch.zeros(2, dtype=torch.long))


def test_a_model_whose_outputs_overflow_is_refused_not_given_a_budget():
    """Finite weights, infinite logits: argmax would still pick a class and the search report budgets (a ratio of
    0.51 on such a model before this check). The library says so; the evaluation refuses the model (exit 3)."""
    from harden.errors import PackageError, exit_code
    from harden.evaluate import universal_metrics
    from nft_core.data import ImageData
    from nft_core.perturb import NonFiniteOutputs

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, K))
    with torch.no_grad():
        model[1].weight.fill_(3e38)  # any non-black image sums past float32's largest value
    x, y = data(16)
    with pytest.raises(NonFiniteOutputs, match="not finite"):
        smallest_perturbations(model, x, y, steps=2)
    test = ImageData((255 * x).to(torch.uint8), y, num_classes=K)
    with pytest.raises(PackageError, match="model refused: the model's outputs are not finite") as err:
        universal_metrics(model, test, samples=10, steps=2)
    assert exit_code(err.value) == 3
