"""The tensorflow-datasets path, on tfds.testing.mock_data (no download here or in CI)."""
import os
import time

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets is not installed")

from sd_jax.data import cifar_svhn  # noqa: E402
from sd_jax.data.files import DataError  # noqa: E402
from sd_jax.data.tfds import DOWNLOAD_HOSTS, can_reach  # noqa: E402

offline = pytest.mark.skipif(can_reach(DOWNLOAD_HOSTS["cifar10"][0]),
                             reason="this machine reaches the download host: the offline path cannot be tested")


def cache_files(data_dir):
    folder = os.path.join(data_dir, "sd_jax_cache")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.mark.slow
def test_cifar10_through_tfds_is_split_checked_and_cached(tmp_path):
    data_dir = str(tmp_path)
    with tfds.testing.mock_data(num_examples=5200):
        first = cifar_svhn.load_dataset("cifar10", data_dir, "tfds")
    assert (len(first.train), len(first.val), len(first.test)) == (200, 5000, 5200)
    assert first.train.images.dtype == np.uint8 and first.train.images.shape[1:] == (32, 32, 3)
    assert 0 <= first.train.labels.min() and first.train.labels.max() < 10
    assert cache_files(data_dir) == ["cifar10.npz"]  # and no half-written temporary file
    again = cifar_svhn.load_dataset("cifar10", data_dir, "tfds")  # outside the mock: served by the cache
    np.testing.assert_array_equal(again.val.images, first.val.images)
    np.testing.assert_array_equal(again.test.labels, first.test.labels)


@pytest.mark.slow
def test_svhn_through_tfds_uses_train_and_extra(tmp_path):
    with tfds.testing.mock_data(num_examples=5000):
        svhn = cifar_svhn.load_dataset("svhn", str(tmp_path), "tfds")
    assert np.bincount(svhn.val.labels, minlength=10).tolist() == [600] * 10
    assert len(svhn.train) == 2 * 5000 - 6000 and len(svhn.test) == 5000
    assert (svhn.translate, svhn.flip) == (0, False)


@offline
def test_offline_without_prepared_data_fails_fast_and_says_how_to_fix(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DataError) as error:
        cifar_svhn.load_dataset("cifar100", str(tmp_path), "tfds")
    assert time.perf_counter() - start < 60
    message = str(error.value)
    assert "cannot be reached" in message and "data_source='files'" in message and "manual" in message
    assert cache_files(str(tmp_path)) == []


@pytest.mark.slow
@offline
def test_damaged_cache_is_not_trusted(tmp_path):
    data_dir = str(tmp_path)
    with tfds.testing.mock_data(num_examples=5100):
        cifar_svhn.load_dataset("cifar10", data_dir, "tfds")
    cache = os.path.join(data_dir, "sd_jax_cache", "cifar10.npz")
    with open(cache, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match="cannot be reached"):  # re-reads through tfds, which is offline
        cifar_svhn.load_dataset("cifar10", data_dir, "tfds")
    with tfds.testing.mock_data(num_examples=5100):
        assert len(cifar_svhn.load_dataset("cifar10", data_dir, "tfds").val) == 5000


@pytest.mark.slow
@offline
def test_following_the_offline_advice_in_the_same_workdir_works(tmp_path):
    """The paper config offline exits 2 and writes nothing, so the advised data_source='files' run
    can use the same --workdir without --restart."""
    import subprocess
    import sys

    from tests import data_fixtures as fx
    from tests.conftest import ROOT
    data_dir, workdir = tmp_path / "data", tmp_path / "run"
    small = ["--config.depth=8", "--config.num_epochs=1", "--config.lr_boundaries=(2,)", f"--config.data_dir={data_dir}"]
    command = [sys.executable, "train.py", "--config", "configs/cifar10_resnet110_sd.py", "--workdir",
               str(workdir), *small]
    offline_run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert offline_run.returncode == 2 and "data_source='files'" in offline_run.stderr, offline_run.stderr[-2000:]
    assert not workdir.exists()
    fx.write_folder(str(data_dir), "cifar-10-batches-py", fx.python_batches("cifar10", fx.cifar_arrays(10)))
    advised = subprocess.run(command + ["--config.data_source=files"], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert advised.returncode == 0, advised.stderr[-3000:]
    assert len(cifar_svhn.load_dataset("cifar10", str(data_dir), "files").train) == 200
