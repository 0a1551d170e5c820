"""Evaluate a run's checkpoint: python -m sd_jax.evaluate --workdir W [--checkpoint best|latest]

Rebuilds the model from the workdir's config.json, restores the checkpoint and prints one JSON
object with the epoch evaluated and its validation and test error (percent).
"""
import json
import os

import ml_collections

from sd_jax import cli

from sd_jax.training import checkpoints, records
from sd_jax.config import default_config, resolve_convention
from sd_jax.training.experiment import make_experiment
from sd_jax.training.feeds import make_feed
from sd_jax.training.steps import eval_variables


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in `workdir` trained with (its config.json over the defaults)."""
    if not os.path.isfile(os.path.join(workdir, records.CONFIG_FILE)):
        raise records.WorkdirError(f"{workdir!r} holds no {records.CONFIG_FILE}: is it a train.py --workdir?")
    config = default_config()
    stored = records.read_json(workdir, records.CONFIG_FILE)
    stored["lr_boundaries"] = tuple(stored["lr_boundaries"])
    config.update(stored)
    return resolve_convention(config)


def evaluate(workdir: str, which: str = checkpoints.LATEST) -> dict:
    config = run_config(workdir)
    experiment = make_experiment(config)
    ckpts = checkpoints.Checkpoints(workdir, read_only=True)  # the run may be training: touch nothing
    restored = ckpts.restore(experiment.state, which)
    ckpts.close()
    if restored is None:
        raise checkpoints.CheckpointError(f"no {which} checkpoint in {workdir!r}")
    state, meta = restored
    return {"workdir": workdir, "checkpoint": which, "epoch": meta["epoch"], "step": int(state.step),
            **make_feed(experiment).error_rates(eval_variables(state))}


def arg_parser():
    p = cli.parser(__doc__)
    p.add_argument("--workdir", required=True, help="a run's workdir (train.py --workdir)")
    p.add_argument("--checkpoint", default=checkpoints.LATEST, choices=(checkpoints.LATEST, checkpoints.BEST))
    return p


def run(args):
    result = evaluate(args.workdir, args.checkpoint)
    print(json.dumps(result))
    return result


def main(argv=None):
    return cli.main(arg_parser(), run, argv)


if __name__ == "__main__":
    main()
