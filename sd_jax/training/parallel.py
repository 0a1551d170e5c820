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
    """Join the multi-process job: `jax.distributed.initialize()` reads the cluster from the
    environment (TPU pods, SLURM, Open MPI, ...). Elsewhere set JAX_COORDINATOR_ADDRESS=host:port,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID in each process, as torchrun's variables do for PyTorch."""
    if requested or multi_process_environment():
        count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
        jax.distributed.initialize(num_processes=None if count is None else int(count),
                                   process_id=None if index is None else int(index))


def make_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), (AXIS,))


def is_primary() -> bool:
    """Only process 0 writes logs and run files."""
    return jax.process_index() == 0


def put(value, mesh: Mesh, spec: PartitionSpec = PartitionSpec()):
    """A global array laid out on the mesh as `spec` says, from a value every process holds whole
    (numpy, or a jax array on a local device): each device gets its slice of the host copy, so it
    works across processes, where `jax.device_put` cannot reach other processes' devices."""
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(put(jax.random.key_data(value), mesh, spec), impl=jax.random.key_impl(value))
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, NamedSharding(mesh, spec), lambda index: host[index])


def put_process_local(local, mesh: Mesh, spec: PartitionSpec, global_shape: tuple):
    """A global array of `global_shape` laid out as `spec` says, from this process's part of it
    (`local`, as `jax.make_array_from_process_local_data` takes it): host-fed batches, of which each
    process holds only its own slice."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local, global_shape)


def replicate(tree, mesh: Mesh):
    """A full copy of every array on every device of the mesh (the same value in every process)."""
    return jax.tree.map(lambda leaf: put(leaf, mesh), tree)
