"""A workdir that stops taking writes during a run (a full disk, a quota, a file system turned
read-only): recognised wherever it surfaces (our own writes, orbax's background saves) and
reported once, as one message that says what happened and from which step the rerun resumes."""
import errno
import logging
import os
import re
import shutil
import tempfile

import jax
import numpy as np
from jax.experimental import multihost_utils

FAULTS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is reached",
          errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}
# orbax reports tensorstore's failures as ValueError('... [os_error_code=\'28\']'), with no errno.
OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


class DiskFault(RuntimeError):
    """The workdir stopped taking writes; the message says where, why, and how to resume."""


def error_code(exc) -> int:
    """The errno an exception (or a message) carries, or None."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    match = OS_ERROR_CODE.search(str(exc))
    return int(match.group(1)) if match else None


def fault_errno(exc: BaseException):
    """The errno of a write fault (FAULTS) in `exc` or the exceptions it was raised from, or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if error_code(exc) in FAULTS:
            return error_code(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def check_room(directory: str, needed: int) -> None:
    """Raise OSError (EACCES, EROFS, EDQUOT, ENOSPC) when `directory` cannot take `needed` more
    bytes, found by creating a file there and by its free space, in every process of the job
    alike. Checked before a save: a background save that fails halfway stops orbax's event loop
    while tensorstore's other writes are in flight, and each of them prints a traceback."""
    code = 0
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
        if shutil.disk_usage(directory).free < needed:
            code = errno.ENOSPC
    except OSError as e:
        if e.errno not in FAULTS:
            raise
        code = e.errno
    if jax.process_count() > 1:  # one process's fault stops them all at the same save
        code = next((int(c) for c in multihost_utils.process_allgather(np.int32(code)) if c), 0)
    if code:
        raise OSError(code, FAULTS[code], directory)


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def describe(code: int, workdir: str, resume_step, checkpoint_bytes) -> str:
    """The one message for a write fault `code` in `workdir`; `resume_step`: the newest whole
    checkpoint's step (None: none yet); `checkpoint_bytes`: that checkpoint's size."""
    usage = shutil.disk_usage(workdir) if os.path.isdir(workdir) else None
    details = [f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"] if usage else []
    if checkpoint_bytes:
        details.append(f"a checkpoint needs about {checkpoint_bytes / 2**20:.1f} MiB")
    remedy = "free some space" if code in (errno.ENOSPC, errno.EDQUOT) else "make the directory writable again"
    resume = (f"The checkpoints before it are whole: {remedy}, then run the same command again to resume from step "
              f"{resume_step}" if resume_step is not None else
              f"No checkpoint was written yet: {remedy}, then run the same command again to start over")
    return f"could not write to workdir {workdir!r}: {FAULTS[code]} ({'; '.join(details)}). {resume}"


class DropFaultReports(logging.Filter):
    """Drops the log records of orbax's background threads (and the asyncio futures they leave)
    that report a write fault: `DiskFault` says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return fault_errno(exc) is None and error_code(record.getMessage()) not in FAULTS


def drop_background_reports() -> None:
    """Install `DropFaultReports` on the loggers orbax's background saves report through (once)."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropFaultReports) for f in logger.filters):
            logger.addFilter(DropFaultReports())

