"""Datasets by spec string (:mod:`nft_core.data.specs`), the in-memory :class:`ImageData`, an offline synthetic
source and stratified splits. Loaders return uint8 images; :meth:`ImageData.images` gives floats in [0, 1]."""

from nft_core.data.image_data import ImageData
from nft_core.data.specs import SCHEMES, load_dataset
from nft_core.data.split import stratified_split
from nft_core.data.synthetic import SHAPES, make_synthetic

__all__ = ["SCHEMES", "SHAPES", "ImageData", "load_dataset", "make_synthetic", "stratified_split"]
