"""The maximum-margin statistic (MM-BD): a planted shortcut's class reaches an outlying margin, found without
any image, and its p-value flags the model; a model without one is not flagged."""

import math

import numpy as np
import pytest
import torch
from test_invert import SIZE, TARGET, Planted

from nft_core.maxmargin import PAPER_ALPHA, margin_pvalue, max_margin_statistics

SETTINGS = {"starts": 2, "steps": 60, "lr": 0.05}


def test_an_outlying_largest_margin_gets_a_small_p_value():
    null = np.random.default_rng(0).gamma(4.0, 5.0, size=42)  # 43 classes, one of them far out
    assert margin_pvalue([*null, 200.0]) < 1e-6
    assert margin_pvalue([*null, float(null.max()) * 1.01]) > PAPER_ALPHA
    assert margin_pvalue([5.0, 5.0, 5.0, 9.0]) == 0.0  # a constant null: the fit is undefined, the outlier stands out
    assert margin_pvalue([5.0, 5.0, 5.0, 5.0]) == 1.0


def test_a_class_named_beforehand_is_judged_alone():
    """A hardened model is asked about the candidate's suspect, not about its own largest margin."""
    null = list(np.random.default_rng(0).gamma(4.0, 5.0, size=42))
    outlier = [*null, 200.0]
    assert margin_pvalue(outlier, label=42) < 1e-6
    assert margin_pvalue(outlier, label=int(np.argmin(null))) > 0.9  # the smallest margin is no outlier
    # named beforehand, no maximum is taken: the same margin gets a smaller p-value than as the largest of K
    near = [*null, float(max(null)) * 1.2]
    assert margin_pvalue(near, label=42) < margin_pvalue(near)
    with pytest.raises(ValueError, match="label 43 is not one of the 43 classes"):
        margin_pvalue(outlier, label=43)


@pytest.mark.parametrize("margins, message", [([1.0, 2.0], "at least 3"), ([1.0, 2.0, math.inf], "finite"),
                                              ([1.0, math.nan, 2.0], "finite")])
def test_margins_that_cannot_be_judged_are_refused(margins, message):
    with pytest.raises(ValueError, match=message):
        margin_pvalue(margins)


def test_the_planted_target_reaches_the_outlying_margin_and_the_model_is_untouched():
    model = Planted().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = max_margin_statistics(model, (3, SIZE, SIZE), 8, seed=0, **SETTINGS)
    assert result.target == TARGET
    assert result.pvalue < 0.01, result.margins
    assert result.ratio > 1.5
    assert model.training, "the model's train/eval mode is restored"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state()), "the global RNG is not touched"


def test_a_model_without_a_shortcut_is_not_flagged():
    result = max_margin_statistics(Planted(planted=False).eval(), (3, SIZE, SIZE), 8, seed=0, **SETTINGS)
    assert result.pvalue > PAPER_ALPHA, result.margins
    assert result.ratio < 1.2


@pytest.mark.parametrize("kwargs, message", [({"starts": 0}, "starts=0"), ({"steps": 0}, "steps=0"),
                                             ({"lr": 0.0}, "lr=0.0"), ({"num_classes": 2}, "at least 3"),
                                             ({"num_classes": 9}, "8 outputs")])
def test_invalid_settings(kwargs, message):
    kwargs = {"num_classes": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        max_margin_statistics(Planted(), (3, SIZE, SIZE), **kwargs)


def test_a_model_whose_margins_stay_negative_reports_no_ratio_and_nothing_non_finite():
    """One step from random images leave most classes of a template classifier unreached (negative margins):
    the ratio to a non-positive median means nothing, and an infinite one breaks KFP's metadata."""
    from harden.evaluate import margin_metrics
    from nft_core.data import ImageData

    test = ImageData(torch.zeros(8, 3, SIZE, SIZE, dtype=torch.uint8), torch.arange(8), num_classes=8)
    model = Planted(planted=False).eval()
    result = max_margin_statistics(model, (3, SIZE, SIZE), 8, starts=1, steps=1, lr=1e-4)
    assert float(np.median(result.margins)) <= 0 and result.ratio is None, result.margins
    metrics = margin_metrics(model, test, starts=1, steps=1, lr=1e-4)
    assert "margin/ratio" not in metrics
    assert all(math.isfinite(v) for v in [metrics["margin/pvalue"], *metrics["margin/values"]])


def test_a_model_whose_outputs_overflow_is_refused_not_scored_without_its_margins():
    """Finite weights, infinite logits: no margin, and no p-value, exists. The library says so; the evaluation
    refuses the model (exit 3) rather than scoring it on the rest of the evidence."""
    from harden.errors import PackageError, exit_code
    from harden.evaluate import margin_metrics
    from nft_core.data import ImageData
    from nft_core.maxmargin import NonFiniteMargins

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 8))
    with torch.no_grad():
        model[1].weight.fill_(3e38)  # any non-black image sums past float32's largest value
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(NonFiniteMargins, match="not finite"):
        max_margin_statistics(model, (3, SIZE, SIZE), 8, starts=1, steps=2)
    test = ImageData(torch.zeros(8, 3, SIZE, SIZE, dtype=torch.uint8), torch.arange(8), num_classes=8)
    with pytest.raises(PackageError, match="model refused: the model's margins are not finite") as err:
        margin_metrics(model, test, starts=1, steps=2)
    assert exit_code(err.value) == 3
