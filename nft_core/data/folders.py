"""Real image datasets through torchvision: ``ImageFolder`` directories, CIFAR-10 and GTSRB."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from nft_core.data.image_data import ImageData


def _to_uint8() -> Callable[[Any], torch.Tensor]:
    """PIL image -> uint8 C x H x W tensor. torchvision is imported by the loaders that use it, not by every stage
    (its import takes 1.7 s, and every stage imports this module)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.uint8, scale=True)])


#: Largest image an image folder may hold (pixels), checked from the file's header before decoding it.
MAX_IMAGE_PIXELS = 4096 * 4096


def open_bounded(path: str) -> Image.Image:
    """``PIL.Image.open`` as RGB, refusing an image above :data:`MAX_IMAGE_PIXELS` before it is decoded (a
    few-kilobyte PNG can declare gigapixels)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{path}: {width} x {height} pixels, above the {MAX_IMAGE_PIXELS} allowed "
                                 "(a decompression bomb, or an image to resize first)")
            return img.convert("RGB")
    except (Image.DecompressionBombError, UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: not a readable image: {err}") from err

#: GTSRB images vary in size; like the NFT supplementary (Sec. 2.1) they are resized to 32 x 32.
GTSRB_SIZE = 32


def _stack(items: Iterable[tuple[torch.Tensor, int]], source: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs: list[torch.Tensor] = []
    ys: list[int] = []
    for img, label in items:
        if xs and img.shape != xs[0].shape:
            raise ValueError(f"{source}: images must all have one size, found {tuple(xs[0].shape)} "
                             f"and {tuple(img.shape)} (resize the images first)")
        xs.append(img)
        ys.append(int(label))
    if not xs:
        raise ValueError(f"{source} holds no images")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def load_imagefolder(root: str | Path) -> ImageData:
    """``torchvision.datasets.ImageFolder(root)`` (one sub-directory per class) as RGB uint8 images.

    Raises:
        FileNotFoundError: ``root`` is not a directory or has no class folders with images.
        ValueError: the images differ in size.
    """
    if not Path(root).is_dir():
        raise FileNotFoundError(f"imagefolder dataset {str(root)!r} is not a directory")
    from torchvision import datasets

    folder = datasets.ImageFolder(str(root), transform=_to_uint8(), loader=open_bounded)
    x, y = _stack(folder, f"imagefolder dataset {str(root)!r}")
    return ImageData(x, y, len(folder.classes), tuple(folder.classes))


def load_cifar10(root: str | Path, train: bool, download: bool) -> ImageData:
    """CIFAR-10 from ``root`` (the python-pickle batches ``torchvision.datasets.CIFAR10`` reads)."""
    from torchvision import datasets

    ds = datasets.CIFAR10(str(root), train=train, download=download)
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return ImageData(x, torch.tensor(ds.targets, dtype=torch.long), len(ds.classes), tuple(ds.classes))


def load_gtsrb(root: str | Path, train: bool, download: bool) -> ImageData:
    """GTSRB from ``root`` (``torchvision.datasets.GTSRB``), resized to 32 x 32, 43 classes."""
    from torchvision import datasets
    from torchvision.transforms import v2

    transform = v2.Compose([_to_uint8(), v2.Resize((GTSRB_SIZE, GTSRB_SIZE), antialias=True)])
    ds = datasets.GTSRB(str(root), split="train" if train else "test", transform=transform, download=download)
    x, y = _stack(ds, f"GTSRB dataset at {str(root)!r}")
    return ImageData(x, y, 43)
