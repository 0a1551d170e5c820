"""Stopping cleanly when the machine is taken away. Spot/preemptible VMs, SLURM time limits and
Kubernetes end a job with SIGTERM and a grace period; Ctrl-C sends SIGINT. Either one is noted,
the jitted call in flight finishes, and the loop then checkpoints that exact step and raises
`Preempted` (exit code 128 + the signal's number: 143 for SIGTERM, 130 for SIGINT).

With several processes every one must stop at the same step: SIGTERM then belongs to JAX's
preemption service (started by `jax.distributed.initialize`), which spreads a notice to all
processes and agrees on the call to stop after (`multihost_utils.reached_preemption_sync_point`).
The service sets that point to one past the highest counter any process has asked with, and
answers yes only to exactly that counter: so `StopSignals` is the one place in a process that
asks, with its count of training calls (one more per ask), and the checkpoint manager never asks
(`checkpoints.LoopStoppedCheckpointManager`). The job then stops within two training calls of the notice.
"""
import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class Preempted(Exception):
    """The run stopped on a signal after checkpointing the step it had reached."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}, which is checkpointed; "
                         "run the same command again to resume")
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum


class StopSignals:
    """A context in which SIGTERM and SIGINT ask the training loop to stop instead of killing it.

    `should_stop()` is asked after each training call; a second SIGINT stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.received = None
        self.calls = 0  # the preemption service's counter: training calls finished in this process
        self.shared = jax.process_count() > 1
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            # Several processes: SIGTERM is the preemption service's, SIGINT keeps its default.
            for signum in () if self.shared else (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _note(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("received %s: finishing the training call in flight, then checkpointing that step and stopping",
                    signal.Signals(signum).name)

    def should_stop(self) -> bool:
        """Whether to stop after the training call just finished (asked once after every call)."""
        self.calls += 1
        if self.shared and multihost_utils.reached_preemption_sync_point(self.calls):
            self.received = signal.SIGTERM
        return self.received is not None
