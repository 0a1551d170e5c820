"""Data-parallel training on 1, 2 and 4 (forced host) devices."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, forced_host_devices_env

pytestmark = pytest.mark.slow  # the quick subset (README) leaves these to the full run


UNEVEN = {"batch_size": 96, "num_epochs": 2}  # the authors' convention trains the partial batch
# name: (devices, task, config overrides). One worker process per device count runs its jobs in
# this order; the one-device process comes after the two-device one, whose checkpoint it resumes.
JOBS = {
    "two": (2, "train", {}),
    "gates_shared": (2, "gates", {"depth": 8}),
    "gates_per_device": (2, "gates", {"depth": 8, "drop_gates": "per_device"}),
    "conditionals_per_device": (2, "conditionals", {"depth": 8, "drop_gates": "per_device"}),
    "sample_mode": (2, "train", {"drop_mode": "sample", "num_epochs": 1}),
    "two_then_one": (2, "train", {"num_epochs": 2}),
    "four": (4, "train", {}),
    "uneven_four": (4, "train", UNEVEN),
    "one": (1, "train", {}),
    "uneven_one": (1, "train", UNEVEN),
    "resumed_on_one": (1, "train", {}),  # in two_then_one's workdir: its third epoch
}


def run_jobs(devices, jobs):
    """`jobs` ([task, workdir, overrides] each) run in order by one worker process with `devices` devices: their results."""
    result = subprocess.run([sys.executable, "tests/parallel_worker.py", json.dumps(jobs)], cwd=ROOT,
                            env=forced_host_devices_env(devices), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every job in JOBS: name -> (workdir, result)."""
    root = tmp_path_factory.mktemp("parallel")
    workdirs = {name: str(root / name) for name in JOBS}
    workdirs["resumed_on_one"] = workdirs["two_then_one"]
    results = {}
    for devices in dict.fromkeys(count for count, _, _ in JOBS.values()):  # 2, 4, 1: JOBS's order
        names = [name for name, (count, _, _) in JOBS.items() if count == devices]
        jobs = [[JOBS[name][1], workdirs[name], JOBS[name][2]] for name in names]
        results.update(zip(names, run_jobs(devices, jobs)))
    return {name: (workdirs[name], results[name]) for name in JOBS}


def params(workdir):
    with np.load(os.path.join(workdir, "params.npz")) as f:
        return {k: f[k] for k in f.files}


def assert_same_training(reference_run, other_run):
    """The same gates each epoch, the loss and final parameters up to float summation order."""
    (one_dir, one), (other_dir, other) = reference_run, other_run
    for a, b in zip(one["metrics"], other["metrics"]):
        assert a["mean_active_blocks"] == b["mean_active_blocks"]  # the same gates
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=2e-3)
    reference, got = params(one_dir), params(other_dir)
    for key in reference:
        np.testing.assert_allclose(got[key], reference[key], rtol=2e-2, atol=2e-3, err_msg=key)


@pytest.mark.parametrize("name,devices", [("two", 2), ("four", 4)])
def test_shared_gates_match_single_device(runs, name, devices):
    assert runs[name][1]["devices"] == devices and runs["one"][1]["devices"] == 1
    assert_same_training(runs["one"], runs[name])


def test_partial_last_batch_shared_unevenly_matches_single_device(runs):
    # 1024 images in batches of 96: each epoch ends with a batch of 64 real images, which four
    # devices hold as 24, 24, 16 and 0. Loss and BatchNorm statistics must count each real image once.
    assert [l["step"] for l in runs["uneven_four"][1]["metrics"]] == [11, 22]
    assert_same_training(runs["uneven_one"], runs["uneven_four"])


def test_per_device_gates_differ_and_still_skip_compute(runs):
    shared = runs["gates_shared"][1]["gates"]
    assert all(step[0] == step[1] for step in shared)
    per_device = runs["gates_per_device"][1]["gates"]
    assert any(step[0] != step[1] for step in per_device)
    counts = runs["conditionals_per_device"][1]
    assert counts["conditionals"] == 2 * counts["blocks"]  # a cond per block, forward and backward


def test_sample_mode_runs_on_two_devices(runs):
    assert 0 < runs["sample_mode"][1]["metrics"][0]["mean_active_blocks"] < 3


def test_two_device_checkpoint_resumes_on_one_device(runs):
    assert [l["epoch"] for l in runs["two_then_one"][1]["metrics"]] == [1, 2]
    assert [l["epoch"] for l in runs["resumed_on_one"][1]["metrics"]] == [1, 2, 3]
    assert_same_training(runs["one"], runs["resumed_on_one"])


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--config", "configs/quickstart.py", "--workdir",
                             str(tmp_path / "run"), "--config.batch_size=130"], cwd=ROOT,
                            env=forced_host_devices_env(4), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "batch_size=130 is not divisible by the 4 devices" in result.stderr
    assert not (tmp_path / "run").exists()
