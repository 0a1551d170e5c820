"""Small datasets written in the official file formats, for the data tests."""
import io
import os
import pickle
import tarfile

import numpy as np


def unique_images(n, seed):
    """n distinct 32x32x3 uint8 images: the index is written into the first pixels."""
    images = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 0, 1] = (np.arange(n) // 256) % 256
    images[:, 0, 0, 2] = np.arange(n) // 65536
    return images


def cifar_arrays(num_classes, train=5200, test=100, seed=0):
    rng = np.random.default_rng(seed)
    return {"train": (unique_images(train, seed), rng.integers(0, num_classes, train)),
            "test": (unique_images(test, seed + 1), rng.integers(0, num_classes, test))}


def _chunks(images, labels, parts):
    return list(zip(np.array_split(images, parts), np.array_split(labels, parts)))


def _members(name, arrays, pack, suffix=""):
    """{member name: pack(images, labels)} in the official layout: five training batches and a test
    batch for CIFAR-10, one train and one test file for CIFAR-100."""
    if name == "cifar10":
        files = {f"data_batch_{i + 1}{suffix}": pack(x, y) for i, (x, y) in enumerate(_chunks(*arrays["train"], 5))}
        files[f"test_batch{suffix}"] = pack(*arrays["test"])
        return files
    return {f"train{suffix}": pack(*arrays["train"]), f"test{suffix}": pack(*arrays["test"])}


def python_batches(name, arrays):
    """{member name: pickled bytes} of the CIFAR python version."""
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    pack = lambda x, y: pickle.dumps({b"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1),
                                      label_key: [int(v) for v in y], b"coarse_labels": [0] * len(y)})
    return _members(name, arrays, pack)


def binary_batches(name, arrays):
    """{member name: bytes} of the CIFAR binary version (label byte(s), then 3072 pixel bytes)."""
    def pack(x, y):
        labels = [y[:, None]] if name == "cifar10" else [np.zeros((len(y), 1), np.int64), y[:, None]]
        return np.concatenate([*(l.astype(np.uint8) for l in labels),
                               x.transpose(0, 3, 1, 2).reshape(len(x), -1)], axis=1).tobytes()
    return _members(name, arrays, pack, suffix=".bin")


def write_folder(root, folder, files):
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    for member, data in files.items():
        with open(os.path.join(root, folder, member), "wb") as f:
            f.write(data)


def write_archive(path, folder, files):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for member, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def svhn_arrays(per_class=(420, 210, 10), seed=0):
    """train / extra / test with a known number per class (labels 0..9)."""
    out = {}
    for i, (split, count) in enumerate(zip(("train", "extra", "test"), per_class)):
        labels = np.random.default_rng(seed + i).permutation(np.repeat(np.arange(10), count))
        out[split] = (unique_images(len(labels), seed + 10 * i), labels)
    return out


def write_svhn(root, arrays, label_offset=0):
    from scipy.io import savemat
    os.makedirs(root, exist_ok=True)
    for split, (images, labels) in arrays.items():
        y = np.where(labels == 0, 10, labels) + label_offset  # the .mat files write digit 0 as 10
        savemat(os.path.join(root, f"{split}_32x32.mat"),
                {"X": images.transpose(1, 2, 3, 0), "y": y.reshape(-1, 1).astype(np.uint8)})
