"""Datasets as uint8 NHWC arrays with fixed train/validation/test splits, loaded once on the host.

The training loop puts them on the accelerator whole; see `sd_jax.data.augment` for what happens there.
"""
import dataclasses
import logging
import os
from typing import Callable, Dict

import numpy as np

from sd_jax.data.files import CIFAR_LAYOUTS, DataError, check_arrays, read_cifar, read_svhn
from sd_jax.data.tfds import read_tfds
from sd_jax.training.records import write_atomic

log = logging.getLogger(__name__)


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
    def image_shape(self) -> tuple:
        return self.train.images.shape[1:]

    def normalization(self, how: str):
        """(mean, std) of the training split in [0, 1] pixel units; see `normalization_stats`."""
        return normalization_stats(self.train.images, how)


NORMALIZATIONS = ("pixel_mean_scalar_std", "channel_mean_std")


def normalization_stats(images_u8: np.ndarray, how: str):
    """Input statistics of uint8 NHWC training images, in [0, 1] pixel units, float32.

    "pixel_mean_scalar_std": the mean *image* (H, W, C) and one standard deviation over every value
    of the split (unbiased, as Torch's `std()`): the authors' `CIFAR:preprocess` / `SVHN:preprocess`
    (`data:mean(1)`, `data:std()`, both taken before the mean is subtracted).
    "channel_mean_std": per-channel mean and standard deviation (C,), the usual PyTorch transform.
    """
    if how == "channel_mean_std":
        flat = images_u8.reshape(-1, images_u8.shape[-1])
        return ((flat.mean(0, dtype=np.float64) / 255.0).astype(np.float32),
                (flat.std(0, dtype=np.float64) / 255.0).astype(np.float32))
    if how != "pixel_mean_scalar_std":
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {how!r}")
    total = total_sq = 0
    for start in range(0, len(images_u8), 4096):  # exact integer sums, a chunk at a time
        chunk = images_u8[start:start + 4096].astype(np.int64)
        total += int(chunk.sum())
        total_sq += int((chunk * chunk).sum())
    count = images_u8.size
    variance = (total_sq - total * total / count) / (count - 1)
    return ((images_u8.mean(0, dtype=np.float64) / 255.0).astype(np.float32),
            np.float32(np.sqrt(variance) / 255.0))


def split_by_permutation(images, labels, sizes, seed):
    """Shuffle once with a fixed seed and cut into consecutive splits of the given sizes."""
    order = np.random.default_rng(seed).permutation(len(labels))
    bounds = np.cumsum((0,) + tuple(sizes))
    return [Split(images[order[a:b]], labels[order[a:b]].astype(np.int32)) for a, b in zip(bounds, bounds[1:])]


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images): real data with no download.

    Fixed split: 1300 train / 200 validation / 297 test. Pixel values 0..16 scaled to 0..255.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    train, val, test = split_by_permutation(images, digits.target, (1300, 200, 297), seed=0)
    return Dataset("digits", train, val, test, num_classes=10, translate=1, flip=False)


def load_synthetic(num_classes: int = 10, size: int = 16, seed: int = 0) -> Dataset:
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


def cifar_splits(raw, val_size: int = 5000, seed: int = 0):
    """The paper's CIFAR split: a fixed shuffle of the 50k training images into 45k train / 5k val."""
    images, labels = raw["train"]
    if not 0 < val_size < len(labels):
        raise DataError(f"cannot hold out {val_size} validation images from {len(labels)} training images")
    val, train = split_by_permutation(images, labels, (val_size, len(labels) - val_size), seed)
    return train, val, Split(raw["test"][0], raw["test"][1].astype(np.int32))


