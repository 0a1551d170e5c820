import gzip
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax import evaluate

from sd_jax.training import checkpoints, records, workdir_hold
from sd_jax.training import steps as training_steps
from sd_jax.training.experiment import make_experiment
from sd_jax.training.loop import TrainingDiverged, train_and_evaluate
from tests.conftest import ROOT
from tests.test_training import tiny_config

TIMING = {"epoch_time_s", "images_per_s", "train_time_s", "wall_time_s", "compile_s", "startup_s"}
ARGS = ["--config", "configs/quickstart.py", "--config.dataset=synthetic", "--config.depth=8",
        "--config.num_epochs=8", "--config.lr_boundaries=(6,)", "--config.steps_per_call=2"]


def without_timing(record):
    return {k: v for k, v in record.items() if k not in TIMING}


def wait_for_metrics(workdir, count: int, process, timeout: float = 300) -> None:
    """Return once metrics.jsonl in `workdir` has `count` lines, `process` has ended, or `timeout` passed."""
    metrics = workdir / records.METRICS_FILE
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= count:
            return
        time.sleep(0.02)


def train_command(workdir, *extra):
    return [sys.executable, "train.py", *ARGS, "--workdir", str(workdir), *extra]


def read_events(workdir) -> dict:
    """{tag: [(step, value), ...]} of the TensorBoard event files in `workdir`, read from the TFRecord
    framing (length, its CRC, the Event proto, its CRC) with no TensorBoard code."""
    from tensorboardX.proto import event_pb2

    scalars, texts = {}, {}
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        data, position = path.read_bytes(), 0
        while position < len(data):
            (length,) = struct.unpack("<Q", data[position:position + 8])
            event = event_pb2.Event.FromString(data[position + 12:position + 12 + length])
            position += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
                elif value.tensor.string_val:
                    texts[value.tag] = value.tensor.string_val[0].decode()
    return scalars, texts


def assert_events_match_metrics(workdir) -> None:
    """Every number of every metrics.jsonl line is in TensorBoard once, at its step (as float32, the event format's scalar)."""
    scalars, texts = read_events(workdir)
    lines = records.read_metrics(str(workdir))
    expected = {}
    for line in lines:
        for key, value in line.items():
            if key != "step":
                expected.setdefault(key, []).append((line["step"], float(np.float32(value))))
    assert scalars == expected
    assert json.loads(texts["config/text_summary"].strip("`\n")) == records.read_json(str(workdir), records.CONFIG_FILE)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The run the interrupted ones must reproduce, never stopped."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    reference = subprocess.run(train_command(workdir), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    return workdir


