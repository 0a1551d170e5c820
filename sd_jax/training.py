"""The training loop: a pure train step, many steps per jitted call, evaluation every epoch.

The whole dataset sits on the device as uint8; each epoch draws a permutation on the device and
every step gathers, normalises and augments its batch inside the jitted loop. Step randomness is
`fold_in(root, step)`, so a run is reproducible from its seed.
"""
import dataclasses
import functools
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from sd_jax import augment, checkpoints, data, records
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


def build_model(config, num_classes: int) -> ResNetCIFAR:
    return ResNetCIFAR(
        depth=config.depth, num_classes=num_classes, p_last=config.p_last, mode=config.survival_mode,
        drop_mode=config.drop_mode, dtype=jnp.dtype(config.dtype), scan_blocks=config.scan_blocks,
        conv_grads=config.conv_grads,
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


def make_setup(config, dataset: data.Dataset) -> Setup:
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


def train_step(state: TrainState, images, labels, keys, setup: Setup, config):
    """One SGD step on one batch; returns the new state and summed metrics of the batch."""
    step = state.step
    scale = drop_scale(step, setup.total_steps, config.drop_warmup)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True, drop_scale=scale,
            rngs={"drop": jax.random.fold_in(keys["drop"], step)}, mutable=["batch_stats", "gates"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
    n = labels.shape[0]
    metrics = {
        "loss": loss * n,
        "errors": jnp.sum(jnp.argmax(logits, -1) != labels).astype(jnp.float32),
        "active_blocks": active_blocks(updates["gates"]).astype(jnp.float32),
        "steps": jnp.float32(1.0),
    }
    return state, metrics


def make_train_steps(setup: Setup, config):
    """Jitted (state, train data, epoch permutation, first, count) -> (state, summed metrics).

    Runs `count` consecutive steps of the epoch starting at its step `first` in one device loop;
    both are traced, so every chunk length shares one compilation.
    """
    batch = config.batch_size
    dtype = jnp.dtype(config.dtype)

    def train_steps(state, train, keys, perm, first, count):
        def body(i, carry):
            state, sums = carry
            indices = jax.lax.dynamic_slice(perm, ((first + i) * batch,), (batch,))
            images, labels = augment.training_batch(
                jax.random.fold_in(keys["augment"], state.step), train["images"], train["labels"], indices,
                train["mean"], train["std"], setup.translate, setup.flip, dtype)
            state, metrics = train_step(state, images, labels, keys, setup, config)
            return state, jax.tree.map(jnp.add, sums, metrics)

        zeros = {k: jnp.float32(0.0) for k in ("loss", "errors", "active_blocks", "steps")}
        return jax.lax.fori_loop(0, count, body, (state, zeros))

    return jax.jit(train_steps, donate_argnums=0)


def epoch_permutation(keys, epoch, num_train: int):
    return jax.random.permutation(jax.random.fold_in(keys["shuffle"], epoch), num_train)


def device_eval_split(split: data.Split, batch_size: int) -> dict:
    """An evaluation split on the device, padded to whole batches (padding labelled -1)."""
    n = len(split)
    batches = -(-n // batch_size)
    pad = batches * batch_size - n
    images = np.concatenate([split.images, np.zeros((pad,) + split.images.shape[1:], np.uint8)])
    labels = np.concatenate([split.labels, -np.ones(pad, np.int32)])
    return {"images": jnp.asarray(images.reshape((batches, batch_size) + images.shape[1:])),
            "labels": jnp.asarray(labels.reshape(batches, batch_size))}


def make_count_errors(config, model: ResNetCIFAR):
    """Jitted (variables, eval split, mean, std) -> number of misclassified images (eval mode)."""
    dtype = jnp.dtype(config.dtype)

    def count_errors(variables, split, mean, std):
        def batch_errors(batch):
            images, labels = batch
            logits = model.apply(variables, augment.normalize(images, mean, std, dtype), train=False)
            return jnp.sum((jnp.argmax(logits, -1) != labels) & (labels >= 0))

        return jnp.sum(jax.lax.map(batch_errors, (split["images"], split["labels"])))

    return jax.jit(count_errors)


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
    setup = make_setup(config, dataset)
    keys = run_keys(config.seed)
    state = create_train_state(keys["init"], setup, dataset.train.images.shape[1:])
    train = {"images": jnp.asarray(dataset.train.images), "labels": jnp.asarray(dataset.train.labels),
             "mean": jnp.asarray(dataset.mean), "std": jnp.asarray(dataset.std)}
    evals = {"val": device_eval_split(dataset.val, config.eval_batch_size),
             "test": device_eval_split(dataset.test, config.eval_batch_size)}
    return Run(config, dataset, setup, keys, state, train, evals)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, restart: bool = False) -> dict:
    """Train as `config` says, writing config.json, metrics.jsonl, summary.json and checkpoints to
    `workdir`. A workdir holding an earlier run of the same config is resumed from its latest
    checkpoint; `restart` deletes the earlier run instead."""
    validate(config, data.DATASETS)
    run_dir = records.RunDir(workdir)
    run_dir.start(config, restart)
    wall_start = time.perf_counter()
    run = prepare_run(config)
    setup, state = run.setup, run.state
    num_params = count_params(state.params)
    expected_active = expected_active_blocks(setup.model.num_blocks, config.p_last, config.survival_mode)
    log.info("%s: %d train / %d val / %d test images; ResNet-%d, %d parameters, %d blocks, "
                 "%.2f expected active; %d steps/epoch on %s", run.dataset.name, len(run.dataset.train),
                 len(run.dataset.val), len(run.dataset.test), config.depth, num_params, setup.model.num_blocks,
                 expected_active, setup.steps_per_epoch, jax.devices()[0].device_kind)

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
    count_errors = make_count_errors(config, setup.model)
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
            if line["val_error"] < best_val:
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
