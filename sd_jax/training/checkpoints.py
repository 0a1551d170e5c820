"""Checkpoints with orbax: one manager keeping the latest two saves and the best evaluation,
written asynchronously.

Layout in the workdir: `checkpoints/<step>/`, numbered by global training step. Each holds the
train state (params, batch stats, optimizer state, step) and, as orbax metrics, the epoch, step and
validation error of its metrics line; orbax's preservation policies keep the newest `keep_latest`
and the one `records.best_line` picks (the one best rule). RNG state needs no saving: every key
derives from the seed and the step or epoch, so restoring the step restores the randomness.
"""
import dataclasses
import logging
import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from sd_jax.training import disk_faults, records

LATEST, BEST = "latest", "best"
META_KEYS = ("epoch", "step", "val_error")
SAVE_OVERHEAD = 2**18  # bytes a save writes besides the arrays (metadata, manifests), with room to spare

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint could be restored."""


def _state_tree(state):
    return {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state,
            "step": state.step}


def best_step(metas: list):
    """The step of the best evaluation among checkpoint metadata, by `records.best_line`."""
    return records.best_line(metas)["step"] if metas else None


@dataclasses.dataclass
class PreserveBest(checkpoint_managers.PreservationPolicy):
    """Keeps the checkpoint of the best evaluation (`records.best_line` over the saved metrics)."""

    def should_preserve(self, checkpoints, *, context):
        best = best_step([info.metrics for info in checkpoints if info.metrics is not None])
        return [info.step == best for info in checkpoints]


class LoopStoppedCheckpointManager(ocp.CheckpointManager):
    """orbax's manager, except that it never asks JAX's preemption service itself. The service
    agrees on the counter after the highest one any process has asked with and answers only when
    asked with exactly that counter, so every ask in a process must use one numbering that grows
    by one: the training loop's call count (`preemption.StopSignals`). orbax would ask with the
    training step at each save, which moved the agreed point dozens of calls later, or past the
    run's end (issue 37)."""

    def reached_preemption(self, step: int) -> bool:
        return False


class Checkpoints:
    """The run's checkpoint manager: the latest `keep_latest` saves plus the best one."""

    def __init__(self, workdir: str, keep_latest: int = 2, read_only: bool = False):
        """`read_only`: for reading a run's checkpoints, also while it trains (`sd_jax.evaluate`):
        writes and deletes nothing, not even the unfinished save's temporary directory."""
        policy = checkpoint_managers.AnyPreservationPolicy([checkpoint_managers.LatestN(keep_latest), PreserveBest()])
        self.directory = os.path.abspath(os.path.join(workdir, records.CHECKPOINT_DIR))
        self.manager = LoopStoppedCheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policy, cleanup_tmp_directories=not read_only, read_only=read_only,
                best_fn=lambda meta: meta["val_error"], best_mode="min"))  # best_fn: orbax writes metrics only with one

    def _write(self, step: int, state, metrics: dict, **options) -> None:
        tree = _state_tree(state)
        disk_faults.check_room(self.directory, sum(leaf.nbytes for leaf in jax.tree.leaves(tree)) + SAVE_OVERHEAD)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)),
                          metrics=metrics, **options)

    def save(self, state, line: dict) -> None:
        """Start writing a checkpoint of `state`, evaluated as metrics `line`, in the background."""
        self._write(line["step"], state, {key: line[key] for key in META_KEYS})

    def save_interrupted(self, state, epoch, partial: dict) -> None:
        """Checkpoint `state` between evaluations, when a signal stops the run (nothing if this step is
        saved already). `partial` carries the evaluation interval's training sums so far, so the
        resumed run writes the same metrics line; an infinite val_error is never the best."""
        step = int(state.step)
        if step in self.manager.all_steps():
            return
        self._write(step, state, {"epoch": epoch, "step": step, "val_error": float("inf"), "partial": partial},
                    force=True)

    def steps(self, which: str = LATEST) -> list:
        """The kept steps, oldest first (LATEST: all of them, the newest last); BEST: the best one's."""
        steps = sorted(self.manager.all_steps())
        if which == BEST:
            best = best_step([self.manager.metrics(step) for step in steps])
            return [] if best is None else [best]
        return steps

    def restore(self, state, which: str = LATEST):
        """(state, meta) from the newest checkpoint (or the best one) that reads back whole; None if there is none.

        A checkpoint that fails to read (truncated or corrupt files) is reported and skipped in
        favour of the one before it.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(state))
        candidates = self.steps(which)
        for step in reversed(candidates):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
            except Exception as e:  # orbax/tensorstore raise many types for unreadable files
                log.warning("checkpoint %d (%s) is unreadable (%s: %s); trying the one before it",
                            step, which, type(e).__name__, str(e).splitlines()[0][:200])
                continue
            return state.replace(**restored["state"]), self.manager.metrics(step)
        if candidates:
            raise CheckpointError(f"none of the {which} checkpoints {candidates} could be read; "
                                  "start over with --restart or remove the checkpoints directory")
        return None

    def newest_whole(self):
        """(step, bytes on disk) of the newest checkpoint written whole, as the directory holds it
        now (after a failed save); (None, None) if there is none."""
        self.manager.reload()
        steps = self.steps()
        if not steps:
            return None, None
        return steps[-1], disk_faults.directory_bytes(os.path.join(self.directory, str(steps[-1])))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
