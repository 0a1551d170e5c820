"""Multi-process training, proven on this machine: two train.py processes joined by
jax.distributed (localhost coordinator, CPU collectives over gloo), one CPU device each."""
import os
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from sd_jax.training import checkpoints, records
from sd_jax.training.experiment import make_experiment
from sd_jax.training.loop import train_and_evaluate
from sd_jax.training.workdir_hold import WorkdirHold
from tests.conftest import ROOT
from tests.test_checkpoints import wait_for_metrics, without_timing
from tests.test_training import tiny_config

pytestmark = pytest.mark.slow  # the quick subset (README) leaves these to the full run

SETTINGS = dict(num_epochs=10)  # long enough for a stop signal to act
OVERRIDES = ["--config.dataset=synthetic", "--config.depth=8", "--config.num_epochs=10", "--config.lr_boundaries=(2,)",
             "--config.steps_per_call=3", "--config.eval_batch_size=100"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pair(workdir, overrides=OVERRIDES):
    """Two train.py processes of one job, as a user starts them on two hosts."""
    port = free_port()
    processes = []
    for index in range(2):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(index), "XLA_FLAGS": ""}
        processes.append(subprocess.Popen(
            [sys.executable, "train.py", "--config", "quickstart", *overrides, "--workdir", str(workdir)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return processes


def finish(processes):
    results = [p.communicate(timeout=600) for p in processes]
    for p, (_, err) in zip(processes, results):
        assert p.returncode == 0, err[-3000:]
    return [err for _, err in results]


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pair") / "run"
    return workdir, finish(start_pair(workdir))


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("single") / "run")
    train_and_evaluate(tiny_config(**SETTINGS), workdir)
    return workdir


def test_two_processes_train_as_one(pair_run, single_run):
    workdir, (primary_log, other_log) = pair_run
    single = single_run
    got, want = records.read_metrics(str(workdir)), records.read_metrics(single)
    assert [line["step"] for line in got] == [line["step"] for line in want] == [8 * epoch for epoch in range(1, 11)]  # one writer
    for a, b in zip(got, want):  # the same run up to float summation order across the two devices
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert abs(a["val_error"] - b["val_error"]) <= 100 / 256 and abs(a["test_error"] - b["test_error"]) <= 100 / 256
    summary = records.read_json(str(workdir), records.SUMMARY_FILE)
    assert (summary["provenance"]["process_count"], summary["provenance"]["device_count"]) == (2, 2)
    assert "epoch 10/10" in primary_log and "epoch 10/10" not in other_log  # only process 0 logs progress


def test_checkpoint_of_two_processes_restores_in_one(pair_run, single_run):
    workdir, _ = pair_run
    single = single_run
    experiment = make_experiment(tiny_config(**SETTINGS))
    restored = {}
    for name, path in (("pair", str(workdir)), ("single", single)):
        ckpts = checkpoints.Checkpoints(path)
        state, meta = ckpts.restore(experiment.state)
        ckpts.close()
        assert meta["step"] == int(state.step) == 80
        restored[name] = jax.device_get(state.params)
    for a, b in zip(jax.tree.leaves(restored["pair"]), jax.tree.leaves(restored["single"])):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4)


def test_sigkill_of_one_process_then_restart_of_both_resumes_exactly(pair_run, tmp_path):
    reference, _ = pair_run
    workdir = tmp_path / "killed"
    first, second = start_pair(workdir)
    wait_for_metrics(workdir, 2, first)
    assert first.poll() is None and second.poll() is None, "the job ended before it could be killed"
    second.send_signal(signal.SIGKILL)  # one host dies; its peer then stalls in a collective and is stopped
    first.send_signal(signal.SIGKILL)
    for p in (first, second):
        p.communicate()
    assert not (workdir / records.SUMMARY_FILE).exists()
    primary_log, _ = finish(start_pair(workdir))
    assert "resuming from the checkpoint of epoch" in primary_log
    got, want = records.read_metrics(str(workdir)), records.read_metrics(str(reference))
    assert [without_timing(line) for line in got] == [without_timing(line) for line in want]
    assert (without_timing(records.read_json(str(workdir), records.SUMMARY_FILE))
            == without_timing(records.read_json(str(reference), records.SUMMARY_FILE)))


@pytest.fixture(scope="module")
def quickstart_pair(tmp_path_factory):
    """The quickstart config itself as two processes, uninterrupted (its 10 steps per call, 30 epochs)."""
    workdir = tmp_path_factory.mktemp("quickstart_pair") / "run"
    finish(start_pair(workdir, overrides=[]))
    return workdir


def test_sigterm_to_either_process_stops_both_within_two_calls_and_the_reruns_resume_exactly(quickstart_pair, tmp_path):
    """A preemption notice that reaches one host stops the whole job within two training calls, each
    process checkpoints that step and exits 143; starting both again resumes. Here: SIGTERM to
    process 1 after the second metrics line, then to process 0 in the rerun after the fifth, then a
    rerun to the end, whose files equal the uninterrupted pair's."""
    workdir = tmp_path / "stopped"
    steps_per_epoch = records.read_metrics(str(quickstart_pair))[0]["step"]  # epoch 1's line
    steps_per_call = 10  # configs/quickstart.py: each epoch of 11 steps is a call of 10 and one of 1
    resumed_from = None
    for target, lines in ((1, 2), (0, 5)):
        processes = start_pair(workdir, overrides=[])
        wait_for_metrics(workdir, lines, processes[0])
        assert all(p.poll() is None for p in processes), "the job ended before it could be stopped"
        processes[target].send_signal(signal.SIGTERM)
        # The step at the signal: at most the end of the epoch after the last line written by then.
        reached = (len(records.read_metrics(str(workdir))) + 1) * steps_per_epoch
        logs = [p.communicate(timeout=300)[1] for p in processes]
        if resumed_from is not None:
            assert f"(step {resumed_from})" in logs[0]
        assert [p.returncode for p in processes] == [128 + signal.SIGTERM] * 2, logs[0][-2000:] + logs[1][-2000:]
        (step,) = {int(re.search(r"stopped by SIGTERM at step (\d+)", log).group(1)) for log in logs}
        assert step <= reached + 2 * steps_per_call, f"stopped at step {step}, the signal came at step {reached} or before"
        assert not (workdir / records.SUMMARY_FILE).exists()
        resumed_from = step
    primary_log, _ = finish(start_pair(workdir, overrides=[]))
    assert f"(step {resumed_from})" in primary_log
    got, want = records.read_metrics(str(workdir)), records.read_metrics(str(quickstart_pair))
    assert [without_timing(line) for line in got] == [without_timing(line) for line in want]
    assert (without_timing(records.read_json(str(workdir), records.SUMMARY_FILE))
            == without_timing(records.read_json(str(quickstart_pair), records.SUMMARY_FILE)))


def test_a_second_job_on_a_held_workdir_is_refused_in_every_process(tmp_path):
    """Process 0 takes the job's hold on the workdir; when another run holds it, every process of
    the job stops with exit 2 before writing anything."""
    workdir = tmp_path / "held"
    hold = WorkdirHold(str(workdir))
    hold.take()
    try:
        processes = start_pair(workdir)
        logs = [p.communicate(timeout=300)[1] for p in processes]
    finally:
        hold.release()
    assert [p.returncode for p in processes] == [2, 2], logs[0][-2000:] + logs[1][-2000:]
    assert f"is in use by process {os.getpid()}" in logs[0]
    assert "is in use by another run (process 0 says which)" in logs[1]
    assert sorted(os.listdir(workdir)) == []
