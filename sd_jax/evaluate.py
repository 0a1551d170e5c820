"""Evaluate a run's checkpoint: python -m sd_jax.evaluate --workdir W [--checkpoint best|latest]

Rebuilds the model from the workdir's config.json, restores the checkpoint and prints one JSON
object with the epoch evaluated and its validation and test error (percent).
"""
import argparse
import json
import sys

import ml_collections

from sd_jax import checkpoints, records, training
from sd_jax.config import default_config, resolve_convention
from sd_jax.data_files import DataError


def load_config(workdir: str) -> ml_collections.ConfigDict:
    config = default_config()
    stored = records.read_json(workdir, records.CONFIG_FILE)
    stored["lr_boundaries"] = tuple(stored["lr_boundaries"])
    config.update(stored)
    return resolve_convention(config)


def evaluate(workdir: str, which: str = checkpoints.LATEST) -> dict:
    config = load_config(workdir)
    run = training.prepare_run(config)
    ckpts = checkpoints.Checkpoints(workdir)
    restored = ckpts.restore(run.state, which)
    ckpts.close()
    if restored is None:
        raise checkpoints.CheckpointError(f"no {which} checkpoint in {workdir!r}")
    state, meta = restored
    errors = run.error_rates(training.make_count_errors(config, run.setup.model, run.setup.mesh), state)
    return {"workdir": workdir, "checkpoint": which, "epoch": meta["epoch"], "step": int(state.step),
            "val_error": errors["val"], "test_error": errors["test"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--checkpoint", default=checkpoints.LATEST, choices=(checkpoints.LATEST, checkpoints.BEST))
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.workdir, args.checkpoint)
    except (OSError, checkpoints.CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
