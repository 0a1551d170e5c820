"""Recognising a workdir that stopped taking writes (`sd_jax.training.disk_faults`); the faults
themselves, on real file systems, are in tests/test_checkpoints.py."""
import errno
import logging

from sd_jax.training import disk_faults

# What orbax-checkpoint 0.12.8 raised from its background save on a full tmpfs (2026-12-07).
ORBAX_FULL_DISK = ('RESOURCE_EXHAUSTED: Error writing "batch_stats.bn1.mean/0" in OCDBT database at local file '
                   '"/tmp/w/full/run/checkpoints/22.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": '
                   'Failed to write 228420 bytes to file 14: No space left on device [os_error_code=\'28\']')


def test_a_fault_is_found_in_orbax_errors_and_in_the_exceptions_they_were_raised_from():
    assert disk_faults.fault_errno(ValueError(ORBAX_FULL_DISK)) == errno.ENOSPC
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied", "metrics.jsonl")
        except OSError:
            raise RuntimeError("while recording")
    except RuntimeError as e:
        assert disk_faults.fault_errno(e) == errno.EACCES
    assert disk_faults.fault_errno(FileNotFoundError(errno.ENOENT, "gone")) is None
    assert disk_faults.fault_errno(ValueError("INVALID_ARGUMENT [os_error_code='22']")) is None


def test_background_reports_of_a_fault_are_dropped_and_others_kept(caplog):
    disk_faults.drop_background_reports()
    absl = logging.getLogger("absl")
    with caplog.at_level(logging.ERROR, logger="absl"):
        try:
            raise ValueError(ORBAX_FULL_DISK)
        except ValueError:
            absl.exception("_SignalingThread.run() raised an exception")
        absl.error("Failed to run 4 Handler Commit operations: %s", ORBAX_FULL_DISK)
        absl.error("an unrelated failure")
    assert [record.getMessage() for record in caplog.records] == ["an unrelated failure"]
