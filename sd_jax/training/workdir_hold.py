"""One run per workdir: a run holds its workdir while it trains, and a second run on it is refused.

The hold is a file, `WORKDIR/run.lock`, naming the holder (pid, host, boot, start time, command).
It is created with the NFS-safe recipe of open(2)'s manual: write a file of a unique name, then
`os.link` it to the lock's name, which succeeds for one taker only, on a local disk and on NFS alike
(`flock`/`fcntl` locks are not used: NFS gives them weaker guarantees, some shared file systems none).

A holder that no longer exists does not keep the workdir: on the same host (and the same boot) a
dead pid frees it at once; from another host (shared storage) the hold expires `EXPIRY_S` after its
last renewal, which a thread of the holding process writes every `RENEW_S` (the file's mtime).
`take_over=True` (`train.py --take-over`) takes the workdir whatever holds it.
"""
import contextlib
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

import jax
import numpy as np
from jax.experimental import multihost_utils

from sd_jax.training.records import WorkdirError

LOCK_FILE = "run.lock"
RENEW_S = 60.0
EXPIRY_S = 600.0  # ten renewals missed: the holder is gone (or its clock is far from ours)

log = logging.getLogger(__name__)


def this_boot() -> str:
    """This machine's boot id (Linux), so a pid from before a reboot is not taken for a live process."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def read_holder(path: str):
    """The holder's record from the lock file, or None if the file is gone; a file that is not a
    whole record (a taker died between creating and filling it; never here, the link is of a
    finished file) reads as an unknown holder that expires like a remote one."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def why_stale(holder: dict, age_s: float):
    """Why the hold of `holder` (its file renewed `age_s` ago) is no longer held, or None if it is."""
    if holder.get("host") == socket.gethostname() and holder.get("boot") == this_boot():
        return None if pid_alive(holder["pid"]) else f"process {holder['pid']} no longer exists"
    if holder.get("host") == socket.gethostname():
        return "this machine has restarted since"
    if age_s > EXPIRY_S:
        return f"not renewed for {age_s:.0f} s (a hold expires after {EXPIRY_S:.0f} s)"
    return None


def describe(holder: dict) -> str:
    if not holder:
        return "an unknown process (unreadable lock file)"
    return (f"process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command')}")


class WorkdirHold:
    """A context holding `workdir` for this run: taken on entry (WorkdirError if another run holds
    it), renewed in the background, released on exit. Only the primary process of a multi-process
    job takes it; the job's other processes follow process 0's outcome (`take_for_job`)."""

    def __init__(self, workdir: str, take_over: bool = False):
        self.workdir, self.take_over = workdir, take_over
        self.path = os.path.join(workdir, LOCK_FILE)
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "boot": this_boot(),
                       "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                       "command": " ".join(sys.argv), "token": uuid.uuid4().hex}
        self.stopped = threading.Event()
        self.renewer = None

    def take(self) -> None:
        """Hold the workdir, or raise WorkdirError naming the holder and what to do."""
        os.makedirs(self.workdir, exist_ok=True)
        for _ in range(3):  # a stale hold removed, or a release seen, is retried
            if self._link():
                self.renewer = threading.Thread(target=self._renew, name="workdir-hold", daemon=True)
                self.renewer.start()
                return
            holder = read_holder(self.path)
            if holder is None:
                continue
            try:
                age = time.time() - os.stat(self.path).st_mtime
            except FileNotFoundError:
                continue
            stale = "taken over (--take-over)" if self.take_over else why_stale(holder, age)
            if stale is None:
                raise WorkdirError(
                    f"workdir {self.workdir!r} is in use by {describe(holder)}; two runs would write one record and "
                    f"overwrite each other's checkpoints. Wait for it to end or stop it, or use another --workdir; "
                    f"if that process is gone (its machine lost), pass --take-over (a hold from another host "
                    f"also expires {EXPIRY_S:.0f} s after its last renewal, {age:.0f} s ago)")
            log.warning("workdir %s was held by %s: %s; taking it", self.workdir, describe(holder), stale)
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        raise WorkdirError(f"workdir {self.workdir!r}: could not take {LOCK_FILE} (other runs keep taking it)")

    def _link(self) -> bool:
        """Write this run's record to a file of its own and link it to the lock's name: True if
        the link is ours (its link count is 2 even where NFS loses the link call's reply)."""
        unique = f"{self.path}.{self.record['host']}.{self.record['pid']}.{self.record['token'][:8]}"
        with open(unique, "w") as f:
            json.dump(self.record, f)
        try:
            os.link(unique, self.path)
        except FileExistsError:
            pass
        try:
            return os.stat(unique).st_nlink == 2
        finally:
            os.remove(unique)

    def _renew(self) -> None:
        while not self.stopped.wait(RENEW_S):
            if not self.ours():
                log.warning("workdir %s is no longer held by this run (%s now holds it)", self.workdir,
                            describe(read_holder(self.path) or {}))
                return
            try:
                os.utime(self.path)
            except OSError as e:
                log.warning("could not renew the hold on workdir %s: %s", self.workdir, e)

    def ours(self) -> bool:
        holder = read_holder(self.path)
        return bool(holder) and holder.get("token") == self.record["token"]

    def release(self) -> None:
        self.stopped.set()
        if self.renewer is not None:
            self.renewer.join()
            self.renewer = None
            try:
                if self.ours():
                    os.remove(self.path)
            except OSError:  # a workdir that stopped taking writes: the next run frees the hold of a gone process
                pass


@contextlib.contextmanager
def hold_for_job(workdir: str, take_over: bool = False):
    """Hold `workdir` for the whole job while the block runs; yields `take()`, which the block calls
    right before its first write. A workdir that exists is taken on entry (a second run is refused
    at once); one that does not is created and taken by `take()`, so a run refused for its config or
    data leaves nothing behind. Process 0 takes the hold and tells the job's other processes the
    outcome, so a refused job stops in every process."""
    hold, taken = WorkdirHold(workdir, take_over), []

    def take(only_if_exists: bool = False) -> None:
        if taken:
            return
        outcome, refusal = 0, None  # 0: not yet, 1: held, 2: refused
        if jax.process_index() == 0 and not (only_if_exists and not os.path.isdir(workdir)):
            try:
                hold.take()
                outcome = 1
            except WorkdirError as e:
                outcome, refusal = 2, e
        if jax.process_count() > 1:
            outcome = int(multihost_utils.broadcast_one_to_all(np.int32(outcome)))
        if outcome == 2:
            raise refusal or WorkdirError(f"workdir {workdir!r} is in use by another run (process 0 says which)")
        if outcome == 1:
            taken.append(True)

    take(only_if_exists=True)
    try:
        yield take
    finally:
        hold.release()
