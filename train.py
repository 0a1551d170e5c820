"""Train a stochastic-depth ResNet: python train.py --config configs/quickstart.py --workdir runs/quickstart

Running it again on the same --workdir resumes from the latest checkpoint. Exit codes: 2 for a bad
config or workdir (nothing is written), 3 when the loss stops being finite or no checkpoint reads.
"""
import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sd_jax.checkpoints import CheckpointError
from sd_jax.config import ConfigError
from sd_jax.records import WorkdirError
from sd_jax.training import TrainingDiverged, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics.jsonl and summary.json.")
_RESTART = flags.DEFINE_bool("restart", False, "Delete the run already in --workdir and start over "
                              "(by default a workdir holding a run of the same config is resumed).")
flags.mark_flags_as_required(["config", "workdir"])


def show_progress():
    """sd_jax's progress lines on stderr; other libraries' INFO logs (orbax, jax) stay quiet."""
    logging.set_verbosity(logging.WARNING)
    handler = std_logging.StreamHandler(sys.stderr)
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    package_log = std_logging.getLogger("sd_jax")
    package_log.addHandler(handler)
    package_log.setLevel(std_logging.INFO)
    package_log.propagate = False


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    show_progress()
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value, restart=_RESTART.value)
    except (ConfigError, WorkdirError) as e:
        exit_with(e, 2)
    except (TrainingDiverged, CheckpointError) as e:
        exit_with(e, 3)


def exit_with(error: Exception, code: int):
    print(f"error: {error}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    app.run(main)
