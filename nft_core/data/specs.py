"""Dataset spec strings: ``npz:PATH``, ``imagefolder:DIR``, ``torchvision:CIFAR10:ROOT``,
``torchvision:GTSRB:ROOT``, ``synthetic`` and ``synthetic:n=5000,seed=0``."""

from __future__ import annotations

from nft_core.data.folders import load_cifar10, load_gtsrb, load_imagefolder
from nft_core.data.image_data import ImageData
from nft_core.data.npz import load_npz
from nft_core.data.synthetic import make_synthetic

SCHEMES: tuple[str, ...] = ("npz", "imagefolder", "torchvision", "synthetic")
TORCHVISION_DATASETS: tuple[str, ...] = ("CIFAR10", "GTSRB")
#: ``synthetic`` options and their defaults (``n``: training-split size, ``n_test``: test-split size).
SYNTHETIC_DEFAULTS: dict[str, int] = {"n": 5000, "n_test": 2000, "seed": 0, "num_classes": 10, "image_size": 32}


def _synthetic_options(spec: str, text: str) -> dict[str, int]:
    options = dict(SYNTHETIC_DEFAULTS)
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in options:
            raise ValueError(f"dataset spec {spec!r}: bad option {item!r}; use key=value with keys "
                             f"{sorted(options)}")
        try:
            options[key] = int(value)
        except ValueError as err:
            raise ValueError(f"dataset spec {spec!r}: option {key} must be an integer, got {value!r}") from err
    return options


def load_dataset(spec: str, *, train: bool = True, download: bool = False) -> ImageData:
    """Load the dataset named by ``spec``.

    Args:
        spec: ``npz:PATH`` | ``imagefolder:DIR`` | ``torchvision:CIFAR10:ROOT`` | ``torchvision:GTSRB:ROOT`` |
            ``synthetic[:n=..,n_test=..,seed=..,num_classes=..,image_size=..]``.
        train: the training split (torchvision and synthetic sources; npz and imagefolder name one file/dir).
        download: let torchvision download a missing dataset (off by default; nothing is fetched unasked).

    Raises:
        ValueError: unknown scheme or torchvision dataset, empty path, bad synthetic option, malformed file.
        FileNotFoundError: the named file or directory does not exist.
    """
    scheme, sep, rest = spec.partition(":")
    if scheme not in SCHEMES:
        raise ValueError(f"dataset spec {spec!r}: unknown scheme {scheme!r}; use one of {list(SCHEMES)}")
    if scheme == "synthetic":
        opts = _synthetic_options(spec, rest)
        n, n_test = opts.pop("n"), opts.pop("n_test")
        return make_synthetic(n if train else n_test, train=train, **opts)
    if not rest:
        raise ValueError(f"dataset spec {spec!r}: scheme {scheme!r} needs a path after ':'")
    if scheme == "npz":
        return load_npz(rest)
    if scheme == "imagefolder":
        return load_imagefolder(rest)
    name, sep, root = rest.partition(":")
    if name not in TORCHVISION_DATASETS or not root:
        raise ValueError(f"dataset spec {spec!r}: use torchvision:NAME:ROOT with NAME in {list(TORCHVISION_DATASETS)}")
    loader = load_cifar10 if name == "CIFAR10" else load_gtsrb
    try:
        return loader(root, train, download)
    except RuntimeError as err:  # torchvision reports a missing/corrupt dataset as RuntimeError
        raise FileNotFoundError(f"dataset spec {spec!r}: {err}") from err
