import os
import time

import numpy as np
import pytest

from sd_jax.data import cifar_svhn
from sd_jax.data.files import CIFAR_ARCHIVES, CIFAR_LAYOUTS, DataError, read_cifar, read_svhn
from tests import data_fixtures as fx


def row_set(images):
    return {img.tobytes() for img in images}


def test_digits_and_synthetic_splits_are_disjoint_and_fixed():
    from collections import Counter

    from sklearn.datasets import load_digits as sklearn_digits
    d = cifar_svhn.load_digits()
    assert (len(d.train), len(d.val), len(d.test)) == (1300, 200, 297)
    rows = lambda images, labels: Counter(zip((img.reshape(-1).tobytes() for img in images), map(int, labels)))
    raw = sklearn_digits()
    original = rows(np.round(raw.images * (255.0 / 16.0)).astype(np.uint8), raw.target)
    # The three splits partition scikit-learn's 1797 images: none in two splits, none left out.
    assert rows(d.train.images, d.train.labels) + rows(d.val.images, d.val.labels) + \
        rows(d.test.images, d.test.labels) == original
    again = cifar_svhn.load_digits()
    for split, same in zip((d.train, d.val, d.test), (again.train, again.val, again.test)):
        np.testing.assert_array_equal(split.images, same.images)
        np.testing.assert_array_equal(split.labels, same.labels)
    s = cifar_svhn.load_synthetic()
    assert (len(s.train), len(s.val), len(s.test)) == (1024, 256, 256)
    train, val, test = row_set(s.train.images), row_set(s.val.images), row_set(s.test.images)
    assert len(train) + len(val) + len(test) == 1536 and not (train & val or train & test or val & test)


def test_channel_normalisation_comes_from_the_training_split_only():
    d = cifar_svhn.load_digits()
    mean, std = d.normalization("channel_mean_std")
    assert mean.shape == std.shape == (1,)
    assert mean[0] == pytest.approx(d.train.images.astype(np.float64).mean() / 255.0, rel=1e-6)
    assert std[0] == pytest.approx(d.train.images.astype(np.float64).std() / 255.0, rel=1e-6)
    brighter = cifar_svhn.Dataset(d.name, d.train, cifar_svhn.Split(d.val.images // 2, d.val.labels),
                            cifar_svhn.Split(d.test.images * 0 + 255, d.test.labels), 10, 1, False)
    for how in cifar_svhn.NORMALIZATIONS:
        for ours, theirs in zip(brighter.normalization(how), d.normalization(how)):
            np.testing.assert_array_equal(ours, theirs)


def test_authors_normalisation_is_a_mean_image_and_one_unbiased_std():
    # CIFAR:preprocess in the authors' cifar-dataset.lua: data:mean(1) (the mean image), data:std()
    # (every value, n - 1, taken before the mean is subtracted).
    images = np.random.default_rng(0).integers(0, 256, (5000, 6, 5, 3), dtype=np.uint8)
    images[:, 0] //= 4  # a darker top row: the mean image is not flat
    mean, std = cifar_svhn.normalization_stats(images, "pixel_mean_scalar_std")
    as_float = images.astype(np.float64) / 255.0
    assert mean.shape == (6, 5, 3) and np.shape(std) == ()
    np.testing.assert_allclose(mean, as_float.mean(0), rtol=1e-6)
    assert float(std) == pytest.approx(as_float.std(ddof=1), rel=1e-6)
    assert float(mean[0].mean()) < 0.5 * float(mean[1:].mean())
    digits = cifar_svhn.load_digits()  # and on a real training split, through the Dataset
    mean, std = digits.normalization("pixel_mean_scalar_std")
    train = digits.train.images.astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, train.mean(0), rtol=1e-6, atol=1e-7)
    assert float(std) == pytest.approx(train.std(ddof=1), rel=1e-6)


def test_cifar_split_sizes_and_no_leak():
    raw = fx.cifar_arrays(10, train=5200)
    train, val, test = cifar_svhn.cifar_splits(raw)
    assert (len(train), len(val), len(test)) == (200, 5000, 100)
    assert not row_set(train.images) & row_set(val.images)
    assert row_set(train.images) | row_set(val.images) == row_set(raw["train"][0])
    train2, val2, _ = cifar_svhn.cifar_splits(raw)
    np.testing.assert_array_equal(val.images, val2.images)  # fixed shuffle


def test_svhn_validation_is_400_per_class_from_train_and_200_from_extra():
    raw = fx.svhn_arrays()
    train, val, test = cifar_svhn.svhn_splits(raw)
    assert np.bincount(val.labels, minlength=10).tolist() == [600] * 10
    from_train = row_set(val.images) & row_set(raw["train"][0])
    from_extra = row_set(val.images) & row_set(raw["extra"][0])
    assert len(from_train) == 4000 and len(from_extra) == 2000
    assert not row_set(train.images) & row_set(val.images)
    assert len(train) == 4200 + 2100 - 6000 and len(test) == 100


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("layout", ["python-folder", "binary-folder", "python-archive", "binary-archive"])
def test_cifar_files_in_every_official_layout(tmp_path, name, layout):
    classes = 10 if name == "cifar10" else 100
    arrays = fx.cifar_arrays(classes, train=600, test=50)
    kind, where = layout.split("-")
    files = fx.python_batches(name, arrays) if kind == "python" else fx.binary_batches(name, arrays)
    folder = CIFAR_LAYOUTS[name][0 if kind == "python" else 2]
    if where == "folder":
        fx.write_folder(str(tmp_path), folder, files)
    else:
        archive = CIFAR_ARCHIVES[name][0 if kind == "python" else 1]
        fx.write_archive(str(tmp_path / archive), folder, files)
    raw = read_cifar(name, str(tmp_path))
    for split in ("train", "test"):
        np.testing.assert_array_equal(raw[split][0], arrays[split][0])
        np.testing.assert_array_equal(raw[split][1], arrays[split][1])


