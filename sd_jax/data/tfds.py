"""tensorflow-datasets loading: download and prepare once, read each split into numpy.

TensorFlow only prepares and reads the data here; it is kept off the accelerators (CPU build, GPUs
hidden), and imported only when a tfds dataset is asked for.
"""
import socket

import numpy as np

from sd_jax.data.files import CIFAR_URL, SVHN_URL, DataError

TFDS_NAMES = {"cifar10": "cifar10", "cifar100": "cifar100", "svhn": "svhn_cropped"}
DOWNLOAD_HOSTS = {"cifar10": ("www.cs.toronto.edu", CIFAR_URL), "cifar100": ("www.cs.toronto.edu", CIFAR_URL),
                  "svhn": ("ufldl.stanford.edu", SVHN_URL)}


def can_reach(host: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to host:443 opens within the timeout (tfds itself retries for minutes)."""
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def import_tfds():
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"data_source='tfds' needs tensorflow-cpu and tensorflow-datasets ({e}); "
                        "pip install tensorflow-cpu tensorflow-datasets, or use data_source='files'") from None
    tf.config.set_visible_devices([], "GPU")  # TensorFlow must not take accelerator memory
    return tfds


def read_tfds(name: str, data_dir: str, splits):
    """{split: (uint8 NHWC images, int64 labels)} for the tfds version of `name`.

    Reads what tfds has prepared; if nothing is, downloads and prepares it first, failing within
    seconds (not tfds's minutes of retries) when the download host cannot be reached.
    """
    tfds = import_tfds()
    builder = tfds.builder(TFDS_NAMES[name], data_dir=data_dir or None)
    try:
        return _read_splits(tfds, builder, splits)
    except Exception:
        if builder.is_prepared():
            raise
    host, url = DOWNLOAD_HOSTS[name]
    if not can_reach(host):
        raise DataError(
            f"{name} is not prepared in {builder.data_dir!r} and {host} cannot be reached, so tfds cannot "
            f"download it. Either run once on a machine with internet (same data_dir), or put the official "
            f"files from {url} in data_dir and set data_source='files', or place the downloaded archives in "
            "tfds's manual dir (<data_dir>/downloads/manual)")
    builder.download_and_prepare()
    return _read_splits(tfds, builder, splits)


def _read_splits(tfds, builder, splits):
    # Iterate in batches: as_dataset(batch_size=-1) aborts the process under tfds.testing.mock_data.
    out = {}
    for split in splits:
        images, labels = [], []
        for batch in tfds.as_numpy(builder.as_dataset(split=split, as_supervised=True).batch(4096)):
            images.append(batch[0])
            labels.append(batch[1])
        out[split] = (np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.int64))
    return out
