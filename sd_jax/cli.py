"""What the command-line entry points share: progress output and exit codes for known failures."""
import logging
import sys

from absl import logging as absl_logging

from sd_jax.checkpoints import CheckpointError
from sd_jax.config import ConfigError
from sd_jax.data_files import DataError
from sd_jax.records import WorkdirError
from sd_jax.training import TrainingDiverged

# Exit 2: bad input the user can fix before anything runs; 3: the run failed on the way.
EXIT_CODES = ((ConfigError, 2), (WorkdirError, 2), (DataError, 2), (TrainingDiverged, 3), (CheckpointError, 3))


def show_progress(primary: bool = True) -> None:
    """sd_jax's progress lines on stderr (primary process only); other libraries' INFO logs stay quiet."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    if not primary:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    package_log = logging.getLogger("sd_jax")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    package_log.propagate = False


def run_or_exit(fn, *args, **kwargs):
    """Call fn; a known failure becomes one "error: ..." line on stderr and its exit code."""
    try:
        return fn(*args, **kwargs)
    except tuple(kind for kind, _ in EXIT_CODES) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(next(code for kind, code in EXIT_CODES if isinstance(e, kind)))
