"""nft_core.data: spec parsing and errors, npz round trip and validation, ImageFolder, synthetic source, splits."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from nft_core.data import ImageData, load_dataset, make_synthetic, stratified_split


def _random_data(n: int = 40, num_classes: int = 4, size: int = 8) -> ImageData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return ImageData(x, torch.arange(n) % num_classes, num_classes)


def test_image_data_views_and_subset():
    data = _random_data()
    img = data.images()
    assert img.dtype == torch.float32 and img.min() >= 0 and img.max() <= 1
    assert torch.equal((img * 255).round().byte(), data.x)
    x, y = data.dataset()[3]
    assert torch.equal(x, img[3]) and y == data.y[3]
    sub = data.subset([5, 1])
    assert torch.equal(sub.x, data.x[[5, 1]]) and sub.num_classes == 4 and len(sub) == 2


@pytest.mark.parametrize("bad", [dict(x=torch.zeros(2, 3, 4, 4), y=torch.zeros(2, dtype=torch.long)),
                                 dict(x=torch.zeros(2, 3, 4, 4, dtype=torch.uint8), y=torch.zeros(2, dtype=torch.int32))])
def test_image_data_rejects_wrong_dtypes(bad):
    with pytest.raises(TypeError):
        ImageData(num_classes=2, **bad)


def test_image_data_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="outside"):
        ImageData(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 5]), 3)


def test_npz_round_trip(tmp_path):
    data = _random_data()
    path = tmp_path / "d.npz"
    data.save_npz(path)
    assert sorted(tmp_path.iterdir()) == [path]  # no temp file left behind
    with np.load(path) as raw:
        assert raw["x"].shape == (40, 8, 8, 3) and raw["x"].dtype == np.uint8 and raw["y"].dtype == np.int64
    back = load_dataset(f"npz:{path}")
    assert torch.equal(back.x, data.x) and torch.equal(back.y, data.y) and back.num_classes == 4


@pytest.mark.parametrize("arrays, problem", [
    (dict(x=np.zeros((2, 4, 4, 3), np.uint8)), "lacks key"),
    (dict(x=np.zeros((2, 4, 4, 3), np.float32), y=np.zeros(2, np.int64)), "uint8"),
    (dict(x=np.zeros((2, 4, 4), np.uint8), y=np.zeros(2, np.int64)), "N x H x W x C"),
    (dict(x=np.zeros((2, 4, 4, 3), np.uint8), y=np.zeros(2, np.int32)), "int64"),
    (dict(x=np.zeros((2, 4, 4, 3), np.uint8), y=np.zeros(3, np.int64)), "int64 of shape"),
    (dict(x=np.zeros((2, 4, 4, 3), np.uint8), y=np.array([0, -1])), "labels span"),
])
def test_malformed_npz_errors_name_file_and_problem(tmp_path, arrays, problem):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=problem) as err:
        load_dataset(f"npz:{path}")
    assert "bad.npz" in str(err.value)


def test_npz_not_an_archive(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="junk.npz"):
        load_dataset(f"npz:{path}")


@pytest.mark.parametrize("spec, exc, match", [
    ("s3:bucket/x", ValueError, "unknown scheme 's3'"),
    ("npz:", ValueError, "needs a path"),
    ("npz:/nonexistent/data.npz", FileNotFoundError, "/nonexistent/data.npz"),
    ("imagefolder:/nonexistent/dir", FileNotFoundError, "/nonexistent/dir"),
    ("torchvision:MNIST:/tmp", ValueError, "CIFAR10"),
    ("torchvision:CIFAR10", ValueError, "torchvision:NAME:ROOT"),
    ("synthetic:n=abc", ValueError, "must be an integer"),
    ("synthetic:size=3", ValueError, "bad option 'size=3'"),
])
def test_spec_errors(spec, exc, match):
    with pytest.raises(exc, match=match):
        load_dataset(spec)


def test_cifar10_missing_root_is_reported_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="torchvision:CIFAR10"):
        load_dataset(f"torchvision:CIFAR10:{tmp_path}")


def test_cifar10_reads_the_torchvision_batch_format(tmp_path):
    # Write the python-pickle batches torchvision.datasets.CIFAR10 reads. Its integrity check compares fixed
    # MD5 digests, so a subclass carries the digests of these files; loader and torchvision code run as is.
    import hashlib

    import torchvision.datasets
    from torchvision.datasets import CIFAR10

    base = tmp_path / CIFAR10.base_folder
    base.mkdir()
    rng = np.random.default_rng(0)
    files = {name: rng.integers(0, 256, (4, 3072), dtype=np.uint8) for name, _ in CIFAR10.train_list + CIFAR10.test_list}
    for name, data in files.items():
        (base / name).write_bytes(pickle.dumps({"data": data, "labels": [0, 1, 2, 9]}))
    (base / CIFAR10.meta["filename"]).write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))

    def md5(name: str) -> str:
        return hashlib.md5((base / name).read_bytes()).hexdigest()

    class LocalCIFAR10(CIFAR10):
        train_list = [[name, md5(name)] for name, _ in CIFAR10.train_list]
        test_list = [[name, md5(name)] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": md5(CIFAR10.meta["filename"])}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torchvision.datasets, "CIFAR10", LocalCIFAR10)  # the loader imports torchvision when called
        test = load_dataset(f"torchvision:CIFAR10:{tmp_path}", train=False)
        train = load_dataset(f"torchvision:CIFAR10:{tmp_path}", train=True)
    assert test.x.shape == (4, 3, 32, 32) and len(train) == 20
    assert test.num_classes == 10 and test.class_names[9] == "c9"
    assert torch.equal(test.x[1], torch.from_numpy(files["test_batch"][1].reshape(3, 32, 32)))


def test_imagefolder_loads_pngs(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            arr = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
            arrays[(cls, i)] = arr
    data = load_dataset(f"imagefolder:{tmp_path}")
    assert data.class_names == ("cat", "dog") and data.num_classes == 2
    assert data.x.shape == (6, 3, 6, 5) and data.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(data.x[4], torch.from_numpy(arrays[("dog", 1)]).permute(2, 0, 1))


def test_imagefolder_rejects_mixed_sizes(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "0.png")
    Image.new("RGB", (9, 8)).save(tmp_path / "a" / "1.png")
    with pytest.raises(ValueError, match="one size"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_synthetic_is_deterministic_and_seed_dependent():
    a, b = make_synthetic(300, seed=1), make_synthetic(300, seed=1)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, make_synthetic(300, seed=2).x)
    assert a.x.shape == (300, 3, 32, 32) and a.x.dtype == torch.uint8
    assert torch.bincount(a.y).tolist() == [30] * 10


def test_synthetic_train_and_test_are_disjoint():
    train, test = make_synthetic(500, train=True), make_synthetic(500, train=False)
    flat_train = {bytes(img.numpy()) for img in train.x}
    assert not any(bytes(img.numpy()) in flat_train for img in test.x)
    assert not torch.equal(train.x[:10], test.x[:10])


def test_synthetic_spec_options():
    data = load_dataset("synthetic:n=120,n_test=30,seed=4,num_classes=6,image_size=16", train=False)
    assert data.x.shape == (30, 3, 16, 16) and data.num_classes == 6
    assert torch.equal(data.x, make_synthetic(30, seed=4, train=False, num_classes=6, image_size=16).x)


def test_synthetic_is_not_solvable_from_mean_colour():
    data = make_synthetic(2000, seed=0)
    feats = data.images().mean(dim=(2, 3))
    centroids = torch.stack([feats[data.y == c].mean(0) for c in range(10)])
    pred = torch.cdist(feats, centroids).argmin(1)
    assert (pred == data.y).float().mean() < 0.2


@pytest.mark.parametrize("kwargs, sizes", [(dict(per_class=3), 3), (dict(fraction=0.1), 4)])
def test_stratified_split_counts_and_determinism(kwargs, sizes):
    data = _random_data(n=160, num_classes=4)
    sel, rest = stratified_split(data, seed=7, **kwargs)
    assert torch.bincount(sel.y, minlength=4).tolist() == [sizes] * 4
    assert len(sel) + len(rest) == len(data)
    again, _ = stratified_split(data, seed=7, **kwargs)
    assert torch.equal(sel.x, again.x)
    other, _ = stratified_split(data, seed=8, **kwargs)
    assert not torch.equal(sel.x, other.x)
    all_rows = {bytes(r.numpy()) for r in torch.cat([sel.x, rest.x])}
    assert len(all_rows) == len({bytes(r.numpy()) for r in data.x})


@pytest.mark.parametrize("kwargs", [dict(), dict(per_class=2, fraction=0.5), dict(per_class=0), dict(fraction=1.5)])
def test_stratified_split_argument_errors(kwargs):
    with pytest.raises(ValueError):
        stratified_split(_random_data(), **kwargs)


def _npz_declaring(path, shape):
    """An npz whose ``x`` member declares ``shape`` (uint8) but holds no data: a few hundred bytes on disk."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    y = io.BytesIO()
    np.save(y, np.zeros(2, dtype=np.int64))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", header.getvalue())  # the header (with its magic), and no data
        zf.writestr("y.npy", y.getvalue())
    return path


