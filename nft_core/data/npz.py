"""Reading ``npz:PATH`` datasets: keys ``x`` (uint8 N x H x W x C) and ``y`` (int64 N).

PATH is a local file or a URL (``s3://bucket/clean.npz``, ``gs://...``, ``https://...``) read through fsspec,
which needs the protocol's package (s3fs, gcsfs, ...) and takes the store's credentials from the environment.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import IO

import numpy as np
import torch

from nft_core.data.image_data import ImageData


#: Largest array an npz dataset may declare (bytes, uncompressed): 4 GiB, about 1.4 M 32 x 32 RGB images.
MAX_NPZ_BYTES = 4 << 30


def _check_member_sizes(archive: np.lib.npyio.NpzFile, path: str | Path, max_bytes: int) -> None:
    """Refuse, from the archive's headers alone, arrays larger than ``max_bytes`` (a small compressed file can
    declare gigabytes of zeros)."""
    members = archive.zip
    if members is None:  # closed archive
        raise ValueError(f"npz dataset {str(path)!r} is closed")
    for name in archive.files:
        try:
            info = members.getinfo(f"{name}.npy")
            with members.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                shape, _, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0(fh))
        except (KeyError, OSError, ValueError, zipfile.BadZipFile) as err:
            raise ValueError(f"npz dataset {str(path)!r}: array {name!r} has no readable header: {err}") from err
        declared = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if max(declared, info.file_size) > max_bytes:
            raise ValueError(f"npz dataset {str(path)!r}: array {name!r} declares {max(declared, info.file_size)} "
                             f"bytes ({shape}, {dtype}), above the {max_bytes} allowed")


def _fetch(url: str, max_bytes: int) -> IO[bytes]:
    """The bytes of a remote npz file (fsspec), refused before download when larger than ``max_bytes``."""
    import fsspec

    try:
        fs, remote = fsspec.core.url_to_fs(url)
        size = fs.size(remote)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"npz dataset {url!r} does not exist") from err
    except (ImportError, ValueError, OSError) as err:  # no package for the protocol, bad URL, unreachable store
        raise ValueError(f"npz dataset {url!r} cannot be read: {err}") from err
    if size is not None and size > max_bytes:
        raise ValueError(f"npz dataset {url!r} is {size} bytes, above the {max_bytes} allowed")
    try:
        with fs.open(remote, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as err:
        raise ValueError(f"npz dataset {url!r} cannot be read: {err}") from err
    if len(data) > max_bytes:
        raise ValueError(f"npz dataset {url!r} is above the {max_bytes} bytes allowed")
    return io.BytesIO(data)


def load_npz(path: str | Path, num_classes: int | None = None, *, max_bytes: int = MAX_NPZ_BYTES) -> ImageData:
    """Load and validate an npz dataset.

    Args:
        path: the ``.npz`` file, or its URL (any protocol fsspec has a package for).
        num_classes: number of classes; default ``max(y) + 1``.
        max_bytes: largest array the archive may declare (checked from its headers before reading).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an npz archive, a missing key, an array above ``max_bytes``, a wrong dtype or shape,
            or a label out of range; the message names the file and the problem.
    """
    source: Path | IO[bytes]
    if isinstance(path, str) and "://" in path:
        source = _fetch(path, max_bytes)
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"npz dataset {str(path)!r} does not exist")
        source = path
    try:
        archive = np.load(source, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"npz dataset {str(path)!r} is not a readable npz archive: {err}") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"npz dataset {str(path)!r} is a single .npy array, not an npz archive with x and y")
    with archive:
        missing = {"x", "y"} - set(archive.files)
        if missing:
            raise ValueError(f"npz dataset {str(path)!r} lacks key(s) {sorted(missing)} (has {sorted(archive.files)})")
        _check_member_sizes(archive, path, max_bytes)
        try:
            x, y = archive["x"], archive["y"]
        except ValueError as err:  # object arrays need pickle, which is refused
            raise ValueError(f"npz dataset {str(path)!r}: x and y must be plain arrays: {err}") from err
    if x.dtype != np.uint8:
        raise ValueError(f"npz dataset {str(path)!r}: x must be uint8, got {x.dtype}")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"npz dataset {str(path)!r}: x must be N x H x W x C with C in (1, 3), "
                         f"got shape {x.shape}")
    if y.dtype != np.int64 or y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"npz dataset {str(path)!r}: y must be int64 of shape ({len(x)},), "
                         f"got {y.dtype} of shape {y.shape}")
    if len(y) == 0:
        raise ValueError(f"npz dataset {str(path)!r} holds no samples")
    if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
        raise ValueError(f"npz dataset {str(path)!r}: labels span [{y.min()}, {y.max()}], "
                         f"outside [0, {num_classes if num_classes is not None else 'inf'})")
    num_classes = num_classes if num_classes is not None else int(y.max()) + 1
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return ImageData(xt, torch.from_numpy(y.copy()), num_classes)
