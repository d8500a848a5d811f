"""The NFT training loop: bounds, what it may change, determinism, resume after a kill."""

import copy
import sys
import textwrap

import pytest
import torch
from torch.utils.data import TensorDataset

from kill import sigkill_after_checkpoint
from nft_core.config import NFTConfig
from nft_core.fold import fold_masks
from nft_core.masks import mask_modules
from nft_core.models import Normalized, build_model
from nft_core.purify import StaleCheckpoint, fingerprint, purify

FAST = NFTConfig(epochs=3, batch_size=16, progress=False)


def _setup(n=40, seed=0):
    torch.manual_seed(seed)
    model = Normalized(build_model("small_cnn", num_classes=10, width=8), [0.5] * 3, [0.25] * 3)
    data = TensorDataset(torch.rand(n, 3, 32, 32), torch.arange(n) % 10)
    return model, data


def _masks(model):
    return torch.cat([m.mask.detach().flatten() for _, m in mask_modules(model)])


@pytest.mark.parametrize("placement", ["norm", "weight"])
def test_masks_stay_within_schedule_bounds(placement):
    model, data = _setup()
    # a huge learning rate pushes masks far outside [mu(l), 1] before clipping
    result = purify(model, data, FAST.replace(lr=50.0, lr_min=0.0, placement=placement, eta_c=0.0))
    hit_lower = hit_upper = False
    for _, m in mask_modules(result.model):
        lower = result.lower_bounds[m.layer_index - 1]
        assert m.mask.min().item() >= lower - 1e-7 and m.mask.max().item() <= 1.0
        hit_lower |= bool((m.mask <= lower + 1e-7).any())
        hit_upper |= bool((m.mask >= 1.0).any())
    assert hit_lower and hit_upper  # the clipping was exercised at both ends
    assert result.history[-1]["frac_at_lower_bound"] > 0


@pytest.mark.parametrize("n,steps", [(40, 7), (5, 3)])
def test_steps_per_epoch_draws_fixed_full_batches_with_replacement(n, steps):
    """The authors' schedule: a fixed number of full batches per epoch, however small the clean set."""
    model, data = _setup(n=n)
    seen = []
    model.register_forward_pre_hook(lambda _m, inp: seen.append(len(inp[0])))  # copied with the model
    result = purify(model, data, FAST.replace(epochs=2, steps_per_epoch=steps))
    train_batches = [b for b in seen if b == FAST.batch_size]
    assert len(train_batches) == 2 * steps  # 16 > 5 images: batches are drawn with replacement
    assert len(result.history) == 2


@pytest.mark.parametrize("placement", ["norm", "weight"])
def test_purify_changes_only_masked_weights(placement):
    model, data = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = purify(model, data, FAST.replace(placement=placement, bn_mode="eval"))
    masked = {f"{layer.name}.weight" for layer in result.layers}
    after = fold_masks(result.model).state_dict()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input model is untouched
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= masked
    first = {"norm": "net.features.1.weight", "weight": "net.features.0.weight"}[placement]
    assert first not in masked  # stem left alone
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith(".bias"))


def test_bn_train_mode_updates_running_statistics_only_then():
    model, data = _setup()
    stats = "net.features.1.running_mean"
    eval_run = fold_masks(purify(model, data, FAST.replace(bn_mode="eval")).model).state_dict()
    train_run = fold_masks(purify(model, data, FAST.replace(bn_mode="train")).model).state_dict()
    assert torch.equal(eval_run[stats], model.state_dict()[stats])
    assert not torch.equal(train_run[stats], model.state_dict()[stats])


def test_only_masks_are_trained_and_eta_is_eta_c_over_samples_per_class():
    model, data = _setup(n=30)
    result = purify(model, data, FAST.replace(eta_c=1e-3))
    assert result.trainable_params == sum(layer.size for layer in result.layers)
    assert result.trainable_params < result.total_params / 50
    assert result.samples_per_class == 3 and result.eta == pytest.approx(1e-3 / 3)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert set(result.history[0]) >= {"loss", "ce", "reg", "lr", "mask_min", "mask_mean", "frac_at_lower_bound"}