def test_npz_declaring_gigabytes_is_refused_from_its_headers(tmp_path):
    """Issue 12: an 11 MB npz holding 11.8 GB of zeros was read until memory ran out."""
    path = _npz_declaring(tmp_path / "bomb.npz", (1_000_000, 64, 64, 3))
    with pytest.raises(ValueError, match=r"'x' declares 12288000000 bytes"):
        load_dataset(f"npz:{path}")


def test_npz_size_bound_is_configurable(tmp_path):
    from nft_core.data.npz import load_npz

    data = _random_data()
    data.save_npz(tmp_path / "d.npz")
    assert len(load_npz(tmp_path / "d.npz")) == 40
    with pytest.raises(ValueError, match="above the 1000 allowed"):
        load_npz(tmp_path / "d.npz", max_bytes=1000)


def test_imagefolder_refuses_an_image_above_the_pixel_bound_before_decoding(tmp_path, monkeypatch):
    """Issue 12: a decompression-bomb PNG (gigapixels in kilobytes) was decoded; the size is read first."""
    import nft_core.data.folders as folders

    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "0.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "a" / "1.png")
    (tmp_path / "a" / "2.png").write_bytes(b"not a png")
    monkeypatch.setattr(folders, "MAX_IMAGE_PIXELS", 1000)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or None)
    with pytest.raises(ValueError, match=r"64 x 64 pixels, above the 1000 allowed"):
        load_dataset(f"imagefolder:{tmp_path}")
    assert (64, 64) not in decoded
    monkeypatch.setattr(folders, "MAX_IMAGE_PIXELS", 10_000)
    monkeypatch.undo()
    (tmp_path / "a" / "1.png").unlink()
    with pytest.raises(ValueError, match="2.png: not a readable image"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_npz_from_an_object_store_url(tmp_path):
    """``npz:URL`` reads through fsspec (here its in-memory store, as s3:// or gs:// would with s3fs/gcsfs); a
    missing object, an unknown protocol and an oversized one are refused with the URL in the message."""
    import fsspec

    from nft_core.data.npz import load_npz

    data = _random_data()
    data.save_npz(tmp_path / "d.npz")
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/clean.npz", (tmp_path / "d.npz").read_bytes())
    try:
        back = load_dataset("npz:memory://bucket/clean.npz")
        assert torch.equal(back.x, data.x) and torch.equal(back.y, data.y)
        with pytest.raises(FileNotFoundError, match="memory://bucket/missing.npz"):
            load_dataset("npz:memory://bucket/missing.npz")
        with pytest.raises(ValueError, match=r"'memory://bucket/clean.npz' is \d+ bytes, above the 100 allowed"):
            load_npz("memory://bucket/clean.npz", max_bytes=100)
        with pytest.raises(ValueError, match=r"nosuchproto://x/y.npz' cannot be read"):
            load_dataset("npz:nosuchproto://x/y.npz")
    finally:
        fs.rm("/bucket", recursive=True)
