"""The training loop: a pure train step, many steps per jitted call, evaluation every epoch.

The whole dataset sits on the device as uint8; each epoch draws a permutation on the device and
every step gathers, normalises and augments its batch inside the jitted loop. Step randomness is
`fold_in(root, step)`, so a run is reproducible from its seed.
"""
import dataclasses
import functools
import logging
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, PartitionSpec

from sd_jax import augment, checkpoints, compiler, data, imagenet, parallel, provenance, records
from sd_jax.config import HOST_FED_DATASETS, ConfigError, resolve_convention, resolve_platform_defaults, validate
from sd_jax.models import ResNetCIFAR, active_blocks, count_params
from sd_jax.resnet_imagenet import ResNetImageNet
from sd_jax.survival import drop_scale

log = logging.getLogger(__name__)


class TrainState(train_state.TrainState):
    batch_stats: Any = None


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """What a run trains besides the config: the model, the optimiser, the step counts, the
    augmentation and the device mesh (no data, no state)."""

    model: nn.Module  # ResNetCIFAR or ResNetImageNet
    tx: optax.GradientTransformation
    num_train: int
    steps_per_epoch: int
    total_steps: int
    translate: int
    flip: bool
    mesh: Mesh


def synchronised_batch_norm(config) -> bool:
    """BatchNorm statistics are averaged over devices unless devices draw their own block gates: a
    collective inside a branch that some devices skip is impossible."""
    return not (config.drop_mode == "block" and config.drop_gates == "per_device")


def make_model(config, num_classes: int, mesh: Optional[Mesh] = None) -> nn.Module:
    """The configured network: `config.model` "resnet_cifar" (the convention's initialisers and
    shortcut) or "resnet_imagenet" (torchvision's), for the data `mesh` (default: every device).
    Keys left at None take their convention's and the mesh platform's defaults, in place. On one
    device BatchNorm gets no axis name: averaging over one device is the identity, and with a
    collective inside every block's cond XLA:CPU spent 0.3 s/step on copies and zero-filled buffers
    around the conds even with every block dropped (ResNet-110, docs/performance.md)."""
    mesh = parallel.make_mesh() if mesh is None else mesh
    resolve_convention(config)
    resolve_platform_defaults(config, mesh.devices.flat[0].platform)
    synchronised = synchronised_batch_norm(config) and mesh.size > 1
    common = dict(depth=config.depth, num_classes=num_classes, p_last=config.p_last,
                  survival_mode=config.survival_mode, drop_mode=config.drop_mode, dtype=jnp.dtype(config.dtype),
                  scan_blocks=config.scan_blocks, bn_axis_name=parallel.AXIS if synchronised else None)
    if config.model == "resnet_imagenet":
        return ResNetImageNet(**common, drop_downsample_blocks=config.drop_downsample_blocks,
                              zero_init_last_bn=config.zero_init_last_bn)
    return ResNetCIFAR(**common, conv_grads=config.conv_grads, bn_scale_init=config.bn_scale_init,
                       conv_init_fan=config.conv_init_fan, classifier_init=config.classifier_init,
                       shortcut_downsample=config.shortcut_downsample)


