"""One run per workdir (`sd_jax.training.workdir_hold`): real processes and real lock files."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from sd_jax.training import records, workdir_hold
from sd_jax.training.records import WorkdirError
from sd_jax.training.workdir_hold import LOCK_FILE, WorkdirHold
from tests.conftest import ROOT
from tests.test_checkpoints import train_command, wait_for_metrics


def write_hold(workdir, age_s: float = 0.0, **record) -> None:
    """A lock file as another run would leave it, last renewed `age_s` ago."""
    workdir.mkdir(exist_ok=True)
    holder = {"pid": 12345, "host": "other-host", "boot": "b", "started": "then", "command": "train.py ...",
              "token": "theirs", **record}
    (workdir / LOCK_FILE).write_text(json.dumps(holder))
    os.utime(workdir / LOCK_FILE, (time.time() - age_s,) * 2)


def holder_token(workdir) -> str:
    return json.loads((workdir / LOCK_FILE).read_text())["token"]


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_trains_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    first = subprocess.Popen(train_command(workdir, "--config.num_epochs=100"), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for_metrics(workdir, 1, first)
        assert first.poll() is None, "the first run ended too soon"
        before = records.read_metrics(str(workdir))
        # The same command with a resumable change (num_epochs), which a second run would write to config.json.
        second = subprocess.run(train_command(workdir, "--config.num_epochs=101"), cwd=ROOT, capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by process {first.pid} on {socket.gethostname()}" in second.stderr
        assert "--config.num_epochs=100" in second.stderr  # the holder's command
        assert first.poll() is None
        assert records.read_json(str(workdir), records.CONFIG_FILE)["num_epochs"] == 100
        after = records.read_metrics(str(workdir))
        assert after[:len(before)] == before
    finally:
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    epochs = [line["epoch"] for line in records.read_metrics(str(workdir))]
    assert epochs == list(range(1, len(epochs) + 1))
    assert not (workdir / LOCK_FILE).exists()


def test_a_live_holder_on_this_host_keeps_the_workdir_and_a_dead_one_frees_it(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = dict(host=socket.gethostname(), boot=workdir_hold.this_boot())
    try:
        write_hold(tmp_path, pid=live.pid, **here)
        with pytest.raises(WorkdirError, match=f"in use by process {live.pid} on {socket.gethostname()}"):
            WorkdirHold(str(tmp_path)).take()
        assert holder_token(tmp_path) == "theirs"
    finally:
        live.kill()
        live.wait()
    for gone in (dict(pid=dead.pid, **here), dict(pid=os.getpid(), host=here["host"], boot="an earlier boot")):
        write_hold(tmp_path, **gone)
        hold = WorkdirHold(str(tmp_path))
        hold.take()
        assert holder_token(tmp_path) == hold.record["token"]
        hold.release()
        assert not (tmp_path / LOCK_FILE).exists()


def test_a_hold_from_another_host_expires_unless_renewed_and_can_be_taken_over(tmp_path, caplog):
    write_hold(tmp_path, age_s=workdir_hold.EXPIRY_S - 60)
    with pytest.raises(WorkdirError, match="in use by process 12345 on other-host.*--take-over"):
        WorkdirHold(str(tmp_path)).take()
    write_hold(tmp_path, age_s=workdir_hold.EXPIRY_S + 60)
    hold = WorkdirHold(str(tmp_path))
    hold.take()
    assert holder_token(tmp_path) == hold.record["token"]
    assert "not renewed for" in caplog.text
    hold.release()
    write_hold(tmp_path)  # fresh, but the user knows its host is gone
    hold = WorkdirHold(str(tmp_path), take_over=True)
    hold.take()
    assert holder_token(tmp_path) == hold.record["token"]
    hold.release()


def test_the_holder_renews_its_hold(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_hold, "RENEW_S", 0.05)
    hold = WorkdirHold(str(tmp_path))
    hold.take()
    os.utime(tmp_path / LOCK_FILE, (time.time() - 1000,) * 2)
    deadline = time.time() + 10
    while time.time() < deadline and time.time() - os.stat(tmp_path / LOCK_FILE).st_mtime > 100:
        time.sleep(0.02)
    assert time.time() - os.stat(tmp_path / LOCK_FILE).st_mtime < 100
    hold.release()
    assert not (tmp_path / LOCK_FILE).exists()