def assert_same_run(workdir, reference) -> None:
    got, want = records.read_metrics(str(workdir)), records.read_metrics(str(reference))
    assert [line["epoch"] for line in got] == list(range(1, 9))
    assert [without_timing(line) for line in got] == [without_timing(line) for line in want]
    assert (without_timing(records.read_json(str(workdir), records.SUMMARY_FILE))
            == without_timing(records.read_json(str(reference), records.SUMMARY_FILE)))


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(tmp_path, reference_run):
    workdir = tmp_path / "killed"
    process = subprocess.Popen(train_command(workdir), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    metrics = workdir / records.METRICS_FILE
    wait_for_metrics(workdir, 3, process)
    time.sleep(0.15)  # land somewhere inside a later epoch
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = len(metrics.read_text().splitlines())
    assert killed_at < 8 and not (workdir / records.SUMMARY_FILE).exists()
    assert (workdir / workdir_hold.LOCK_FILE).exists()  # the killed run's hold, freed by its dead pid
    with open(metrics, "a") as f:  # what a crash in the middle of an append leaves
        f.write('{"epoch": 9, "step": 7')

    resumed = subprocess.run(train_command(workdir), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from the checkpoint of epoch" in resumed.stderr
    assert f"process {process.pid} no longer exists" in resumed.stderr
    assert f"dropping its unfinished last line {killed_at + 1}" in resumed.stderr
    assert not (workdir / workdir_hold.LOCK_FILE).exists()  # released at the end
    assert_same_run(workdir, reference_run)
    assert_events_match_metrics(workdir)


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_reached_and_the_rerun_resumes_exactly(tmp_path, reference_run):
    """SIGTERM inside an epoch: the call in flight finishes, that step is checkpointed (with the
    interval's training sums) and the run exits 143; the same command resumes it to the identical
    metrics, summary and TensorBoard points."""
    workdir = tmp_path / "stopped"
    process = subprocess.Popen(train_command(workdir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    wait_for_metrics(workdir, 3, process)
    time.sleep(0.15)
    assert process.poll() is None, "the run finished before it could be stopped"
    signalled_after = len(records.read_metrics(str(workdir)))
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    stopped_at = int(re.search(r"checkpointed step (\d+)", stderr).group(1))
    ckpts = checkpoints.Checkpoints(str(workdir))
    assert ckpts.steps()[-1] == stopped_at
    meta = ckpts.manager.metrics(stopped_at)
    ckpts.close()
    lines = records.read_metrics(str(workdir))
    assert len(lines) in (signalled_after, signalled_after + 1)  # the call in flight may end an epoch
    assert lines[-1]["step"] <= stopped_at and meta["step"] == stopped_at
    if lines[-1]["step"] < stopped_at:  # stopped inside an epoch: its sums so far travel with the checkpoint
        assert meta["partial"]["totals"]["steps"] == stopped_at - lines[-1]["step"]

    resumed = subprocess.run(train_command(workdir), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {stopped_at})" in resumed.stderr
    assert_same_run(workdir, reference_run)
    assert_events_match_metrics(workdir)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    train_and_evaluate(tiny_config(num_epochs=4), workdir)
    return workdir


def test_a_malformed_metrics_line_before_the_last_stops_the_resume_naming_it(tmp_path, finished_run):
    workdir = tmp_path / "copy"
    shutil.copytree(finished_run, workdir)
    lines = (workdir / records.METRICS_FILE).read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"
    (workdir / records.METRICS_FILE).write_text("".join(lines))
    with pytest.raises(records.WorkdirError, match=r"metrics.jsonl, line 2, is not a metrics line .*Repair or delete"):
        train_and_evaluate(tiny_config(num_epochs=4), str(workdir))
    assert (workdir / records.METRICS_FILE).read_text() == "".join(lines)  # left for the user to repair


def test_keeps_last_two_and_best(finished_run):
    ckpts = checkpoints.Checkpoints(finished_run)
    lines = records.read_metrics(finished_run)
    best = min(lines, key=lambda l: (l["val_error"], -l["epoch"]))["step"]
    assert ckpts.steps(checkpoints.LATEST) == sorted({3 * 8, 4 * 8, best})  # 1024 synthetic images, batch 128
    assert ckpts.steps(checkpoints.BEST) == [best]
    assert sorted(int(name) for name in os.listdir(os.path.join(finished_run, "checkpoints")) if name.isdigit()) == \
        sorted({3 * 8, 4 * 8, best})
    ckpts.close()


@pytest.mark.parametrize("which", [checkpoints.LATEST, checkpoints.BEST])
def test_evaluate_cli_agrees_with_recorded_metrics(finished_run, which, capsys):
    in_flight = os.path.join(finished_run, "checkpoints", "99.orbax-checkpoint-tmp")  # a training run's save
    os.makedirs(os.path.join(in_flight, "state.orbax-checkpoint-tmp"))
    result = evaluate.main(["--workdir", finished_run, "--checkpoint", which])
    assert os.path.isdir(in_flight)  # evaluating a run that trains deletes nothing of it
    shutil.rmtree(in_flight)
    assert json.loads(capsys.readouterr().out) == result
    line = next(l for l in records.read_metrics(finished_run) if l["epoch"] == result["epoch"])
    assert result["val_error"] == line["val_error"]
    assert result["test_error"] == line["test_error"]
    if which == checkpoints.BEST:
        assert result["epoch"] == records.read_json(finished_run, records.SUMMARY_FILE)["best_val_epoch"]


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    config = tiny_config(num_epochs=3)
    train_and_evaluate(config, workdir)
    state_dir = os.path.join(workdir, "checkpoints", "24", "state")  # epoch 3 of 8 steps
    for folder, _, files in os.walk(state_dir):
        for name in files:
            if name != "commit_success.txt":
                with open(os.path.join(folder, name), "r+b") as f:
                    f.truncate(max(0, os.path.getsize(f.name) // 3))
    run = make_experiment(config)
    ckpts = checkpoints.Checkpoints(workdir)
    state, meta = ckpts.restore(run.state)
    ckpts.close()
    assert meta["epoch"] == 2 and int(state.step) == 2 * run.plan.steps_per_epoch
    assert "checkpoint 24 (latest) is unreadable" in caplog.text
    # Resuming with one more epoch redoes epoch 3 from the epoch-2 checkpoint and matches a clean run.
    summary = train_and_evaluate(tiny_config(num_epochs=4), workdir)
    clean = train_and_evaluate(tiny_config(num_epochs=4), str(tmp_path / "clean"))
    assert [without_timing(l) for l in records.read_metrics(workdir)] == [
        without_timing(l) for l in records.read_metrics(str(tmp_path / "clean"))]
    assert without_timing(summary) == without_timing(clean)


def test_injected_nan_stops_with_epoch_and_keeps_good_checkpoints(tmp_path, monkeypatch):
    original = training_steps.train_step

    def poisoned(state, *args):  # NaN loss from the 21st step on: epoch 3 (8 steps each), chunk 4-6
        state, metrics = original(state, *args)
        metrics["loss"] = metrics["loss"] * jnp.where(state.step > 20, jnp.nan, 1.0)
        return state, metrics

    monkeypatch.setattr(training_steps, "train_step", poisoned)
    workdir = str(tmp_path / "run")
    with pytest.raises(TrainingDiverged, match="epoch 3, steps 4-6 of 8"):
        train_and_evaluate(tiny_config(num_epochs=4), workdir)
    assert [l["epoch"] for l in records.read_metrics(workdir)] == [1, 2]
    ckpts = checkpoints.Checkpoints(workdir)
    assert ckpts.steps(checkpoints.LATEST) == [8, 16]
    ckpts.close()


@pytest.mark.slow
def test_diverging_run_exits_3(tmp_path):
    result = subprocess.run(train_command(tmp_path / "run", "--config.learning_rate=1e12"), cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "training loss became" in result.stderr and "epoch 1" in result.stderr


@pytest.mark.slow
def test_incompatible_resume_names_keys_and_restart_starts_over(tmp_path, finished_run):
    workdir = tmp_path / "copy"
    shutil.copytree(finished_run, workdir)
    result = subprocess.run(train_command(workdir, "--config.batch_size=64"), cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 2
    assert "batch_size: 128 -> 64" in result.stderr and "lr_boundaries: [2] -> [6]" in result.stderr
    assert "--restart" in result.stderr
    assert len(records.read_metrics(str(workdir))) == 4  # untouched
    result = subprocess.run(train_command(workdir, "--config.num_epochs=2", "--restart"), cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [l["epoch"] for l in records.read_metrics(str(workdir))] == [1, 2]


def test_evaluate_exit_codes_follow_the_one_table(tmp_path, capsys):
    """2: the workdir holds no run (bad input); 3: a run whose checkpoints cannot be used (as train.py)."""
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--workdir", str(tmp_path / "nothing_here")])
    assert exit_info.value.code == 2 and "holds no config.json" in capsys.readouterr().err
    records.Workdir(str(tmp_path / "started")).start(tiny_config())
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--workdir", str(tmp_path / "started")])
    assert exit_info.value.code == 3 and "no latest checkpoint" in capsys.readouterr().err


def test_profile_traces_the_first_steps_and_leaves_the_results_unchanged(tmp_path, finished_run):
    workdir = tmp_path / "profiled"
    train_and_evaluate(tiny_config(num_epochs=4, profile_steps=4), str(workdir))
    assert list((workdir / "profile").rglob("*.xplane.pb"))
    (perfetto,) = (workdir / "profile").rglob("perfetto_trace.json.gz")
    names = {event.get("name", "") for event in json.loads(gzip.decompress(perfetto.read_bytes()))["traceEvents"]}
    assert any("multi_step" in name for name in names)  # the jitted training call ran inside the trace
    got, want = records.read_metrics(str(workdir)), records.read_metrics(finished_run)
    assert [without_timing(line) for line in got] == [without_timing(line) for line in want]


@pytest.fixture
def small_file_system(tmp_path):
    """A 1 MiB tmpfs: the first checkpoint of the ARGS run (0.6 MiB) fits, the second does not.
    Mounting needs root, as CI has."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]).returncode:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_a_full_disk_stops_with_one_message_and_the_rerun_resumes_exactly(small_file_system, reference_run):
    workdir = small_file_system / "run"
    full = subprocess.run(train_command(workdir), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert full.returncode == 3, full.stderr[-3000:]
    (message,) = error_lines(full.stderr)
    assert re.fullmatch(
        rf"error: could not write to workdir '{workdir}': no space left on the device \(0\.\d MiB free of 1\.0 MiB; "
        r"a checkpoint needs about 0\.6 MiB\)\. The checkpoints before it are whole: free some space, then run the "
        r"same command again to resume from step 8", message), message
    assert "Traceback" not in full.stderr and "Event loop is closed" not in full.stderr
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_file_system)], check=True)  # space freed
    resumed = subprocess.run(train_command(workdir), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from the checkpoint of epoch 1 (step 8)" in resumed.stderr
    assert_same_run(workdir, reference_run)


@pytest.mark.slow
def test_a_workdir_made_read_only_during_the_run_stops_with_one_message_and_the_rerun_resumes_exactly(
        tmp_path, reference_run):
    """The run's process lacks root's override of file permissions (setpriv), as a user's would; the
    workdir and everything in it lose their write permission between two epochs."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and util-linux's setpriv to drop the permission override (CI has both)")
    workdir = tmp_path / "run"
    no_override = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    process = subprocess.Popen(no_override + train_command(workdir), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    epoch_2 = workdir / "checkpoints" / "16"  # orbax renames a save to its step once it is whole
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not epoch_2.exists():
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before its workdir could be made read-only"
    paths = [workdir] + sorted(workdir.rglob("*"))
    for path in paths:
        path.chmod(0o555 if path.is_dir() else 0o444)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 3, stderr[-3000:]
    (message,) = error_lines(stderr)
    assert re.fullmatch(rf"error: could not write to workdir '{workdir}': permission denied \(.*\)\. The checkpoints "
                        r"before it are whole: make the directory writable again, then run the same command again to "
                        r"resume from step (16|24)", message), message  # 24: epoch 3's checkpoint whole before the change
    assert "Traceback" not in stderr
    for path in paths:
        path.chmod(0o755 if path.is_dir() else 0o644)
    resumed = subprocess.run(train_command(workdir), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(workdir, reference_run)