def steps_per_epoch(num_train: int, batch_size: int, partial_last_batch: bool) -> int:
    """Batches per epoch: with `partial_last_batch` the last, short one is trained too (the authors'
    `split(batchSize)`: 352 for 45k CIFAR images), else dropped (351)."""
    return -(-num_train // batch_size) if partial_last_batch else num_train // batch_size


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate at each global step.

    "step": learning_rate multiplied by lr_decay at the start of each 1-based boundary epoch, as the
    authors' main.lua (`0.1 while epochCounter < 250`): the first step of epoch 250 already runs at
    0.01. "cosine": from learning_rate after the warm-up to 0 at the last step (half a cosine).
    Warm-up ("constant": lr_warmup_value for lr_warmup_epochs, He et al.; "linear": from
    lr_warmup_value up to learning_rate, step by step, Goyal et al.) comes first in both.
    """
    warmup_steps = config.lr_warmup_epochs * steps_per_epoch
    if config.lr_schedule == "step" and config.lr_warmup != "linear":  # one piecewise-constant schedule
        scales = {(int(b) - 1) * steps_per_epoch: config.lr_decay for b in config.lr_boundaries}
        if warmup_steps:
            scales[warmup_steps] = config.learning_rate / config.lr_warmup_value
            return optax.piecewise_constant_schedule(config.lr_warmup_value, dict(sorted(scales.items())))
        return optax.piecewise_constant_schedule(config.learning_rate, scales)
    if config.lr_schedule == "cosine":
        main = optax.cosine_decay_schedule(config.learning_rate, steps_per_epoch * config.num_epochs - warmup_steps)
    else:  # boundaries counted from the end of the warm-up, where join_schedules restarts the count
        main = optax.piecewise_constant_schedule(config.learning_rate, {
            (int(b) - 1) * steps_per_epoch - warmup_steps: config.lr_decay for b in config.lr_boundaries})
    if not warmup_steps:
        return main
    warmup = (optax.linear_schedule(config.lr_warmup_value, config.learning_rate, warmup_steps)
              if config.lr_warmup == "linear" else optax.constant_schedule(config.lr_warmup_value))
    return optax.join_schedules([warmup, main], [warmup_steps])


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum; weight decay on every parameter, as in the paper's Torch code."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum,
                  nesterov=config.nesterov),
    )


def make_plan(config, num_train: int, num_classes: int, translate: int, flip: bool, mesh: Mesh) -> TrainingPlan:
    """The plan for `num_train` training images; `translate` and `flip` are the dataset's
    augmentation defaults (the config may override them). Raises ConfigError for a batch larger
    than the training split."""
    if config.batch_size > num_train:
        raise ConfigError(f"batch_size={config.batch_size} exceeds the {num_train} training images; "
                          f"use a batch size of at most {num_train}")
    epoch_steps = steps_per_epoch(num_train, config.batch_size, config.partial_last_batch)
    return TrainingPlan(
        model=make_model(config, num_classes, mesh),
        tx=make_optimizer(config, epoch_steps),
        num_train=num_train,
        steps_per_epoch=epoch_steps,
        total_steps=epoch_steps * config.num_epochs,
        translate=translate if config.augment_translate is None else config.augment_translate,
        flip=flip if config.augment_flip is None else config.augment_flip,
        mesh=mesh,
    )


def make_train_state(key, plan: TrainingPlan, image_shape) -> TrainState:
    variables = jax.jit(lambda k: plan.model.init(k, jnp.zeros((1,) + tuple(image_shape))))(key)
    state = TrainState.create(apply_fn=plan.model.apply, params=variables["params"],
                              batch_stats=variables["batch_stats"], tx=plan.tx)
    return state.replace(step=jnp.zeros((), jnp.int32))


def run_keys(seed: int) -> dict:
    """Independent root keys for parameter init, shuffling, augmentation and block gates."""
    init, shuffle, augmentation, drop = jax.random.split(jax.random.key(seed), 4)
    return {"init": init, "shuffle": shuffle, "augment": augmentation, "drop": drop}


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


def make_host_train_steps(plan: TrainingPlan, config):
    """Jitted (state, host batches, keys, count) -> (state, summed metrics), the batches decoded on
    the host (ImageNet): {"images": uint8 (K, B, S, S, 3), "labels": (K, B)} split over the devices
    along B, with the normalisation "mean" and "std"; the first `count` of the K batches are trained.
    Flips are drawn on the device from the step, as for device-resident data; the crops were made
    on the host (sd_jax.input_pipeline)."""
    batch = config.batch_size
    dtype = jnp.dtype(config.dtype)

    def batch_of(i, step, host, keys):
        flips = augment.random_draws(jax.random.fold_in(keys["augment"], step), batch, 0, plan.flip)["flips"]
        images = augment.normalize(host["images"][i], host["mean"], host["std"], dtype)
        images = augment.flip(images, this_devices_share(flips, batch, plan.mesh))
        return images, host["labels"][i], None, jnp.float32(batch)

    return make_multi_step(plan, config, batch_of, HOST_BATCH_SPEC, num_extra=0)


def epoch_permutation(keys, epoch: int, plan: TrainingPlan, batch_size: int):
    """The order of the training images in (1-based) `epoch`, padded with index 0 to whole batches."""
    perm = jax.random.permutation(jax.random.fold_in(keys["shuffle"], epoch), plan.num_train)
    return jnp.pad(perm, (0, max(0, plan.steps_per_epoch * batch_size - plan.num_train)))


def device_eval_split(split: data.Split, batch_size: int, mesh: Mesh) -> dict:
    """An evaluation split on the devices, padded to whole batches (padding labelled -1), each batch
    split across the devices."""
    n = len(split)
    batches = -(-n // batch_size)
    pad = batches * batch_size - n
    images = np.concatenate([split.images, np.zeros((pad,) + split.images.shape[1:], np.uint8)])
    labels = np.concatenate([split.labels, -np.ones(pad, np.int32)])
    spec = PartitionSpec(None, parallel.AXIS)
    return {"images": parallel.put(images.reshape((batches, batch_size) + images.shape[1:]), mesh, spec),
            "labels": parallel.put(labels.reshape(batches, batch_size), mesh, spec)}


EVAL_SPLITS = ("val", "test")


def device_eval_data(dataset: data.Dataset, batch_size: int, mesh: Mesh, mean, std) -> dict:
    """What evaluation needs on the devices: the validation and test splits (with their sizes) and
    the input normalisation `mean`, `std` (from the training split: `Dataset.normalization`)."""
    return {"splits": {name: device_eval_split(getattr(dataset, name), batch_size, mesh) for name in EVAL_SPLITS},
            "sizes": {name: len(getattr(dataset, name)) for name in EVAL_SPLITS},
            "mean": parallel.replicate(mean, mesh), "std": parallel.replicate(std, mesh)}


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


def error_rates(count_errors, variables: dict, eval_data: dict) -> dict:
    """{"val_error", "test_error"}: percent misclassified by the model `variables` (the one
    evaluation loop: training, sd_jax.evaluate and sd_jax.interop)."""
    return {f"{name}_error": 100.0 * float(count_errors(variables, split, eval_data["mean"], eval_data["std"]))
            / eval_data["sizes"][name] for name, split in eval_data["splits"].items()}


def eval_variables(state: TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


class TrainingDiverged(FloatingPointError):
    """The training loss stopped being finite; the message names the epoch and steps."""


@dataclasses.dataclass
class Experiment:
    """Everything built from a config before training: the dataset and its device copies, the
    plan, the random keys and the initial state."""

    config: ml_collections.ConfigDict
    dataset: data.Dataset
    plan: TrainingPlan
    keys: dict
    state: TrainState
    train_data: dict
    eval_data: dict


def make_experiment(config: ml_collections.ConfigDict) -> Experiment:
    """Load the data onto the devices and build the plan and the initial state (the convention keys
    of `config` left at None are set from its convention). Every check that needs the data (batch
    size, number of classes) raises ConfigError here, before anything is written."""
    resolve_convention(config)
    host_fed = config.dataset in HOST_FED_DATASETS
    dataset = imagenet.load(config) if host_fed else data.load_dataset(config.dataset, config.data_dir,
                                                                        config.data_source)
    if config.num_classes is not None and config.num_classes != dataset.num_classes:
        raise ConfigError(f"num_classes={config.num_classes} but {dataset.name} has {dataset.num_classes} "
                          "classes; leave num_classes unset to take it from the dataset")
    mesh = parallel.make_mesh()
    plan = make_plan(config, len(dataset.train), dataset.num_classes, dataset.translate, dataset.flip, mesh)
    keys = parallel.replicate(run_keys(config.seed), mesh)
    state = parallel.replicate(make_train_state(keys["init"], plan, dataset.image_shape), mesh)
    mean, std = dataset.normalization(config.normalization)
    if host_fed:  # the images stay on the host: sd_jax.input_pipeline feeds them (HostFeed)
        return Experiment(config, dataset, plan, keys, state, parallel.replicate({"mean": mean, "std": std}, mesh),
                          None)
    train_data = parallel.replicate({"images": dataset.train.images, "labels": dataset.train.labels,
                                     "mean": mean, "std": std}, mesh)
    eval_data = device_eval_data(dataset, config.eval_batch_size, mesh, mean, std)
    return Experiment(config, dataset, plan, keys, state, train_data, eval_data)


def evaluation_steps(total_steps: int, steps_per_epoch: int, eval_every_steps: int) -> list:
    """The global step counts after which the run evaluates: every epoch's end, or every
    `eval_every_steps` steps (the authors' SVHN accounting: every 200 iterations) and the last step."""
    every = eval_every_steps or steps_per_epoch
    steps = list(range(every, total_steps + 1, every))
    return steps if steps and steps[-1] == total_steps else steps + [total_steps]


def epoch_of(step: int, steps_per_epoch: int):
    """Epochs done after `step` steps: an int at an epoch's end, else a fraction (4 decimals)."""
    return step // steps_per_epoch if step % steps_per_epoch == 0 else round(step / steps_per_epoch, 4)


class DeviceFeed:
    """Training and evaluation on a dataset resident on the devices (CIFAR, SVHN): each call
    gathers its batches there from the epoch's permutation."""

    def __init__(self, experiment: Experiment):
        self.experiment = experiment
        self.train_steps = make_train_steps(experiment.plan, experiment.config)
        self.count_errors = make_count_errors(experiment.config, experiment.plan.model, experiment.plan.mesh)
        self.permutations = {}

    def permutation(self, epoch: int):
        if epoch not in self.permutations:
            self.permutations = {epoch: epoch_permutation(self.experiment.keys, epoch, self.experiment.plan,
                                                          self.experiment.config.batch_size)}
        return self.permutations[epoch]

    def compile(self, state: TrainState) -> None:
        self.train_steps = self.train_steps.lower(state, self.experiment.train_data, self.experiment.keys,
                                                  self.permutation(0), 0, 1).compile()

    def train(self, state: TrainState, epoch: int, first: int, count: int):
        """`count` steps from step `first` (0-based) of `epoch` (1-based): (state, summed metrics)."""
        return self.train_steps(state, self.experiment.train_data, self.experiment.keys, self.permutation(epoch),
                                first, count)

    def error_rates(self, variables: dict) -> dict:
        return error_rates(self.count_errors, variables, self.experiment.eval_data)


class HostFeed:
    """Training and evaluation on batches decoded on the host (ImageNet, sd_jax.input_pipeline):
    `steps_per_call` batches stacked per jitted call. The pipeline restarts wherever the loop asks
    (a resumed run), and its order and crops depend on (seed, epoch, index) only, so a resumed run
    trains on exactly the uninterrupted run's batches."""

    def __init__(self, experiment: Experiment):
        # TensorFlow loads only for host-fed data: it costs seconds at start, and PyTorch's triton
        # imported after it in the same process (the parity tests) crashes.
        from sd_jax import input_pipeline

        self.pipeline = input_pipeline
        self.experiment, self.config, self.plan = experiment, experiment.config, experiment.plan
        self.train_steps = make_host_train_steps(self.plan, self.config)
        self.batch_errors = make_batch_errors(self.config, self.plan.model, self.plan.mesh)
        self.batches, self.position = None, None  # the open epoch's batches, and the (epoch, step) they yield next

    def host_arrays(self, images, labels) -> dict:
        """Global device arrays from this process's stacked batches (K, local, ...), split along the batch."""
        chunk, spec = (self.config.steps_per_call, self.config.batch_size), HOST_BATCH_SPEC["images"]
        return {"images": parallel.put_process_local(images, self.plan.mesh, spec,
                                                     chunk + self.experiment.dataset.image_shape),
                "labels": parallel.put_process_local(labels, self.plan.mesh, spec, chunk),
                **{k: self.experiment.train_data[k] for k in ("mean", "std")}}

    def local_chunk(self):
        local = self.config.batch_size // jax.process_count()
        return (np.zeros((self.config.steps_per_call, local) + self.experiment.dataset.image_shape, np.uint8),
                np.zeros((self.config.steps_per_call, local), np.int32))

    def compile(self, state: TrainState) -> None:
        self.train_steps = self.train_steps.lower(state, self.host_arrays(*self.local_chunk()), self.experiment.keys,
                                                  1).compile()

    def train(self, state: TrainState, epoch: int, first: int, count: int):
        if self.position != (epoch, first):
            split = self.experiment.dataset.train
            indices, dataset = self.pipeline.train_batches(
                split, self.config.seed, epoch, self.config.batch_size, self.experiment.dataset.image_size,
                jax.process_index(), jax.process_count(), start_step=first, threads=self.experiment.dataset.threads)
            self.batches = self.pipeline.numpy_batches(split, indices, dataset)
        images, labels = self.local_chunk()
        for i in range(count):
            images[i], labels[i] = next(self.batches)
        self.position = (epoch, first + count)
        return self.train_steps(state, self.host_arrays(images, labels), self.experiment.keys, count)

    def error_rates(self, variables: dict) -> dict:
        """Top-1 and top-5 error (percent) on the minival ("val") and the official validation images ("test")."""
        dataset, batch, rates = self.experiment.dataset, self.config.eval_batch_size, {}
        put = lambda x: parallel.put_process_local(x, self.plan.mesh, PartitionSpec(parallel.AXIS),  # noqa: E731
                                                   (batch,) + x.shape[1:])
        for name in ("val", "test"):
            split = getattr(dataset, name)
            indices, batches = self.pipeline.eval_batches(split, batch, dataset.image_size, jax.process_index(),
                                                           jax.process_count(), dataset.threads)
            wrong = np.zeros(2)
            for images, labels in self.pipeline.numpy_batches(split, indices, batches):
                wrong += np.asarray(self.batch_errors(variables, put(images), put(labels),
                                                      self.experiment.train_data["mean"],
                                                      self.experiment.train_data["std"]))
            rates[f"{name}_error"], rates[f"{name}_top5_error"] = (100.0 * wrong / len(split)).tolist()
        return rates


def make_feed(experiment: Experiment):
    """The experiment's feed: from the host for ImageNet, else from the device-resident dataset."""
    return HostFeed(experiment) if experiment.config.dataset in HOST_FED_DATASETS else DeviceFeed(experiment)


class Trainer:
    """The phases of a run after setup: train up to the next evaluation, evaluate, record, log."""

    def __init__(self, experiment: Experiment, workdir: records.Workdir, ckpts: checkpoints.Checkpoints, feed):
        self.experiment, self.config, self.plan = experiment, experiment.config, experiment.plan
        self.workdir, self.ckpts, self.feed = workdir, ckpts, feed
        self.schedule = learning_rate_schedule(self.config, self.plan.steps_per_epoch)

    def train_until(self, state: TrainState, stop: int):
        """Train from `state.step` up to global step `stop` in chunks of at most `steps_per_call`
        steps that never cross an epoch's end; (state, summed train metrics)."""
        spe, total = self.plan.steps_per_epoch, self.plan.total_steps
        totals = dict.fromkeys(TRAIN_METRICS, 0.0)
        step, last_log = int(state.step), time.perf_counter()
        started = last_log
        while step < stop:
            epoch, first = step // spe + 1, step % spe
            count = min(self.config.steps_per_call, stop - step, spe - first)
            state, sums = self.feed.train(state, epoch, first, count)
            sums = {k: float(v) for k, v in jax.device_get(sums).items()}
            if not np.isfinite(sums["loss"]):
                raise TrainingDiverged(
                    f"training loss became {sums['loss']} in epoch {epoch}, steps {first + 1}-{first + count} "
                    f"of {spe}; the checkpoints before it are kept. "
                    "Lower learning_rate (and start over with --restart) or check the data")
            totals = {k: totals[k] + sums[k] for k in totals}
            step += count
            if time.perf_counter() - last_log > 30 and step < stop:
                last_log = time.perf_counter()
                log.info("epoch %d: step %d/%d (%d/%d in all), loss %.4f, %.0f img/s", epoch,
                         step - (epoch - 1) * spe, spe, step, total, totals["loss"] / totals["images"],
                         totals["images"] / (last_log - started))
        return state, totals

    def evaluate(self, state: TrainState, totals: dict, lr: float, seconds: float) -> dict:
        """One line of metrics.jsonl: training metrics since the previous line, then evaluation."""
        step = int(state.step)
        return {
            "epoch": epoch_of(step, self.plan.steps_per_epoch),
            "step": step,
            "train_loss": totals["loss"] / totals["images"],
            "train_error": 100.0 * totals["errors"] / totals["images"],
            **self.feed.error_rates(eval_variables(state)),
            "lr": lr,
            "epoch_time_s": seconds,
            "images_per_s": totals["images"] / seconds,
            "mean_active_blocks": totals["active_blocks"] / totals["steps"],
        }

    def record(self, state: TrainState, line: dict, history: list) -> None:
        """Append the line; checkpoint at the checkpoint cadence and whenever the line is the best."""
        self.workdir.append_metrics(line)
        history.append(line)
        step, spe = line["step"], self.plan.steps_per_epoch
        on_cadence = (self.config.eval_every_steps or step % (self.config.checkpoint_every_epochs * spe) == 0
                      or step == self.plan.total_steps)
        if on_cadence or records.best_line(history) is line:
            self.ckpts.save(state, line)

    def log_line(self, line: dict) -> None:
        progress = (f"epoch {line['epoch']}/{self.config.num_epochs}" if not self.config.eval_every_steps else
                    f"step {line['step']}/{self.plan.total_steps} (epoch {line['epoch']:.2f})")
        top5 = (f" (top-5 {line['val_top5_error']:.2f}% / {line['test_top5_error']:.2f}%)"
                if "val_top5_error" in line else "")
        log.info("%s  loss %.4f  train %.2f%%  val %.2f%%  test %.2f%%%s  lr %.4g  %.1f s (%.0f img/s)  "
                 "active blocks %.1f/%d", progress, line["train_loss"], line["train_error"], line["val_error"],
                 line["test_error"], top5, line["lr"], line["epoch_time_s"], line["images_per_s"],
                 line["mean_active_blocks"], self.plan.model.num_blocks)

    def fit(self, state: TrainState, history: list) -> TrainState:
        """Train from `state.step` to the end, evaluating, recording and logging at every evaluation step."""
        try:
            for stop in evaluation_steps(self.plan.total_steps, self.plan.steps_per_epoch,
                                         self.config.eval_every_steps):
                if stop <= int(state.step):
                    continue
                lr = float(f"{float(self.schedule(int(state.step))):.7g}")  # float32 -> the config's decimal
                start = time.perf_counter()
                state, totals = self.train_until(state, stop)
                line = self.evaluate(state, totals, lr, time.perf_counter() - start)
                self.record(state, line, history)
                self.log_line(line)
        finally:
            self.ckpts.wait()
            self.ckpts.close()
        return state


def warn_if_accelerator_idle() -> None:
    """Say prominently, before any work, when the machine has a GPU or TPU that JAX does not use."""
    idle = provenance.idle_accelerator()
    if idle:
        log.warning("\n%s\n!! This machine has %s, but JAX runs on the CPU (a CPU-only jaxlib): training would be "
                    "very slow.\n!! Stop it (Ctrl-C) and run: %s\n%s", "!" * 72, idle[0], idle[1], "!" * 72)


def log_start(experiment: Experiment, ran_on: dict) -> None:
    """What is about to train, and on what (`ran_on`: `provenance.provenance()`)."""
    config, plan, dataset = experiment.config, experiment.plan, experiment.dataset
    log.info("%s: %d train / %d val / %d test images; ResNet-%d, %d parameters, %d blocks, %.2f expected "
             "active; %d steps/epoch on %d x %s", dataset.name, len(dataset.train), len(dataset.val),
             len(dataset.test), config.depth, count_params(experiment.state.params), plan.model.num_blocks,
             float(plan.model.survival_probabilities().sum()),
             plan.steps_per_epoch, plan.mesh.size, jax.devices()[0].device_kind)
    log.info("on %s; %s; commit %s", provenance.hardware(ran_on),
             ", ".join(f"{name} {version}" for name, version in ran_on["versions"].items()), ran_on["git_commit"])


def resume(experiment: Experiment, workdir: records.Workdir, ckpts: checkpoints.Checkpoints):
    """(state, metrics history) to continue from: the latest checkpoint's, or the initial state."""
    state = experiment.state
    restored = ckpts.restore(state)
    if restored is not None:
        state, meta = restored
        log.info("resuming from the checkpoint of epoch %s (step %d)", meta["epoch"], int(state.step))
    return state, workdir.truncate_metrics(int(state.step))


def compile_steps(experiment: Experiment, state: TrainState):
    """(the experiment's feed with its train step compiled for the run's shapes, seconds taken)."""
    start = time.perf_counter()
    feed = make_feed(experiment)
    feed.compile(state)
    seconds = time.perf_counter() - start
    log.info("compiled the train step in %.1f s", seconds)
    return feed, seconds


def finish(experiment: Experiment, workdir: records.Workdir, history: list, compile_s: float,
           wall_start: float, ran_on: dict) -> dict:
    """Write and return summary.json: the paper's number (test error at best validation), costs and
    what the run ran on."""
    config, plan = experiment.config, experiment.plan
    summary = records.summarize(history)
    summary.update(num_params=count_params(experiment.state.params), compile_s=compile_s,
                   provenance=ran_on,
                   expected_active_blocks=float(plan.model.survival_probabilities().sum()),
                   wall_time_s=time.perf_counter() - wall_start)
    workdir.write_summary(summary)
    log.info("test error at best validation (epoch %s): %.2f%%; final test error %.2f%%",
             summary["best_val_epoch"], summary["test_error_at_best_val"], summary["final_test_error"])
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, restart: bool = False) -> dict:
    """Train as `config` says, writing config.json, metrics.jsonl, summary.json and checkpoints to
    `workdir`. A workdir holding an earlier run of the same config is resumed from its latest
    checkpoint; `restart` deletes the earlier run instead. Nothing is written until the config,
    the workdir and the data have passed every check."""
    warn_if_accelerator_idle()
    validate(config, data.DATASETS, jax.device_count())
    resolve_convention(config)
    resolve_platform_defaults(config, jax.devices()[0].platform)
    compiler.use_compilation_cache(config.compilation_cache_dir)
    run_files = records.Workdir(workdir, parallel.is_primary())
    run_files.check(config, restart)
    wall_start = time.perf_counter()
    experiment = make_experiment(config)
    run_files.start(config, restart)
    ran_on = provenance.provenance()  # once: it asks git for the commit
    log_start(experiment, ran_on)
    ckpts = checkpoints.Checkpoints(workdir)
    state, history = resume(experiment, run_files, ckpts)
    feed, compile_s = compile_steps(experiment, state)
    Trainer(experiment, run_files, ckpts, feed).fit(state, history)
    return finish(experiment, run_files, history, compile_s, wall_start, ran_on)


# Old names, kept for code that imports them.
Setup, Run = TrainingPlan, Experiment
build_model, create_train_state, prepare_run = make_model, make_train_state, make_experiment