def svhn_splits(raw, per_class=(400, 200), num_classes: int = 10, seed: int = 0):
    """The paper's SVHN split: validation = 400 per class from train + 200 per class from extra;
    training = everything else of train + extra."""
    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    for (images, labels), count in zip((raw["train"], raw["extra"]), per_class):
        order = rng.permutation(len(labels))
        held = np.zeros(len(labels), bool)
        for c in range(num_classes):
            of_class = order[labels[order] == c]
            if len(of_class) < count:
                raise DataError(f"SVHN class {c} has {len(of_class)} images, fewer than the {count} to hold out")
            held[of_class[:count]] = True
        val_parts.append((images[held], labels[held]))
        train_parts.append((images[~held], labels[~held]))
    join = lambda parts: Split(np.concatenate([p[0] for p in parts]),
                               np.concatenate([p[1] for p in parts]).astype(np.int32))
    return join(train_parts), join(val_parts), Split(raw["test"][0], raw["test"][1].astype(np.int32))


@dataclasses.dataclass(frozen=True)
class OfficialDataset:
    """A dataset read from tensorflow-datasets or its official files, split as in the paper."""

    num_classes: int
    splits: tuple  # the official splits to read
    make_splits: Callable
    translate: int
    flip: bool
    split_sizes: tuple  # (train, val, test) images after the paper's split (sd_jax.aot compiles without the data)
    image_side: int = 32


OFFICIAL = {
    "cifar10": OfficialDataset(10, ("train", "test"), cifar_splits, translate=4, flip=True,
                               split_sizes=(45_000, 5_000, 10_000)),
    "cifar100": OfficialDataset(100, ("train", "test"), cifar_splits, translate=4, flip=True,
                                split_sizes=(45_000, 5_000, 10_000)),
    # 73,257 train + 531,131 extra, less 400 + 200 per class held out; 26,032 test
    "svhn": OfficialDataset(10, ("train", "test", "extra"), svhn_splits, translate=0, flip=False,
                            split_sizes=(598_388, 6_000, 26_032)),
}
BUNDLED: Dict[str, Callable[[], Dataset]] = {"digits": load_digits, "synthetic": load_synthetic}
DATASETS = tuple(BUNDLED) + tuple(OFFICIAL)
DATA_SOURCES = ("tfds", "files")


def default_data_dir() -> str:
    return os.path.expanduser(os.path.join("~", "tensorflow_datasets"))


def read_official(name: str, data_dir: str, source: str):
    """{split: (images, labels)} of an official dataset; tfds reads are cached as .npz in the data dir."""
    if source == "files":
        if not data_dir:
            raise DataError("data_source='files' needs data_dir: the folder holding the official files")
        return read_cifar(name, data_dir) if name in CIFAR_LAYOUTS else read_svhn(data_dir)
    cache = os.path.join(data_dir or default_data_dir(), "sd_jax_cache", f"{name}.npz")
    if os.path.exists(cache):
        try:
            with np.load(cache) as arrays:
                return {s: (arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in OFFICIAL[name].splits}
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            log.warning("cache %s is unreadable (%s); reading the data again", cache, e)
    raw = read_tfds(name, data_dir, OFFICIAL[name].splits)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    arrays = {f"{s}_{k}": v for s, (x, y) in raw.items() for k, v in (("images", x), ("labels", y))}
    write_atomic(cache, lambda f: np.savez(f, **arrays), binary=True)
    return raw


def load_dataset(name: str, data_dir: str = "", source: str = "tfds") -> Dataset:
    """The named dataset with its train/validation/test splits (uint8 images, int32 labels)."""
    if name in BUNDLED:
        return BUNDLED[name]()
    if name not in OFFICIAL:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if source not in DATA_SOURCES:
        raise ValueError(f"unknown data source {source!r}; choose one of {DATA_SOURCES}")
    spec = OFFICIAL[name]
    raw = read_official(name, data_dir, source)
    for split, (images, labels) in raw.items():
        check_arrays(images, labels, spec.num_classes, f"{name} {split} split")
    train, val, test = spec.make_splits(raw)
    return Dataset(name, train, val, test, spec.num_classes, spec.translate, spec.flip)
