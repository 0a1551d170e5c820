"""The training loop: a pure train step, many steps per jitted call, evaluation every epoch.

The whole dataset sits on the device as uint8; each epoch draws a permutation on the device and
every step gathers, normalises and augments its batch inside the jitted loop. Step randomness is
`fold_in(root, step)`, so a run is reproducible from its seed.
"""
import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sd_jax import augment, checkpoints, compiler, data, parallel, records
from sd_jax.config import ConfigError, validate
from sd_jax.models import ResNetCIFAR, active_blocks, count_params
from sd_jax.schedules import drop_scale, expected_active_blocks

log = logging.getLogger(__name__)


class TrainState(train_state.TrainState):
    batch_stats: Any = None


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run needs besides the config: the model, the optimiser and the data geometry."""

    model: ResNetCIFAR
    tx: optax.GradientTransformation
    steps_per_epoch: int
    total_steps: int
    translate: int
    flip: bool
    mesh: Mesh


def synchronised_batch_norm(config) -> bool:
    """BatchNorm statistics are averaged over devices unless devices draw their own block gates: a
    collective inside a branch that some devices skip is impossible."""
    return not (config.drop_mode == "block" and config.drop_gates == "per_device")


def build_model(config, num_classes: int) -> ResNetCIFAR:
    """The configured network. On one device BatchNorm gets no axis name: averaging over one device
    is the identity, and with a collective inside every block's cond XLA:CPU spent 0.3 s/step on
    copies and zero-filled buffers around the conds even with every block dropped (ResNet-110,
    docs/performance.md)."""
    synchronised = synchronised_batch_norm(config) and jax.device_count() > 1
    return ResNetCIFAR(
        depth=config.depth, num_classes=num_classes, p_last=config.p_last, mode=config.survival_mode,
        drop_mode=config.drop_mode, dtype=jnp.dtype(config.dtype), scan_blocks=config.scan_blocks,
        conv_grads=config.conv_grads, bn_axis_name=parallel.AXIS if synchronised else None,
    )


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """Piecewise-constant: learning_rate (after lr_warmup_epochs at lr_warmup_value), multiplied by
    lr_decay at each boundary epoch."""
    scales = {int(b) * steps_per_epoch: config.lr_decay for b in config.lr_boundaries}
    if config.lr_warmup_epochs:
        scales[config.lr_warmup_epochs * steps_per_epoch] = config.learning_rate / config.lr_warmup_value
        return optax.piecewise_constant_schedule(config.lr_warmup_value, dict(sorted(scales.items())))
    return optax.piecewise_constant_schedule(config.learning_rate, scales)


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum; weight decay on every parameter, as in the paper's Torch code."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum,
                  nesterov=config.nesterov),
    )


def make_setup(config, dataset: data.Dataset, mesh: Mesh) -> Setup:
    steps_per_epoch = len(dataset.train) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {len(dataset.train)} training images")
    return Setup(
        model=build_model(config, dataset.num_classes),
        tx=make_optimizer(config, steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * config.num_epochs,
        translate=dataset.translate if config.augment_translate is None else config.augment_translate,
        flip=dataset.flip if config.augment_flip is None else config.augment_flip,
        mesh=mesh,
    )


def create_train_state(key, setup: Setup, image_shape) -> TrainState:
    variables = jax.jit(lambda k: setup.model.init(k, jnp.zeros((1,) + tuple(image_shape))))(key)
    state = TrainState.create(apply_fn=setup.model.apply, params=variables["params"],
                              batch_stats=variables["batch_stats"], tx=setup.tx)
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


def train_step(state: TrainState, images, labels, keys, setup: Setup, config):
    """One SGD step on this device's share of the batch, inside `shard_map` over the "data" axis.

    Gradients are averaged over devices (BatchNorm statistics too, see `synchronised_batch_norm`);
    returns the new state and the batch's metrics summed over devices.
    """
    step = state.step
    scale = drop_scale(step, setup.total_steps, config.drop_warmup)
    drop_key = device_drop_key(keys, step, config)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True, drop_scale=scale,
            rngs={"drop": drop_key}, mutable=["batch_stats", "gates"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, parallel.AXIS)
    batch_stats = updates["batch_stats"]
    if not synchronised_batch_norm(config):
        batch_stats = jax.lax.pmean(batch_stats, parallel.AXIS)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {
        "loss": jax.lax.psum(loss * labels.shape[0], parallel.AXIS),
        "errors": jax.lax.psum(jnp.sum(jnp.argmax(logits, -1) != labels).astype(jnp.float32), parallel.AXIS),
        "active_blocks": jax.lax.pmean(active_blocks(updates["gates"]).astype(jnp.float32), parallel.AXIS),
        "steps": jnp.float32(1.0),
    }
    return state, metrics


def make_train_steps(setup: Setup, config):
    """Jitted (state, train data, keys, epoch permutation, first, count) -> (state, summed metrics).

    Runs `count` consecutive steps of the epoch starting at its step `first` in one device loop;
    both are traced, so every chunk length shares one compilation. Each device takes its slice of
    every global batch (and of the batch's random augmentation draws) from the replicated dataset,
    so the result does not depend on the number of devices.
    """
    batch = config.batch_size
    local = batch // setup.mesh.size
    dtype = jnp.dtype(config.dtype)

    def train_steps(state, train, keys, perm, first, count):
        device = jax.lax.axis_index(parallel.AXIS)
        mine = lambda x: jax.lax.dynamic_slice_in_dim(x, device * local, local)

        def body(i, carry):
            state, sums = carry
            indices = jax.lax.dynamic_slice(perm, ((first + i) * batch,), (batch,))
            draws = augment.random_draws(jax.random.fold_in(keys["augment"], state.step), batch,
                                         setup.translate, setup.flip)
            images, labels = augment.training_batch(
                train["images"], train["labels"], mine(indices), jax.tree.map(mine, draws), train["mean"],
                train["std"], setup.translate, dtype)
            state, metrics = train_step(state, images, labels, keys, setup, config)
            return state, jax.tree.map(jnp.add, sums, metrics)

        zeros = {k: jnp.float32(0.0) for k in ("loss", "errors", "active_blocks", "steps")}
        return jax.lax.fori_loop(0, count, body, (state, zeros))

    replicated = PartitionSpec()
    sharded = jax.shard_map(train_steps, mesh=setup.mesh, in_specs=(replicated,) * 6,
                            out_specs=(replicated, replicated), check_vma=False)
    return compiler.jit(sharded, donate_argnums=0)


def epoch_permutation(keys, epoch, num_train: int):
    return jax.random.permutation(jax.random.fold_in(keys["shuffle"], epoch), num_train)


def device_eval_split(split: data.Split, batch_size: int, mesh: Mesh) -> dict:
    """An evaluation split on the devices, padded to whole batches (padding labelled -1), each batch
    split across the devices."""
    n = len(split)
    batches = -(-n // batch_size)
    pad = batches * batch_size - n
    images = np.concatenate([split.images, np.zeros((pad,) + split.images.shape[1:], np.uint8)])
    labels = np.concatenate([split.labels, -np.ones(pad, np.int32)])
    sharding = NamedSharding(mesh, PartitionSpec(None, parallel.AXIS))
    return {"images": jax.device_put(images.reshape((batches, batch_size) + images.shape[1:]), sharding),
            "labels": jax.device_put(labels.reshape(batches, batch_size), sharding)}


def make_count_errors(config, model: ResNetCIFAR, mesh: Mesh):
    """Jitted (variables, eval split, mean, std) -> number of misclassified images (eval mode)."""
    dtype = jnp.dtype(config.dtype)

    def count_errors(variables, split, mean, std):
        def batch_errors(batch):
            images, labels = batch
            logits = model.apply(variables, augment.normalize(images, mean, std, dtype), train=False)
            return jnp.sum((jnp.argmax(logits, -1) != labels) & (labels >= 0))

        local = jnp.sum(jax.lax.map(batch_errors, (split["images"], split["labels"])))
        return jax.lax.psum(local, parallel.AXIS)

    replicated, batch_split = PartitionSpec(), PartitionSpec(None, parallel.AXIS)
    sharded = jax.shard_map(count_errors, mesh=mesh, out_specs=replicated, check_vma=False,
                            in_specs=(replicated, {"images": batch_split, "labels": batch_split}, replicated,
                                      replicated))
    return compiler.jit(sharded)


def eval_variables(state: TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


class TrainingDiverged(FloatingPointError):
    """The training loss stopped being finite; the message names the epoch and steps."""


@dataclasses.dataclass
class Run:
    """Everything built from a config before training: data on the device, model, initial state."""

    config: ml_collections.ConfigDict
    dataset: data.Dataset
    setup: Setup
    keys: dict
    state: TrainState
    train: dict
    evals: dict

    def error_rates(self, count_errors, state: TrainState) -> dict:
        """Validation and test error (percent) of `state`."""
        variables = eval_variables(state)
        return {name: 100.0 * float(count_errors(variables, split, self.train["mean"], self.train["std"]))
                / len(getattr(self.dataset, name)) for name, split in self.evals.items()}


def prepare_run(config: ml_collections.ConfigDict) -> Run:
    """Load the data onto the device and build the model, optimiser and initial state."""
    dataset = data.load_dataset(config.dataset, config.data_dir, config.data_source)
    if config.num_classes is not None and config.num_classes != dataset.num_classes:
        raise ConfigError(f"num_classes={config.num_classes} but {dataset.name} has {dataset.num_classes} "
                          "classes; leave num_classes unset to take it from the dataset")
    mesh = parallel.make_mesh()
    setup = make_setup(config, dataset, mesh)
    keys = parallel.replicate(run_keys(config.seed), mesh)
    state = parallel.replicate(create_train_state(keys["init"], setup, dataset.train.images.shape[1:]), mesh)
    train = parallel.replicate({"images": dataset.train.images, "labels": dataset.train.labels,
                                "mean": dataset.mean, "std": dataset.std}, mesh)
    evals = {"val": device_eval_split(dataset.val, config.eval_batch_size, mesh),
             "test": device_eval_split(dataset.test, config.eval_batch_size, mesh)}
    return Run(config, dataset, setup, keys, state, train, evals)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, restart: bool = False) -> dict:
    """Train as `config` says, writing config.json, metrics.jsonl, summary.json and checkpoints to
    `workdir`. A workdir holding an earlier run of the same config is resumed from its latest
    checkpoint; `restart` deletes the earlier run instead."""
    validate(config, data.DATASETS, jax.device_count())
    run_dir = records.RunDir(workdir, parallel.is_primary())
    run_dir.start(config, restart)
    wall_start = time.perf_counter()
    run = prepare_run(config)
    setup, state = run.setup, run.state
    num_params = count_params(state.params)
    expected_active = expected_active_blocks(setup.model.num_blocks, config.p_last, config.survival_mode)
    log.info("%s: %d train / %d val / %d test images; ResNet-%d, %d parameters, %d blocks, "
             "%.2f expected active; %d steps/epoch on %d x %s", run.dataset.name, len(run.dataset.train),
             len(run.dataset.val), len(run.dataset.test), config.depth, num_params, setup.model.num_blocks,
             expected_active, setup.steps_per_epoch, setup.mesh.size, jax.devices()[0].device_kind)

    ckpts = checkpoints.Checkpoints(workdir)
    restored = ckpts.restore(state)
    start_epoch = 1
    if restored is not None:
        state, meta = restored
        start_epoch = meta["epoch"] + 1
        log.info("resuming from the checkpoint of epoch %d (step %d)", meta["epoch"], int(state.step))
    history = run_dir.truncate_metrics(start_epoch - 1)

    compile_start = time.perf_counter()
    num_train = len(run.dataset.train)
    train_steps = make_train_steps(setup, config).lower(
        state, run.train, run.keys, epoch_permutation(run.keys, 0, num_train), 0, 1).compile()
    count_errors = make_count_errors(config, setup.model, setup.mesh)
    compile_s = time.perf_counter() - compile_start
    log.info("compiled the train step in %.1f s", compile_s)

    schedule = learning_rate_schedule(config, setup.steps_per_epoch)
    chunk = min(config.steps_per_call, setup.steps_per_epoch)
    best_val = min((line["val_error"] for line in history), default=float("inf"))
    try:
        for epoch in range(start_epoch, config.num_epochs + 1):
            lr = float(f"{float(schedule(int(state.step))):.7g}")  # float32 -> the decimal the config gave
            perm = epoch_permutation(run.keys, epoch, num_train)
            epoch_start = last_log = time.perf_counter()
            totals = dict.fromkeys(("loss", "errors", "active_blocks", "steps"), 0.0)
            for first in range(0, setup.steps_per_epoch, chunk):
                count = min(chunk, setup.steps_per_epoch - first)
                state, sums = train_steps(state, run.train, run.keys, perm, first, count)
                sums = {k: float(v) for k, v in jax.device_get(sums).items()}
                if not np.isfinite(sums["loss"]):
                    raise TrainingDiverged(
                        f"training loss became {sums['loss']} in epoch {epoch}, steps {first + 1}-{first + count} "
                        f"of {setup.steps_per_epoch}; the checkpoints of the epochs before it are kept. "
                        "Lower learning_rate (and start over with --restart) or check the data")
                totals = {k: totals[k] + sums[k] for k in totals}
                if time.perf_counter() - last_log > 30 and first + count < setup.steps_per_epoch:
                    last_log = time.perf_counter()
                    log.info("epoch %d: step %d/%d, loss %.4f", epoch, first + count, setup.steps_per_epoch,
                             totals["loss"] / (totals["steps"] * config.batch_size))
            epoch_time = time.perf_counter() - epoch_start
            images_seen = totals["steps"] * config.batch_size
            errors = run.error_rates(count_errors, state)
            line = {
                "epoch": epoch,
                "train_loss": totals["loss"] / images_seen,
                "train_error": 100.0 * totals["errors"] / images_seen,
                "val_error": errors["val"],
                "test_error": errors["test"],
                "lr": lr,
                "epoch_time_s": epoch_time,
                "images_per_s": images_seen / epoch_time,
                "mean_active_blocks": totals["active_blocks"] / totals["steps"],
            }
            run_dir.append_metrics(line)
            history.append(line)
            if epoch % config.checkpoint_every_epochs == 0 or epoch == config.num_epochs:
                ckpts.save(checkpoints.LATEST, epoch, state, line["val_error"])
            if line["val_error"] <= best_val:  # ties go to the later epoch, as in records.summarize
                best_val = line["val_error"]
                ckpts.save(checkpoints.BEST, epoch, state, line["val_error"])
            log.info("epoch %d/%d  loss %.4f  train %.2f%%  val %.2f%%  test %.2f%%  lr %.4g  %.1f s "
                     "(%.0f img/s)  active blocks %.1f/%d", epoch, config.num_epochs, line["train_loss"],
                     line["train_error"], line["val_error"], line["test_error"], lr, epoch_time,
                     line["images_per_s"], line["mean_active_blocks"], setup.model.num_blocks)
    finally:
        ckpts.wait()
        ckpts.close()

    summary = records.summarize(history)
    summary.update(num_params=num_params, expected_active_blocks=expected_active, compile_s=compile_s,
                   wall_time_s=time.perf_counter() - wall_start)
    run_dir.write_summary(summary)
    log.info("test error at best validation (epoch %d): %.2f%%; final test error %.2f%%",
             summary["best_val_epoch"], summary["test_error_at_best_val"], summary["final_test_error"])
    return summary
