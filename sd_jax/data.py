"""Datasets as uint8 NHWC arrays with fixed train/validation/test splits, loaded once on the host.

The training loop puts them on the accelerator whole; see `sd_jax.augment` for what happens there.
"""
import dataclasses
from typing import Callable, Dict

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (N, H, W, C)
    labels: np.ndarray  # int32, (N,)

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels shape {self.labels.shape} does not match {self.images.shape[0]} images")

    def __len__(self):
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train/validation/test splits plus what the on-device pipeline needs to know about them."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    translate: int  # default augmentation: random translation by up to this many pixels
    flip: bool  # default augmentation: random horizontal flips

    @property
    def mean(self) -> np.ndarray:
        """Per-channel mean of the training split, in [0, 1] pixel units."""
        return (self.train.images.reshape(-1, self.train.images.shape[-1]).mean(0, dtype=np.float64)
                / 255.0).astype(np.float32)

    @property
    def std(self) -> np.ndarray:
        """Per-channel standard deviation of the training split, in [0, 1] pixel units."""
        return (self.train.images.reshape(-1, self.train.images.shape[-1]).std(0, dtype=np.float64)
                / 255.0).astype(np.float32)


def split_by_permutation(images, labels, sizes, seed):
    """Shuffle once with a fixed seed and cut into consecutive splits of the given sizes."""
    order = np.random.default_rng(seed).permutation(len(labels))
    bounds = np.cumsum((0,) + tuple(sizes))
    return [Split(images[order[a:b]], labels[order[a:b]].astype(np.int32)) for a, b in zip(bounds, bounds[1:])]


def load_digits(data_dir: str = "") -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images): real data with no download.

    Fixed split: 1300 train / 200 validation / 297 test. Pixel values 0..16 scaled to 0..255.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    train, val, test = split_by_permutation(images, digits.target, (1300, 200, 297), seed=0)
    return Dataset("digits", train, val, test, num_classes=10, translate=1, flip=False)


def load_synthetic(data_dir: str = "", num_classes: int = 10, size: int = 16, seed: int = 0) -> Dataset:
    """A generated, learnable task robust to translation: each class has its own colour and stripe
    frequency/orientation, and every image adds strong pixel noise. 1024 train / 256 val / 256 test."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(60, 195, size=(num_classes, 1, 1, 3))
    grid = np.arange(size)
    frequency = 1 + np.arange(num_classes) % 4
    vertical = (np.arange(num_classes) // 4) % 2 == 0
    phase = 2 * np.pi * np.where(vertical[:, None, None], grid[None, None, :], grid[None, :, None])
    stripes = 40 * np.sin(phase * frequency[:, None, None] / size)[..., None]
    counts = (1024, 256, 256)
    labels = rng.permutation(np.arange(sum(counts)) % num_classes)
    noise = rng.normal(0, 40, size=(len(labels), size, size, 3))
    images = np.clip(colours[labels] + stripes[labels] + noise, 0, 255).astype(np.uint8)
    bounds = np.cumsum((0,) + counts)
    splits = [Split(images[a:b], labels[a:b].astype(np.int32)) for a, b in zip(bounds, bounds[1:])]
    return Dataset("synthetic", *splits, num_classes=num_classes, translate=2, flip=False)


LOADERS: Dict[str, Callable[[str], Dataset]] = {
    "digits": load_digits,
    "synthetic": load_synthetic,
}


def load_dataset(name: str, data_dir: str = "") -> Dataset:
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(LOADERS)}")
    return LOADERS[name](data_dir)
