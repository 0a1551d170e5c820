"""ImageNet (ILSVRC 2012) as lists of encoded images: tensorflow-datasets' imagenet2012, an
ImageFolder on disk, or synthetic JPEGs.

Too large for the accelerator (about 1.28M JPEGs, ~150 GB), ImageNet stays a list of where each
encoded image comes from and its label; `sd_jax.data.input_pipeline` decodes and crops them on the host.
Labels are indices into the 1000 sorted WordNet ids, which is the order of tensorflow-datasets'
`imagenet2012` label names and of torchvision's ImageFolder over the full train directory, so the
sources and pretrained torchvision weights agree on what label 7 means.
"""
import dataclasses
import functools
import os
from typing import Any, Optional

import numpy as np

from sd_jax.data.cifar_svhn import default_data_dir
from sd_jax.data.files import DataError
from sd_jax.data.tfds import import_tfds

NUM_CLASSES = 1000
TRAIN_IMAGES, VAL_IMAGES = 1_281_167, 50_000
MINIVAL_FRACTION = 0.01  # held out of train to pick the best epoch (big_vision's train[99%:])
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")  # ImageNet's files are .JPEG; one of them is a PNG inside
MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


@functools.lru_cache(maxsize=1)
def wnids() -> tuple:
    """The 1000 WordNet ids in label order: tensorflow-datasets' imagenet2012 label names (shipped
    with tfds, no download)."""
    import tensorflow_datasets as tfds

    names = tuple(tfds.builder("imagenet2012").info.features["label"].names)
    if len(names) != NUM_CLASSES or list(names) != sorted(names):
        raise DataError("tensorflow-datasets' imagenet2012 label names are not the 1000 sorted wnids")
    return names


@dataclasses.dataclass(frozen=True)
class ImageSplit:
    """One split: the labels and, per image, its file (`paths`), its tfds record (`records`), or
    for synthetic data nothing: image i is generated from (seed, i)."""

    name: str
    labels: np.ndarray  # int32, (N,): indices into wnids()
    paths: Optional[np.ndarray] = None  # str, (N,)
    records: Any = None  # tfds: a random-access data source whose "image" is the encoded bytes
    record_indices: Optional[np.ndarray] = None  # tfds: the record of each image (None: image i is record i)
    seed: int = 0  # synthetic images only

    def __len__(self):
        return len(self.labels)

    def record_index(self) -> np.ndarray:
        return np.arange(len(self)) if self.record_indices is None else self.record_indices

    def take(self, indices, name: str) -> "ImageSplit":
        """The images at `indices`, as a split of their own."""
        paths = None if self.paths is None else self.paths[indices]
        return dataclasses.replace(self, name=name, labels=self.labels[indices], paths=paths,
                                   record_indices=self.record_index()[indices])


