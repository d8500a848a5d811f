"""nft_core.train: the trainer's contract (history, determinism, errors) and a backdoored candidate that
really carries its backdoor."""

from __future__ import annotations

import pytest
import torch

from nft_core.attacks import make_attack
from nft_core.batches import DeviceBatches
from nft_core.data import make_synthetic
from nft_core.metrics import accuracy, attack_success_rate, predict
from nft_core.models import Normalized, SmallCNN
from nft_core.train import channel_stats, make_backdoored_candidate, train_classifier


def _tiny_model(seed: int = 0) -> Normalized:
    torch.manual_seed(seed)
    return Normalized(SmallCNN(width=4), [0.5] * 3, [0.25] * 3)


def test_train_classifier_history_and_determinism():
    data = make_synthetic(96, seed=1)
    a, b = _tiny_model(), _tiny_model()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    hist = train_classifier(a, data, epochs=2, batch_size=32, seed=3, device="cpu", progress=False)
    train_classifier(b, data, epochs=2, batch_size=32, seed=3, device="cpu", progress=False)
    assert [h["epoch"] for h in hist] == [1, 2]
    assert set(hist[0]) == {"epoch", "loss", "train_acc", "lr", "time_s"}
    assert not a.training
    assert any(not torch.equal(before[k], v) for k, v in a.state_dict().items())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.parametrize("epochs", [0, -1])
def test_train_classifier_rejects_bad_epochs(epochs):
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(_tiny_model(), make_synthetic(10), epochs=epochs, progress=False)


def test_channel_stats_match_images():
    data = make_synthetic(50)
    mean, std = channel_stats(data)
    assert len(mean) == len(std) == 3
    torch.testing.assert_close(torch.tensor(mean), data.images().mean(dim=(0, 2, 3)))


def test_make_backdoored_candidate_info():
    data = make_synthetic(100, seed=2)
    model, info = make_backdoored_candidate(data, make_attack("blend", target=1), builder_kwargs={"width": 4},
                                            poison_rate=0.1, epochs=1, device="cpu", progress=False)
    assert isinstance(model, Normalized) and isinstance(model.net, SmallCNN)
    assert info["poisoned"] == 10 and info["attack"] == "blend" and info["target"] == 1
    assert len(info["history"]) == 1 and info["wall_time_s"] > 0
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.slow
def test_backdoored_small_cnn_learns_task_and_badnets_backdoor():
    # Issue 2's bar for the synthetic data: >= 90 % clean accuracy for the small CNN in under a minute on 2 CPU
    # cores (measured: 3,000 images x 10 epochs, ~24 s, ACC 0.99; 5 epochs stop at ~0.65, under-trained).
    train, test = make_synthetic(3000, seed=0), make_synthetic(500, seed=0, train=False)
    attack = make_attack("badnets", target=0)
    model, info = make_backdoored_candidate(train, attack, poison_rate=0.1, epochs=10, progress=False)
    acc = accuracy(predict(model, test.images()), test.y)
    x, y_true, y_target = attack.probe(test)
    asr = attack_success_rate(predict(model, x), y_true, y_target)
    assert acc >= 0.9, info["history"]
    assert asr >= 0.9, info["history"]


def test_crop_without_flip_never_mirrors():
    x = torch.zeros(64, 3, 8, 8)
    x[:, :, :, :2] = 1.0  # a bright left edge: a flip would move it to the right
    from torch.utils.data import TensorDataset

    no_flip = DeviceBatches(TensorDataset(x, torch.zeros(64, dtype=torch.long)), 64, padding=0, flip=False)
    with_flip = DeviceBatches(TensorDataset(x, torch.zeros(64, dtype=torch.long)), 64, padding=0, flip=True)
    assert torch.equal(next(iter(no_flip))[0], x)
    flipped = next(iter(with_flip))[0]
    mirrored = (flipped[:, 0, 0, -1] == 1).sum().item()
    assert 10 < mirrored < 54  # about half mirrored; without flips none
