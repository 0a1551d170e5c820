"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N (set before JAX starts).

    python tests/parallel_worker.py JOBS
JOBS is a JSON list of [task, workdir, {config overrides}], run in order in this one process (a
process start and its first compiles cost more than most jobs). Prints one JSON list: each job's result.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

from sd_jax.training import checkpoints, parallel, records  # noqa: E402
from sd_jax.training.experiment import make_experiment  # noqa: E402
from sd_jax.training.feeds import epoch_permutation  # noqa: E402
from sd_jax.training.loop import train_and_evaluate  # noqa: E402
from sd_jax.training.steps import device_drop_key, make_train_steps  # noqa: E402
from tests.test_training import tiny_config  # noqa: E402


def train(workdir, config):
    """Train (or resume), then dump the final parameters next to the run's files."""
    train_and_evaluate(config, workdir)
    run = make_experiment(config)
    ckpts = checkpoints.Checkpoints(workdir)
    state, _ = ckpts.restore(run.state)
    ckpts.close()
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))
    np.savez(os.path.join(workdir, "params.npz"), **{jax.tree_util.keystr(p): v for p, v in leaves})
    return {"devices": jax.device_count(), "metrics": records.read_metrics(workdir)}


def gates(workdir, config):
    """Block gates each device draws in one training step, for several steps."""
    run = make_experiment(config)
    model, mesh = run.plan.model, run.plan.mesh
    x = jnp.ones((config.batch_size, 16, 16, 3))
    variables = {"params": run.state.params, "batch_stats": run.state.batch_stats}

    def per_device(keys, step, x):
        _, updates = model.apply(variables, x, train=True, rngs={"drop": device_drop_key(keys, step, config)},
                                 mutable=["batch_stats", "gates"])
        return jnp.stack([jnp.ravel(g) for g in jax.tree.leaves(updates["gates"])]).ravel()[None]

    fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(),
                                                                  PartitionSpec(parallel.AXIS)),
                               out_specs=PartitionSpec(parallel.AXIS), check_vma=False))
    return {"gates": [np.asarray(fn(run.keys, step, x)).tolist() for step in range(8)]}


def conditionals(workdir, config):
    """How many conditionals the compiled multi-device train step holds."""
    run = make_experiment(config)
    perm = epoch_permutation(run.keys, 0, run.plan, config.batch_size)
    hlo = make_train_steps(run.plan, config).lower(
        run.state, run.train_data, run.keys, perm, 0, 1).compile().as_text()
    return {"conditionals": hlo.count(" conditional("), "blocks": run.plan.model.num_blocks}


TASKS = {"train": train, "gates": gates, "conditionals": conditionals}

if __name__ == "__main__":
    print(json.dumps([TASKS[task](workdir, tiny_config(**overrides)) for task, workdir, overrides in json.loads(sys.argv[1])]))
