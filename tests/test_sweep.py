"""The Figure 8 sweep (`sd_jax.sweep`): runs as processes several at a time, resumable, signals
passed on, failures reported, array-job shards; tiny runs on the CPU."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sd_jax import report, sweep
from sd_jax.training import records
from tests.conftest import ROOT
from tests.test_checkpoints import without_timing

RUN = ["--config", "configs/quickstart.py", "--config.dataset=synthetic", "--config.depth=8",
       "--config.num_epochs=3", "--config.lr_boundaries=(2,)", "--config.steps_per_call=2"]
NAMES = ["linear_p0.3", "linear_p0.7", "uniform_p0.3", "uniform_p0.7"]


def sweep_command(root, *extra, p_last="0.3,0.7"):
    return [sys.executable, "-m", "sd_jax.sweep", *RUN, "--root", str(root), "--p-last", p_last,
            "--modes", "linear,uniform", *extra]


def run_sweep(root, *extra, **kwargs):
    return subprocess.run(sweep_command(root, *extra, **kwargs), cwd=ROOT, capture_output=True, text=True, timeout=900)


def assert_same_runs(root, reference, names=NAMES) -> None:
    for name in names:
        got, want = records.read_metrics(str(root / name)), records.read_metrics(str(reference / name))
        assert [line["epoch"] for line in got] == [1, 2, 3], name
        assert [without_timing(line) for line in got] == [without_timing(line) for line in want], name


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The grid one run at a time, then the same command again (every run finished: all skipped)."""
    root = tmp_path_factory.mktemp("sweep") / "sequential"
    first = run_sweep(root, "--parallel", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_sweep(root, "--parallel", "1")
    assert again.returncode == 0 and again.stderr.count("is finished; skipping it") == 4
    return root, first.stderr


@pytest.mark.slow
def test_the_sequential_sweep_reports_each_run_and_plots_figure8(sequential, tmp_path):
    root, log = sequential
    assert [f"sweep: {name} finished, test error at best validation" in log for name in NAMES] == [True] * 4
    assert "4 done, 0 to go (0 running)" in log and "3 to go (0 running), about" in log
    assert all((root / f"{name}.log").exists() for name in NAMES)
    points, missing = report.sweep_points(str(root))
    assert missing == [] and sorted(points) == ["linear", "uniform"]
    assert all([p for p, _ in series] == [0.3, 0.7] for series in points.values())
    cli = subprocess.run([sys.executable, "-m", "sd_jax.report", "--sweep", str(root), "--out", str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0 and os.path.getsize(tmp_path / "out" / "figure8.png") > 1000


@pytest.mark.slow
def test_two_at_a_time_gives_the_sequential_results(sequential, tmp_path):
    reference, _ = sequential
    result = run_sweep(tmp_path / "parallel", "--parallel", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("sweep: started") == 4 and "2 at a time on 2 cpu device(s)" in result.stderr
    assert_same_runs(tmp_path / "parallel", reference)


@pytest.mark.slow
def test_sigterm_reaches_every_run_and_the_rerun_finishes_the_grid_exactly(sequential, tmp_path):
    reference, _ = sequential
    root = tmp_path / "stopped"
    process = subprocess.Popen(sweep_command(root, "--parallel", "2"), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    first_two = [root / name / records.METRICS_FILE for name in NAMES[:2]]
    while time.time() < deadline and not all(path.exists() and path.read_text().strip() for path in first_two):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    # Runs this small may finish (or start the next) between the line seen and the signal.
    assert "passed on to 2 running runs" in stderr and "stopped after checkpointing" in stderr
    assert sum((root / name / records.SUMMARY_FILE).exists() for name in NAMES) < 4
    rerun = run_sweep(root, "--parallel", "2")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_runs(root, reference)


@pytest.mark.slow
def test_a_failing_run_leaves_the_others_finished_and_the_sweep_exits_3(sequential, tmp_path):
    reference, _ = sequential
    root = tmp_path / "failing"
    result = run_sweep(root, "--parallel", "2", p_last="0.3,1.5")  # p_L 1.5 is refused by every run of it
    assert result.returncode == 3, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")][-1]
    assert error.startswith("error: 2 of 4 runs failed: linear_p1.5 (log ") and "uniform_p1.5" in error
    assert "p_last=1.5 must lie in (0, 1]" in (root / "linear_p1.5.log").read_text()
    assert_same_runs(root, reference, ["linear_p0.3", "uniform_p0.3"])
    _, missing = report.sweep_points(str(root))
    assert missing == [("linear", 1.5), ("uniform", 1.5)]


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_cover_the_grid_exactly_once(count):
    runs = sweep.grid([0.1, 0.2, 0.5, 0.8], ["linear", "uniform"])
    shares = [sweep.shard(runs, index, count) for index in range(count)]
    assert sorted(run for share in shares for run in share) == sorted(runs) and sum(map(len, shares)) == len(runs)


def test_a_bad_shard_is_refused_with_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main([*RUN, "--root", str(tmp_path), "--shard", "3/3"])
    assert exit_info.value.code == 2 and "--shard I/N needs 0 <= I < N, got 3/3" in capsys.readouterr().err


def test_each_run_is_pinned_to_its_device():
    gpu = sweep.device_env("gpu", "3", 7, 2)
    assert gpu == {"CUDA_VISIBLE_DEVICES": "3", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.375"}
    tpu = sweep.device_env("tpu", "1", 1, 1)
    assert tpu["TPU_VISIBLE_CHIPS"] == "1" and tpu["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,1,1"
    assert tpu["TPU_MESH_CONTROLLER_PORT"] != sweep.device_env("tpu", "0", 0, 1)["TPU_MESH_CONTROLLER_PORT"]
    assert sweep.device_env("cpu", "cpu", 0, 1)["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=1")
    assert json.dumps(gpu)  # plain strings, as an environment needs
