"""Data parallelism: a 1-D "data" mesh over every device of every process, for `jax.shard_map`.

`jax.pmap` is in maintenance mode and since JAX 0.8 compiles to `jit(shard_map(...))`; we write the
data-parallel step with `jax.shard_map` directly.
"""
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"


def multi_process_environment() -> bool:
    """Whether the environment describes a multi-process JAX job (coordinator set, or a TPU pod)."""
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(requested: bool) -> None:
    """Join the multi-process job: `jax.distributed.initialize()` reads the cluster from the environment."""
    if requested or multi_process_environment():
        jax.distributed.initialize()


def make_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), (AXIS,))


def is_primary() -> bool:
    """Only process 0 writes logs and run files."""
    return jax.process_index() == 0


def replicate(tree, mesh: Mesh):
    """A full copy of every array on every device of the mesh (the same value in every process)."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