@pytest.mark.parametrize("mix", ["mixup", "cutmix", "none"])
def test_one_sample_per_class_and_every_mixing_mode(mix):
    model, data = _setup(n=10)
    result = purify(model, data, FAST.replace(mix=mix, adv_share=0.5))
    assert result.samples_per_class == 1
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in result.history)


def test_same_seed_same_masks_different_seed_different_masks():
    model, data = _setup()
    a = _masks(purify(model, data, FAST).model)
    b = _masks(purify(model, data, FAST).model)
    c = _masks(purify(model, data, FAST.replace(seed=1)).model)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bad_clean_data_is_refused():
    model, _ = _setup()
    with pytest.raises(ValueError, match="empty"):
        purify(model, TensorDataset(torch.rand(0, 3, 32, 32), torch.zeros(0, dtype=torch.long)), FAST)
    with pytest.raises(ValueError, match="model has 10 classes"):
        purify(model, TensorDataset(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 12])), FAST)


CHILD = textwrap.dedent("""
    import sys, torch
    from torch.utils.data import TensorDataset
    from nft_core.config import NFTConfig
    from nft_core.models import Normalized, build_model
    from nft_core.purify import purify
    torch.manual_seed(0)
    model = Normalized(build_model("small_cnn", num_classes=10, width=8), [0.5] * 3, [0.25] * 3)
    data = TensorDataset(torch.rand(40, 3, 32, 32), torch.arange(40) % 10)
    purify(model, data, NFTConfig(epochs=int(sys.argv[2]), batch_size=16, progress=False), checkpoint=sys.argv[1])
""")


def test_killed_run_resumes_from_checkpoint_to_the_same_masks(tmp_path):
    epochs = 60
    ckpt = tmp_path / "nft.ckpt"
    done = sigkill_after_checkpoint([sys.executable, "-c", CHILD, str(ckpt), str(epochs)], ckpt, min_epoch=3)
    assert 3 <= done < epochs, "the child finished before it could be killed; raise `epochs`"

    model, data = _setup()
    config = NFTConfig(epochs=epochs, batch_size=16, progress=False)
    resumed = purify(model, data, config, checkpoint=ckpt)
    uninterrupted = purify(model, data, config)
    assert torch.equal(_masks(resumed.model), _masks(uninterrupted.model))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in uninterrupted.history]
    with pytest.raises(StaleCheckpoint, match="another candidate, clean set or config"):
        purify(model, data, config.replace(lr=0.04), checkpoint=ckpt)


def test_checkpoint_of_another_candidate_or_clean_set_is_never_resumed(tmp_path):
    """Same config, same clean-set size: only the content differs. Refused, or (restart) a fresh start."""
    model, data = _setup()
    ckpt = tmp_path / "nft.ckpt"
    config = NFTConfig(epochs=2, batch_size=16, progress=False)
    purify(model, data, config, checkpoint=ckpt)
    other_model = copy.deepcopy(model)
    with torch.no_grad():
        next(other_model.parameters()).mul_(1.01)
    other_images = TensorDataset(data.tensors[0].flip(-1), data.tensors[1])
    for m, d in ((other_model, data), (model, other_images)):
        with pytest.raises(StaleCheckpoint, match="another candidate, clean set or config"):
            purify(m, d, config, checkpoint=ckpt)
    restarted = purify(other_model, data, config, checkpoint=ckpt, stale_checkpoint="restart")
    fresh = purify(other_model, data, config)
    assert torch.equal(_masks(restarted.model), _masks(fresh.model))
    assert torch.load(ckpt, weights_only=True)["fingerprint"] == fingerprint(other_model, data, config)