def test_svhn_mat_files_map_label_10_to_digit_0(tmp_path):
    arrays = fx.svhn_arrays(per_class=(3, 2, 1))
    fx.write_svhn(str(tmp_path), arrays)
    raw = read_svhn(str(tmp_path))
    for split in ("train", "extra", "test"):
        np.testing.assert_array_equal(raw[split][0], arrays[split][0])
        np.testing.assert_array_equal(raw[split][1], arrays[split][1])


def expect_error(fn, *fragments):
    start = time.perf_counter()
    with pytest.raises(DataError) as error:
        fn()
    assert time.perf_counter() - start < 30
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


def test_cifar_errors_name_the_file_and_the_fix(tmp_path):
    root = str(tmp_path)
    expect_error(lambda: read_cifar("cifar10", root), "cifar-10-batches-py", "data_source='tfds'")
    arrays = fx.cifar_arrays(10, train=60, test=10)
    files = fx.python_batches("cifar10", arrays)
    fx.write_folder(root, "cifar-10-batches-py", {k: v for k, v in files.items() if k != "data_batch_3"})
    expect_error(lambda: read_cifar("cifar10", root), "data_batch_3", "incomplete")
    fx.write_folder(root, "cifar-10-batches-py", {**files, "data_batch_3": files["data_batch_3"][:100]})
    expect_error(lambda: read_cifar("cifar10", root), "data_batch_3", "not a readable")
    fx.write_folder(root, "cifar-10-batches-py", {**files, "data_batch_3": b"<html>not found</html>"})
    expect_error(lambda: read_cifar("cifar10", root), "data_batch_3")
    bad_labels = fx.cifar_arrays(10, train=60, test=10)
    bad_labels["test"][1][3] = 12
    fx.write_folder(root, "cifar-10-batches-py", fx.python_batches("cifar10", bad_labels))
    expect_error(lambda: read_cifar("cifar10", root), "test_batch", "labels must lie in [0, 10)")
    import pickle
    fx.write_folder(root, "cifar-10-batches-py", {**files, "test_batch": pickle.dumps(
        {b"data": np.zeros((10, 1000), np.uint8), b"labels": [0] * 10})})
    expect_error(lambda: read_cifar("cifar10", root), "test_batch", "(N, 3072)")


def test_binary_and_archive_errors(tmp_path):
    arrays = fx.cifar_arrays(10, train=60, test=10)
    files = fx.binary_batches("cifar10", arrays)
    fx.write_folder(str(tmp_path / "bin"), "cifar-10-batches-bin", {**files, "test_batch.bin": files["test_batch.bin"][:-5]})
    expect_error(lambda: read_cifar("cifar10", str(tmp_path / "bin")), "test_batch.bin", "truncated")
    fx.write_archive(str(tmp_path / "cifar-10-python.tar.gz"), "cifar-10-batches-py", fx.python_batches("cifar10", arrays))
    blob = (tmp_path / "cifar-10-python.tar.gz").read_bytes()
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(blob[: len(blob) // 2])
    expect_error(lambda: read_cifar("cifar10", str(tmp_path)), "cifar-10-python.tar.gz", "truncated")


def test_svhn_errors(tmp_path):
    root = str(tmp_path)
    expect_error(lambda: read_svhn(root), "train_32x32.mat", "data_source='tfds'")
    arrays = fx.svhn_arrays(per_class=(3, 2, 1))
    fx.write_svhn(root, arrays)
    with open(os.path.join(root, "extra_32x32.mat"), "r+b") as f:
        f.truncate(300)
    expect_error(lambda: read_svhn(root), "extra_32x32.mat", "not a readable")
    fx.write_svhn(root, arrays, label_offset=1)  # labels 2..11
    expect_error(lambda: read_svhn(root), "1..10")


def test_files_source_needs_a_data_dir():
    expect_error(lambda: cifar_svhn.load_dataset("cifar10", "", "files"), "data_dir")


@pytest.mark.parametrize("name,write", [
    ("cifar10", lambda root: fx.write_folder(root, "cifar-10-batches-py",
                                             fx.python_batches("cifar10", fx.cifar_arrays(10)))),
    ("cifar100", lambda root: fx.write_archive(os.path.join(root, "cifar-100-binary.tar.gz"), "cifar-100-binary",
                                               fx.binary_batches("cifar100", fx.cifar_arrays(100)))),
    ("svhn", lambda root: fx.write_svhn(root, fx.svhn_arrays())),
])
@pytest.mark.slow
def test_train_py_end_to_end_on_generated_files(tmp_path, name, write):
    import json
    import subprocess
    import sys
    from tests.conftest import ROOT
    write(str(tmp_path / "data"))
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/quickstart.py", "--workdir", str(tmp_path / "run"),
         f"--config.dataset={name}", "--config.data_source=files", f"--config.data_dir={tmp_path / 'data'}",
         "--config.depth=8", "--config.num_epochs=1", "--config.lr_boundaries=(2,)"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_completed"] == 1
    assert summary["num_params"] == (75_290 if name != "cifar100" else 75_290 + 64 * 90 + 90)
    sizes = {"cifar10": "200 train / 5000 val / 100 test", "cifar100": "200 train / 5000 val / 100 test",
             "svhn": "300 train / 6000 val / 100 test"}
    assert sizes[name] in result.stderr
