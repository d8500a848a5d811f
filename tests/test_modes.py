"""Every search that puts a model in eval mode hands it back in the modes it came in, module by module: NFT trains
in a mixed mode (model in eval, BatchNorm in train), and a search run between two of its steps must not flatten it."""

import pytest
import torch
from torch import nn

from nft_core.adversarial import pgd_untargeted
from nft_core.invert import reconstruct_triggers
from nft_core.loop import set_norm_mode
from nft_core.maxmargin import max_margin_statistics
from nft_core.modes import eval_mode
from nft_core.perturb import smallest_perturbations
from nft_core.scan import adversarial_label_concentration

K, SIZE = 4, 8


def mixed() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * SIZE * SIZE, K))
    set_norm_mode(model, "train")
    return model


def modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_the_block_runs_in_eval_mode_and_the_mixed_mode_comes_back_after_an_error():
    model = mixed()
    before = modes(model)
    assert before == [False, False, True, False, False, False]  # eval, BatchNorm in train: not one flag for all
    with pytest.raises(RuntimeError, match="inside"), eval_mode(model) as inside:
        assert inside is model and not any(modes(model))
        raise RuntimeError("inside")
    assert modes(model) == before


X, Y = torch.rand(16, 3, SIZE, SIZE), torch.arange(16) % K
SEARCHES = {
    "pgd": lambda m: pgd_untargeted(m, X, Y, eps=0.1, steps=2),
    "scan": lambda m: adversarial_label_concentration(m, X, Y, steps=2, batch_size=8),
    "invert": lambda m: reconstruct_triggers(m, X, Y, steps=2, batch_size=8),
    "perturb": lambda m: smallest_perturbations(m, X, Y, steps=2, batch_size=8),
    "margins": lambda m: max_margin_statistics(m, (3, SIZE, SIZE), K, starts=1, steps=2),
    "margins refused": lambda m: max_margin_statistics(m, (3, SIZE, SIZE), K + 1, starts=1, steps=2),
}


@pytest.mark.parametrize("name", SEARCHES)
def test_a_search_leaves_a_mixed_mode_model_as_it_came(name):
    model = mixed()
    before = modes(model)
    stats = model[1].running_mean.clone()
    try:
        SEARCHES[name](model)
    except ValueError as refused:
        assert name.endswith("refused"), refused
    else:
        assert not name.endswith("refused")
    assert modes(model) == before
    assert torch.equal(model[1].running_mean, stats), "BatchNorm's statistics are not updated by a search"