def image_folder(root: str, split: str) -> ImageSplit:
    """`root/split/<wnid>/*.JPEG` (the layout torchvision's ImageFolder reads), files sorted within
    each wnid. Raises DataError naming a missing folder, an unknown wnid or an empty split."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f"no folder {folder}: data_source='files' for imagenet2012 reads an ImageFolder, "
                        f"{os.path.join(root, '{train,val}', '<wnid>', '*.JPEG')} (data_dir={root!r}); "
                        "see docs/imagenet.md, \"ImageNet data\"")
    classes = sorted(entry for entry in os.listdir(folder) if os.path.isdir(os.path.join(folder, entry)))
    unknown = sorted(set(classes) - set(wnids()))
    if unknown:
        raise DataError(f"{folder}: {len(unknown)} folder(s) are not ImageNet-1k wnids, e.g. {unknown[:3]}; "
                        "each class folder must be named by its wnid (n01440764, ...)")
    label_of = {wnid: label for label, wnid in enumerate(wnids())}
    paths, labels = [], []
    for wnid in classes:
        files = sorted(name for name in os.listdir(os.path.join(folder, wnid))
                       if name.lower().endswith(IMAGE_EXTENSIONS))
        paths += [os.path.join(folder, wnid, name) for name in files]
        labels += [label_of[wnid]] * len(files)
    if not paths:
        raise DataError(f"{folder} holds no images (*.JPEG in its wnid folders)")
    return ImageSplit(split, np.asarray(labels, np.int32), np.asarray(paths))


def synthetic(split: str, num_images: int, seed: int = 0) -> ImageSplit:
    """`num_images` generated JPEGs of ImageNet-like sizes (see `input_pipeline.synthetic_jpeg`),
    labels spread evenly over the classes in a fixed random order; deterministic, no disk."""
    labels = np.random.default_rng([seed, num_images]).permutation(np.arange(num_images) % NUM_CLASSES)
    return ImageSplit(split, labels.astype(np.int32), seed=seed)


def hold_out_minival(train: ImageSplit, fraction: float = MINIVAL_FRACTION) -> tuple:
    """(train without minival, minival): `fraction` of train chosen by a fixed permutation (seed 0),
    so the held-out images spread over all classes whatever order the source lists them in."""
    order = np.random.default_rng(0).permutation(len(train))
    held = max(1, int(round(fraction * len(train))))
    return train.take(np.sort(order[held:]), "train"), train.take(np.sort(order[:held]), "minival")


def tfds_splits(data_dir: str) -> dict:
    """{"train", "val"} from tensorflow-datasets' imagenet2012, prepared once (in the array_record
    format, which reads any image by index) from the two official tars in tfds's manual dir,
    `<data_dir>/downloads/manual`. Raises DataError at once when it is not prepared and a tar is
    missing: tfds cannot download ImageNet."""
    tfds = import_tfds()
    root = data_dir or default_data_dir()
    builder = tfds.builder("imagenet2012", data_dir=root, file_format="array_record")
    if not builder.is_prepared():
        manual = os.path.join(root, "downloads", "manual")
        missing = [name for name in MANUAL_FILES if not os.path.isfile(os.path.join(manual, name))]
        if missing:
            raise DataError(
                f"imagenet2012 is not prepared in {root} and tfds cannot download it: put {' and '.join(MANUAL_FILES)} "
                f"(image-net.org, after registering; missing: {', '.join(missing)}) in {manual}. Or set "
                "data_source='files' with an ImageFolder in data_dir (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG), "
                "or data_source='synthetic' to run without the data")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    return {name: records_split(tfds, builder, tfds_split, name) for name, tfds_split in
            (("train", "train"), ("val", "validation"))}


def records_split(tfds, builder, tfds_split: str, name: str) -> ImageSplit:
    """A prepared tfds split; its labels are read once and kept beside the data (`labels_<split>.npy`)."""
    records = builder.as_data_source(tfds_split, decoders={"image": tfds.decode.SkipDecoding()})
    cache = os.path.join(builder.data_dir, f"sd_jax_labels_{tfds_split}.npy")
    if os.path.exists(cache):
        labels = np.load(cache)
    else:
        labels = np.fromiter((records[i]["label"] for i in range(len(records))), np.int32, len(records))
        np.save(cache, labels)
    return ImageSplit(name, labels, records=records)


# The ImageNet statistics (per channel, [0, 1] pixel units) of torchvision and of fb.resnet.torch,
# which the paper trained with (datasets/imagenet.lua: "computed from random subset of ImageNet
# training images"); computing them over 1.28M JPEGs at each start is not worth it.
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclasses.dataclass(frozen=True)
class ImageNetData:
    """ImageNet's splits as the training loop sees them: `val` is the minival held out of train
    (it picks the best epoch), `test` the official 50k validation images (the number the paper
    reports), so a run's "test error at best validation" keeps its meaning."""

    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    image_size: int
    threads: int
    name: str = "imagenet2012"
    num_classes: int = NUM_CLASSES
    translate: int = 0  # the random-resized crop happens on the host
    flip: bool = True

    @property
    def image_shape(self) -> tuple:
        return (self.image_size, self.image_size, 3)

    def normalization(self, how: str):
        """torchvision's per-channel statistics, whatever `how` (only per-channel makes sense here)."""
        return MEAN, STD


def load(config) -> ImageNetData:
    """The splits `config.data_source` names: "tfds" (imagenet2012 from its tars), "files" (an
    ImageFolder in data_dir) or "synthetic" (`config.synthetic_images` = (train, val) generated JPEGs)."""
    if config.data_source == "tfds":
        splits = tfds_splits(config.data_dir)
    elif config.data_source == "files":
        if not config.data_dir:
            raise DataError("data_source='files' needs data_dir: the folder holding train/<wnid>/*.JPEG and "
                            "val/<wnid>/*.JPEG")
        splits = {name: image_folder(config.data_dir, name) for name in ("train", "val")}
    else:
        num_train, num_val = config.synthetic_images
        splits = {"train": synthetic("train", num_train, seed=0), "val": synthetic("val", num_val, seed=1)}
    train, minival = hold_out_minival(splits["train"])
    return ImageNetData(train, minival, splits["val"], config.image_size, config.data_threads)
