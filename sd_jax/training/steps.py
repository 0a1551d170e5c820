"""The pure jitted functions of training and evaluation: one SGD step on this device's share of
a batch, `count` steps in one device loop (fed from the device-resident dataset or from host
batches), and the evaluation counts. Step randomness is `fold_in(root, step)`, so a run is
reproducible from its seed and a resumed run draws what an uninterrupted one draws."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from sd_jax.data import augment

from sd_jax.training import compiler, parallel
from sd_jax.models.cifar import active_blocks
from sd_jax.layers.survival import drop_scale
from sd_jax.training.plan import TrainingPlan, TrainState, synchronised_batch_norm


def device_drop_key(keys, step, config):
    """The key of this step's block gates: the same on every device ("shared"), or per device."""
    key = jax.random.fold_in(keys["drop"], step)
    if config.drop_gates == "per_device":
        key = jax.random.fold_in(key, jax.lax.axis_index(parallel.AXIS))
    return key


def train_step(state: TrainState, images, labels, mask, num_real, keys, plan: TrainingPlan, config):
    """One SGD step on this device's share of the batch, inside `shard_map` over the "data" axis.

    `mask` (this device's examples; None when every example is real) leaves the padding of a short
    last batch out of the loss and the BatchNorm statistics; `num_real` counts the real examples of
    the global batch, so the gradient is the mean over them wherever they sit. Gradients are summed
    over devices (BatchNorm statistics averaged, see `synchronised_batch_norm`); returns the new
    state and the batch's metrics summed over devices.
    """
    step = state.step
    scale = drop_scale(step, plan.total_steps, config.drop_warmup)
    drop_key = device_drop_key(keys, step, config)
    weights = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True, drop_scale=scale,
            mask=mask, rngs={"drop": drop_key}, mutable=["batch_stats", "gates"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(losses * weights) / num_real, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.psum(grads, parallel.AXIS)
    batch_stats = updates["batch_stats"]
    if not synchronised_batch_norm(config):
        batch_stats = jax.lax.pmean(batch_stats, parallel.AXIS)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    wrong = (jnp.argmax(logits, -1) != labels).astype(jnp.float32)
    metrics = {
        "loss": jax.lax.psum(loss * num_real, parallel.AXIS),
        "errors": jax.lax.psum(jnp.sum(wrong * weights), parallel.AXIS),
        "images": num_real,
        "active_blocks": jax.lax.pmean(active_blocks(updates["gates"]).astype(jnp.float32), parallel.AXIS),
        "steps": jnp.float32(1.0),
    }
    return state, metrics


TRAIN_METRICS = ("loss", "errors", "images", "active_blocks", "steps")


def make_multi_step(plan: TrainingPlan, config, batch_of, data_spec, num_extra: int):
    """Jitted (state, data, keys, *extra, count) -> (state, summed metrics): `count` consecutive
    steps in one device loop, under `shard_map` over the "data" axis. `count` is traced, so every
    chunk length shares one compilation. `batch_of(i, step, data, keys, *extra)` returns step i's
    (images, labels, mask, num_real) on this device; `data` is laid out as `data_spec` says, the
    keys and the `num_extra` other arguments are replicated."""
    def multi_step(state, data, keys, *args):
        *extra, count = args

        def body(i, carry):
            state, sums = carry
            images, labels, mask, num_real = batch_of(i, state.step, data, keys, *extra)
            state, metrics = train_step(state, images, labels, mask, num_real, keys, plan, config)
            return state, jax.tree.map(jnp.add, sums, metrics)

        zeros = {k: jnp.float32(0.0) for k in TRAIN_METRICS}
        return jax.lax.fori_loop(0, count, body, (state, zeros))

    replicated = PartitionSpec()
    sharded = jax.shard_map(multi_step, mesh=plan.mesh, in_specs=(replicated, data_spec, *(replicated,) * (num_extra + 2)),
                            out_specs=(replicated, replicated), check_vma=False)
    return compiler.jit(sharded, device=plan.mesh.devices.flat[0], donate_argnums=0)


def this_devices_share(x, batch: int, mesh: Mesh):
    """This device's slice of a global-batch-sized array (inside `shard_map`)."""
    local = batch // mesh.size
    return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(parallel.AXIS) * local, local)


def make_train_steps(plan: TrainingPlan, config):
    """Jitted (state, train_data, keys, epoch permutation, first, count) -> (state, summed metrics),
    the dataset resident on the device (CIFAR, SVHN).

    Runs `count` consecutive steps of the epoch starting at its step `first` in one device loop.
    Each device takes its slice of every global batch (and of the batch's random augmentation
    draws) from the replicated dataset, so the result does not depend on the number of devices.
    Positions past the end of the (padded) permutation are the padding of the epoch's last batch:
    masked out of the step.
    """
    batch = config.batch_size
    dtype = jnp.dtype(config.dtype)
    mine = functools.partial(this_devices_share, batch=batch, mesh=plan.mesh)

    def batch_of(i, step, train_data, keys, perm, first):
        start = (first + i) * batch
        indices = jax.lax.dynamic_slice(perm, (start,), (batch,))
        real = start + jnp.arange(batch) < plan.num_train
        draws = augment.random_draws(jax.random.fold_in(keys["augment"], step), batch, plan.translate, plan.flip)
        images, labels = augment.training_batch(
            train_data["images"], train_data["labels"], mine(indices), jax.tree.map(mine, draws),
            train_data["mean"], train_data["std"], plan.translate, dtype)
        mask = mine(real) if config.partial_last_batch else None
        return images, labels, mask, jnp.sum(real).astype(jnp.float32)

    return make_multi_step(plan, config, batch_of, PartitionSpec(), num_extra=2)


