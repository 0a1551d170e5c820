"""Checkpoints with orbax: the last two evaluations plus the best one, written asynchronously.

Layout in the workdir: `checkpoints/latest/<step>/` (two kept) and `checkpoints/best/<step>/` (one
kept), numbered by global training step. Each holds the train state (params, batch stats, optimizer
state, step) and a small JSON with the epoch, step and validation error of its metrics line. RNG
state needs no saving: every key derives from the seed and the step or epoch, so restoring the step
restores the randomness.
"""
import logging
import os

import jax
import orbax.checkpoint as ocp

from sd_jax import records

LATEST, BEST = "latest", "best"

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint could be restored."""


def _state_tree(state):
    return {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state,
            "step": state.step}


class Checkpoints:
    """The run's two checkpoint managers (latest and best)."""

    def __init__(self, workdir: str, keep_latest: int = 2):
        root = os.path.abspath(os.path.join(workdir, records.CHECKPOINT_DIR))
        self.managers = {
            LATEST: ocp.CheckpointManager(os.path.join(root, LATEST),
                                          options=ocp.CheckpointManagerOptions(max_to_keep=keep_latest,
                                                                                cleanup_tmp_directories=True)),
            BEST: ocp.CheckpointManager(os.path.join(root, BEST), options=ocp.CheckpointManagerOptions(max_to_keep=1)),
        }

    def save(self, which: str, state, line: dict) -> None:
        """Start writing a checkpoint of `state`, evaluated as metrics `line`, in the background."""
        meta = {key: line[key] for key in ("epoch", "step", "val_error")}
        self.managers[which].save(line["step"], args=ocp.args.Composite(
            state=ocp.args.StandardSave(_state_tree(state)), meta=ocp.args.JsonSave(meta)))

    def steps(self, which: str = LATEST):
        return sorted(self.managers[which].all_steps())

    def restore(self, state, which: str = LATEST):
        """(state, meta) from the newest checkpoint of `which` that reads back whole; None if there is none.

        A checkpoint that fails to read (truncated or corrupt files) is reported and skipped in
        favour of the one before it.
        """
        manager = self.managers[which]
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(state))
        for step in reversed(self.steps(which)):
            try:
                restored = manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            except Exception as e:  # orbax/tensorstore raise many types for unreadable files
                log.warning("checkpoint %s/%d is unreadable (%s: %s); trying the one before it",
                            which, step, type(e).__name__, str(e).splitlines()[0][:200])
                continue
            tree = restored["state"]
            return state.replace(**tree), restored["meta"]
        if self.steps(which):
            raise CheckpointError(f"none of the {which} checkpoints {self.steps(which)} could be read; "
                                  "start over with --restart or remove the checkpoints directory")
        return None

    def wait(self) -> None:
        for manager in self.managers.values():
            manager.wait_until_finished()

    def close(self) -> None:
        for manager in self.managers.values():
            manager.close()
