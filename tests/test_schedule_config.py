import math

import pytest

from nft_core.config import NFTConfig
from nft_core.schedule import mask_lower_bound, mask_lower_bounds

KINDS = ["exponential", "cosine", "logarithmic", "cubic", "linear", "none"]


def test_exponential_is_the_papers_formula():
    assert mask_lower_bound(1, 10) == pytest.approx(0.8 * math.exp(-0.5))
    assert mask_lower_bound(4, 10, alpha=0.7, beta=0.25) == pytest.approx(0.7 * math.exp(-1.0))


@pytest.mark.parametrize("kind", KINDS)
def test_every_schedule_is_non_increasing_and_within_0_alpha(kind):
    bounds = mask_lower_bounds(12, kind, alpha=0.8, beta=0.5)
    assert all(0.0 <= b <= 0.8 + 1e-12 for b in bounds)
    assert all(a >= b - 1e-12 for a, b in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("kind", ["cosine", "logarithmic", "cubic", "linear"])
def test_relative_schedules_start_at_alpha_and_end_at_zero(kind):
    bounds = mask_lower_bounds(5, kind, alpha=0.9)
    assert bounds[0] == pytest.approx(0.9)
    assert bounds[-1] == pytest.approx(0.0, abs=1e-12)


def test_schedule_errors():
    with pytest.raises(ValueError, match="layer=0"):
        mask_lower_bound(0, 3)
    with pytest.raises(ValueError, match="unknown schedule"):
        mask_lower_bound(1, 3, kind="quadratic")


@pytest.mark.parametrize("field,value,allowed", [
    ("lr", -0.1, "> 0"), ("mix_alpha", 0.0, "> 0"), ("schedule_alpha", 1.5, "(0, 1]"),
    ("schedule_alpha", 0.0, "(0, 1]"), ("momentum", 1.0, "[0, 1)"), ("epochs", 0, ">= 1"),
    ("placement", "bias", "one of"), ("adv_share", 1.2, "[0, 1]"), ("lr", float("nan"), "> 0"),
    ("lr_min", 0.1, "in [0, lr"), ("eta_c", "1e-3", "finite number"), ("steps_per_epoch", 0, ">= 1"),
    ("steps_per_epoch", 2.5, ">= 1"), ("steps_per_epoch", True, ">= 1"),
])
def test_config_errors_name_the_field_and_range(field, value, allowed):
    with pytest.raises(ValueError) as err:
        NFTConfig(**{field: value})
    assert f"NFTConfig.{field}=" in str(err.value) and allowed in str(err.value)


def test_config_defaults_are_the_papers():
    c = NFTConfig()
    assert (c.lr, c.momentum, c.batch_size, c.epochs) == (0.05, 0.95, 128, 100)
    assert (c.schedule, c.schedule_alpha, c.schedule_beta, c.eta_c, c.mix, c.mix_alpha) == (
        "exponential", 0.8, 0.5, 5e-4, "mixup", 1.0)
    assert c.replace(epochs=3).epochs == 3 and c.epochs == 100
