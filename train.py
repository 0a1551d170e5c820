"""Train a stochastic-depth ResNet: python train.py --config configs/quickstart.py --workdir /tmp/run"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sd_jax.config import ConfigError
from sd_jax.records import WorkdirError
from sd_jax.training import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics.jsonl and summary.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, WorkdirError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
