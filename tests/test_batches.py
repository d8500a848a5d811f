"""nft_core.batches and the batched crop/flip: every sample once per epoch, torchvision's crop semantics,
a seed that fixes the stream, a state that resumes it, and the host-memory path giving the same batches."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset
from torchvision.transforms.v2 import functional as TF

from nft_core.augment import random_crop_flip
from nft_core.batches import DeviceBatches


def _data(n: int = 50) -> TensorDataset:
    x = torch.arange(n * 3 * 6 * 6, dtype=torch.float32).reshape(n, 3, 6, 6) / (n * 108)
    return TensorDataset(x, torch.arange(n) % 7)


def _epoch(batches: DeviceBatches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in batches]


def test_an_epoch_visits_every_sample_once_in_a_new_order():
    data = _data()
    batches = DeviceBatches(data, 16, seed=3)
    first, second = _epoch(batches), _epoch(batches)
    assert [len(y) for _, y in first] == [16, 16, 16, 2] and len(batches) == 4
    images = torch.cat([x for x, _ in first])
    # each image comes back whole (no augmentation asked for), with its own label, exactly once
    index = (images[:, 0, 0, 0] * 50).round().long()
    assert sorted(index.tolist()) == list(range(50))
    assert torch.equal(torch.cat([y for _, y in first]), index % 7)
    assert not torch.equal(images, torch.cat([x for x, _ in second]))


def test_steps_per_epoch_draws_with_replacement():
    batches = DeviceBatches(_data(), 8, seed=0, steps_per_epoch=5)
    epoch = _epoch(batches)
    assert len(batches) == 5 and [len(y) for _, y in epoch] == [8] * 5


def test_the_crop_is_torchvisions_crop_of_the_zero_padded_image():
    x = torch.rand(4, 3, 8, 8)
    offsets = torch.tensor([[0, 0], [8, 8], [3, 5], [8, 0]])
    out = random_crop_flip(x, 4, offsets, None)
    for i, (top, left) in enumerate(offsets.tolist()):
        expected = TF.crop(TF.pad(x[i], [4]), top, left, 8, 8)
        assert torch.equal(out[i], expected)
    flipped = random_crop_flip(x, 4, offsets, torch.tensor([True, False, False, True]))
    assert torch.equal(flipped[0], out[0].flip(-1)) and torch.equal(flipped[1], out[1])


def test_the_seed_fixes_the_batches_and_the_state_resumes_them():
    data = _data()
    a, b = DeviceBatches(data, 16, seed=1, padding=2, flip=True), DeviceBatches(data, 16, seed=1, padding=2, flip=True)
    for (xa, ya), (xb, yb) in zip(_epoch(a), _epoch(b), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    state = a.state_dict()
    expected = _epoch(a)
    resumed = DeviceBatches(data, 16, seed=99, padding=2, flip=True)
    resumed.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, _epoch(resumed), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = _epoch(DeviceBatches(data, 16, seed=2, padding=2, flip=True))
    assert not all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(expected, other))


def test_a_set_too_large_to_keep_resident_gives_the_same_batches():
    data = _data()
    resident = DeviceBatches(data, 16, seed=4, padding=2, flip=True)
    host = DeviceBatches(data, 16, seed=4, padding=2, flip=True, resident_bytes=0)
    assert resident.resident and not host.resident
    for (xa, ya), (xb, yb) in zip(_epoch(resident), _epoch(host), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


class _Items(Dataset):
    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return x, int(y)


def test_any_map_style_dataset_is_stacked_once():
    data = _data(10)
    plain, stacked = DeviceBatches(data, 4, seed=0), DeviceBatches(_Items(data), 4, seed=0)
    for (xa, ya), (xb, yb) in zip(_epoch(plain), _epoch(stacked), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        DeviceBatches(_data(), 0)
    with pytest.raises(ValueError, match="empty"):
        DeviceBatches(TensorDataset(torch.zeros(0, 3, 4, 4), torch.zeros(0, dtype=torch.long)), 4)


def test_cpu_batches_are_in_the_standard_layout_even_when_cropped():
    """The crop returns a channels-last view; on the CPU batches must come out in conv_layout's standard layout
    (channels-last CPU convolutions reach a oneDNN out-of-bounds write, see test_defenses)."""
    for padding, flip in [(0, False), (4, False), (4, True), (0, True)]:
        for x, _ in DeviceBatches(_data(), 7, padding=padding, flip=flip):
            assert x.is_contiguous()
