"""Readers for the official dataset files, with no TensorFlow: CIFAR python pickles (the folders
torchvision downloads), the CIFAR binary format (folders or .tar.gz archives) and SVHN .mat files.

Each reader returns {split name: (uint8 NHWC images, int64 labels)} and raises DataError naming the
file and the fix for anything missing, truncated, foreign or out of range.
"""
import io
import os
import pickle
import tarfile

import numpy as np

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/ (format 2, the *_32x32.mat files)"


class DataError(RuntimeError):
    """A dataset cannot be read; the message names the file and says how to supply it."""


# name -> (python folder, python members per split, binary folder, binary members per split,
#          label bytes before each binary record, index of the label to use, number of classes)
CIFAR_LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                "cifar-10-batches-bin", {"train": [f"data_batch_{i}.bin" for i in range(1, 6)],
                                         "test": ["test_batch.bin"]}, 1, 0, 10, b"labels"),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]},
                 "cifar-100-binary", {"train": ["train.bin"], "test": ["test.bin"]}, 2, 1, 100, b"fine_labels"),
}
CIFAR_ARCHIVES = {"cifar10": ("cifar-10-python.tar.gz", "cifar-10-binary.tar.gz"),
                  "cifar100": ("cifar-100-python.tar.gz", "cifar-100-binary.tar.gz")}


def check_arrays(images, labels, num_classes, source):
    """(images, int64 labels), or DataError unless these are 32x32x3 images with labels in range."""
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or len(images) != len(labels):
        raise DataError(f"{source}: expected 32x32x3 images with one label each, got images {images.shape} "
                        f"and {len(labels)} labels; the file is not in the official format")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{source}: labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    return images, labels.astype(np.int64)


def _unpickle(data: bytes, source: str):
    try:
        batch = pickle.loads(data, encoding="bytes")
    except Exception as e:  # truncated or foreign files raise many types
        raise DataError(f"{source} is not a readable CIFAR python batch ({type(e).__name__}: {e}); "
                        f"download it again from {CIFAR_URL}") from None
    if not isinstance(batch, dict) or b"data" not in batch:
        raise DataError(f"{source} is a pickle but not a CIFAR batch (no b'data' entry)")
    return batch


def _python_batch(data: bytes, source: str, label_key: bytes, num_classes: int):
    batch = _unpickle(data, source)
    if label_key not in batch:
        raise DataError(f"{source} has no {label_key!r} entry: is it a batch of another CIFAR version?")
    flat = np.asarray(batch[b"data"], np.uint8)
    if flat.ndim != 2 or flat.shape[1] != 3072:
        raise DataError(f"{source}: expected data of shape (N, 3072), got {flat.shape}")
    images = flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return check_arrays(images, np.asarray(batch[label_key], np.int64), num_classes, source)


def _binary_batch(data: bytes, source: str, label_bytes: int, label_index: int, num_classes: int):
    record = label_bytes + 3072
    if len(data) == 0 or len(data) % record:
        raise DataError(f"{source}: {len(data)} bytes is not a whole number of {record}-byte CIFAR records; "
                        f"the file is truncated or foreign, download it again from {CIFAR_URL}")
    rows = np.frombuffer(data, np.uint8).reshape(-1, record)
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return check_arrays(images, rows[:, label_index].astype(np.int64), num_classes, source)


def _concat(parts):
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def read_cifar(name: str, data_dir: str):
    """CIFAR-10/100 from `data_dir`: the python folder, the binary folder, or either .tar.gz archive."""
    py_dir, py_members, bin_dir, bin_members, label_bytes, label_index, classes, label_key = CIFAR_LAYOUTS[name]
    python = lambda data, src: _python_batch(data, src, label_key, classes)
    binary = lambda data, src: _binary_batch(data, src, label_bytes, label_index, classes)
    for folder, members, parse in ((py_dir, py_members, python), (bin_dir, bin_members, binary)):
        root = os.path.join(data_dir, folder)
        if os.path.isdir(root):
            out = {}
            for split, names in members.items():
                missing = [n for n in names if not os.path.isfile(os.path.join(root, n))]
                if missing:
                    raise DataError(f"{root} lacks {missing}: the folder is incomplete; download it again "
                                    f"from {CIFAR_URL}")
                out[split] = _concat([parse(_read(os.path.join(root, n)), os.path.join(root, n)) for n in names])
            return out
    for archive, (folder, members, parse) in zip(CIFAR_ARCHIVES[name],
                                                 ((py_dir, py_members, python), (bin_dir, bin_members, binary))):
        path = os.path.join(data_dir, archive)
        if os.path.isfile(path):
            return _read_cifar_archive(path, folder, members, parse)
    raise DataError(f"no {name} files in {data_dir!r}: expected the folder {py_dir}/ (what torchvision "
                    f"downloads), {bin_dir}/, or {' or '.join(CIFAR_ARCHIVES[name])}, from {CIFAR_URL}. "
                    "Or use data_source='tfds' on a machine with internet")


def _read_cifar_archive(path, folder, members, parse):
    try:
        with tarfile.open(path, "r:gz") as tar:
            out = {}
            for split, names in members.items():
                parts = []
                for n in names:
                    try:
                        member = tar.extractfile(f"{folder}/{n}")
                    except KeyError:
                        raise DataError(f"{path} has no member {folder}/{n}: not the official archive") from None
                    parts.append(parse(member.read(), f"{path}:{folder}/{n}"))
                out[split] = _concat(parts)
            return out
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path} is not a readable .tar.gz ({type(e).__name__}: {e}); it is truncated or "
                        f"foreign, download it again from {CIFAR_URL}") from None


SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}


def read_svhn(data_dir: str):
    """SVHN format 2 (.mat, X of shape 32x32x3xN, labels 1..10 with 10 meaning digit 0)."""
    from scipy.io import loadmat

    out = {}
    for split, name in SVHN_FILES.items():
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            raise DataError(f"{path} not found: SVHN needs {sorted(SVHN_FILES.values())} in data_dir, from "
                            f"{SVHN_URL}. Or use data_source='tfds' on a machine with internet")
        try:
            mat = loadmat(io.BytesIO(_read(path)))
        except Exception as e:  # scipy raises ValueError, TypeError, ... for truncated or foreign files
            raise DataError(f"{path} is not a readable SVHN .mat file ({type(e).__name__}: {e}); "
                            f"download it again from {SVHN_URL}") from None
        if "X" not in mat or "y" not in mat:
            raise DataError(f"{path} has no 'X'/'y' arrays: not an SVHN format-2 file")
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
        if x.ndim != 4 or x.dtype != np.uint8:
            raise DataError(f"{path}: expected uint8 X of shape (32, 32, 3, N), got {x.dtype} {x.shape}")
        if len(y) and (y.min() < 1 or y.max() > 10):
            raise DataError(f"{path}: SVHN labels must lie in 1..10, found {y.min()}..{y.max()}")
        out[split] = check_arrays(np.ascontiguousarray(x.transpose(3, 0, 1, 2)), y % 10, 10, path)
    return out