HOST_BATCH_SPEC = {"images": PartitionSpec(None, parallel.AXIS), "labels": PartitionSpec(None, parallel.AXIS),
                   "mean": PartitionSpec(), "std": PartitionSpec()}


COLOUR_DRAWS = 1  # fold_in of the step's augmentation key: the colour draws' own stream


def make_host_train_steps(plan: TrainingPlan, config):
    """Jitted (state, host batches, keys, count) -> (state, summed metrics), the batches decoded on
    the host (ImageNet): {"images": uint8 (K, B, S, S, 3), "labels": (K, B)} split over the devices
    along B, with the normalisation "mean" and "std"; the first `count` of the K batches are trained.
    Flips, and the colour jitter and PCA lighting when configured, are drawn on the device from
    the step, as for device-resident data; the crops were made on the host
    (sd_jax.data.input_pipeline)."""
    batch = config.batch_size
    dtype = jnp.dtype(config.dtype)
    recolour = bool(config.color_jitter or config.lighting_std)

    def batch_of(i, step, host, keys):
        step_key = jax.random.fold_in(keys["augment"], step)
        flips = augment.random_draws(step_key, batch, 0, plan.flip)["flips"]
        images = augment.to_unit(host["images"][i])
        if recolour:  # fb.resnet.torch's order: crop, colour jitter, lighting, normalise, flip
            draws = augment.colour_draws(jax.random.fold_in(step_key, COLOUR_DRAWS), batch, config.color_jitter,
                                         config.lighting_std)
            draws = jax.tree.map(lambda x: this_devices_share(x, batch, plan.mesh), draws)
            images = augment.recolour(images, draws, bool(config.color_jitter))
        images = augment.standardize(images, host["mean"], host["std"], dtype)
        images = augment.flip(images, this_devices_share(flips, batch, plan.mesh))
        return images, host["labels"][i], None, jnp.float32(batch)

    return make_multi_step(plan, config, batch_of, HOST_BATCH_SPEC, num_extra=0)


def misclassified(logits, labels):
    """How many real examples (label >= 0; -1 marks padding) the top-1 prediction gets wrong."""
    return jnp.sum((jnp.argmax(logits, -1) != labels) & (labels >= 0))


def make_count_errors(config, model: nn.Module, mesh: Mesh):
    """Jitted (variables, eval split, mean, std) -> number of misclassified images (eval mode)."""
    dtype = jnp.dtype(config.dtype)

    def count_errors(variables, split, mean, std):
        def batch_errors(batch):
            images, labels = batch
            logits = model.apply(variables, augment.normalize(images, mean, std, dtype), train=False)
            return misclassified(logits, labels)

        local = jnp.sum(jax.lax.map(batch_errors, (split["images"], split["labels"])))
        return jax.lax.psum(local, parallel.AXIS)

    replicated, batch_split = PartitionSpec(), PartitionSpec(None, parallel.AXIS)
    sharded = jax.shard_map(count_errors, mesh=mesh, out_specs=replicated, check_vma=False,
                            in_specs=(replicated, {"images": batch_split, "labels": batch_split}, replicated,
                                      replicated))
    return compiler.jit(sharded, device=mesh.devices.flat[0])


def make_batch_errors(config, model: nn.Module, mesh: Mesh):
    """Jitted (variables, images, labels, mean, std) -> (top-1, top-5 misclassified) of one host
    batch split over the devices; labels -1 (padding) count as neither."""
    dtype = jnp.dtype(config.dtype)

    def batch_errors(variables, images, labels, mean, std):
        logits = model.apply(variables, augment.normalize(images, mean, std, dtype), train=False)
        top5 = jnp.any(jax.lax.top_k(logits, 5)[1] == labels[:, None], axis=-1)
        wrong = jnp.stack([misclassified(logits, labels), jnp.sum(~top5 & (labels >= 0))])
        return jax.lax.psum(wrong, parallel.AXIS)

    replicated, batch_split = PartitionSpec(), PartitionSpec(parallel.AXIS)
    sharded = jax.shard_map(batch_errors, mesh=mesh, out_specs=replicated, check_vma=False,
                            in_specs=(replicated, batch_split, batch_split, replicated, replicated))
    return compiler.jit(sharded, device=mesh.devices.flat[0])


def eval_variables(state: TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}
