"""Train a stochastic-depth ResNet: python train.py --config configs/quickstart.py --workdir runs/quickstart

Running it again on the same --workdir resumes from the latest checkpoint. Exit codes: 2 for a bad
config, workdir or data (nothing is trained), 3 when the loss stops being finite or no checkpoint reads.
"""
from absl import app, flags
from ml_collections import config_flags

from sd_jax import cli, parallel
from sd_jax.training import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics.jsonl, summary.json and "
                               "checkpoints.")
_RESTART = flags.DEFINE_bool("restart", False, "Delete the run already in --workdir and start over "
                             "(by default a workdir holding a run of the same config is resumed).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Join a multi-process job with jax.distributed.initialize() "
                                 "(automatic when JAX_COORDINATOR_ADDRESS is set or on a multi-host TPU slice).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    parallel.initialize_distributed(_DISTRIBUTED.value)
    cli.show_progress(parallel.is_primary())
    cli.run_or_exit(train_and_evaluate, _CONFIG.value, _WORKDIR.value, restart=_RESTART.value)


if __name__ == "__main__":
    app.run(main)
