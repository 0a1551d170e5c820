"""A trace of a few training steps with `jax.profiler` (`config.profile_steps` = N > 0): it starts
before the first training call after compilation and stops once N steps have run, rounded up to
whole calls (`steps_per_call` steps each), so the run's arithmetic is untouched. Written to
`<workdir>/profile/`: TensorBoard's profile plugin reads it (`tensorboard --logdir
<workdir>/profile`, with `pip install tensorboard-plugin-profile`), and its
`perfetto_trace.json.gz` opens at https://ui.perfetto.dev. Each training call is one "step" there."""
import contextlib
import logging
import os

import jax

PROFILE_DIR = "profile"

log = logging.getLogger(__name__)


class StepProfiler:
    """Traces the first `steps` training steps this process runs (none when `steps` is 0)."""

    def __init__(self, workdir: str, steps: int):
        self.directory, self.remaining, self.traced = os.path.join(workdir, PROFILE_DIR), steps, 0
        self.running = False

    def before_call(self) -> None:
        if self.remaining > 0 and not self.running:
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.running = True

    def annotate(self, step: int):
        """A context marking one training call (its first step's number) in the trace, so the
        profile's step-time views see calls as steps; nothing when not tracing."""
        return jax.profiler.StepTraceAnnotation("train", step_num=step) if self.running else contextlib.nullcontext()

    def after_call(self, state, count: int) -> None:
        """`count` steps have run into `state`; stop the trace once enough have."""
        if not self.running:
            return
        self.remaining, self.traced = self.remaining - count, self.traced + count
        if self.remaining <= 0:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.running = False
            log.info("profiled %d training steps into %s (tensorboard --logdir %s, or perfetto_trace.json.gz at "
                     "https://ui.perfetto.dev)", self.traced, self.directory, self.directory)

    def close(self) -> None:
        """Stop a trace the run ended inside (fewer steps left than asked for)."""
        if self.running:
            jax.profiler.stop_trace()
            self.running = False
