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
from sd_jax.config import ConfigError, resolve_convention, validate
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


def build_model(config, num_classes: int) -> ResNetCIFAR:
    """The configured network (`config` with its convention resolved). On one device BatchNorm gets
    no axis name: averaging over one device is the identity, and with a collective inside every
    block's cond XLA:CPU spent 0.3 s/step on copies and zero-filled buffers around the conds even
    with every block dropped (ResNet-110, docs/performance.md)."""
    synchronised = synchronised_batch_norm(config) and jax.device_count() > 1
    return ResNetCIFAR(
        depth=config.depth, num_classes=num_classes, p_last=config.p_last, mode=config.survival_mode,
        drop_mode=config.drop_mode, dtype=jnp.dtype(config.dtype), scan_blocks=config.scan_blocks,
        conv_grads=config.conv_grads, bn_axis_name=parallel.AXIS if synchronised else None,
        bn_scale_init=config.bn_scale_init, conv_init_fan=config.conv_init_fan,
        classifier_init=config.classifier_init, shortcut_downsample=config.shortcut_downsample,
    )


def steps_per_epoch(num_train: int, batch_size: int, partial_last_batch: bool) -> int:
    """Batches per epoch: with `partial_last_batch` the last, short one is trained too (the authors'
    `split(batchSize)`: 352 for 45k CIFAR images), else dropped (351)."""
    return -(-num_train // batch_size) if partial_last_batch else num_train // batch_size


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """Piecewise-constant: learning_rate (after lr_warmup_epochs at lr_warmup_value), multiplied by
    lr_decay at the start of each 1-based boundary epoch, as the authors' main.lua (`0.1 while
    epochCounter < 250`): the first step of epoch 250 already runs at 0.01."""
    scales = {(int(b) - 1) * steps_per_epoch: config.lr_decay for b in config.lr_boundaries}
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
    num_train = len(dataset.train)
    if config.batch_size > num_train:
        raise ConfigError(f"batch_size={config.batch_size} exceeds the {num_train} training images of "
                          f"{dataset.name}; use a batch size of at most {num_train}")
    epoch_steps = steps_per_epoch(num_train, config.batch_size, config.partial_last_batch)
    return Setup(
        model=build_model(config, dataset.num_classes),
        tx=make_optimizer(config, epoch_steps),
        num_train=num_train,
        steps_per_epoch=epoch_steps,
        total_steps=epoch_steps * config.num_epochs,
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


def train_step(state: TrainState, images, labels, mask, num_real, keys, setup: Setup, config):
    """One SGD step on this device's share of the batch, inside `shard_map` over the "data" axis.

    `mask` (this device's examples; None when every example is real) leaves the padding of a short
    last batch out of the loss and the BatchNorm statistics; `num_real` counts the real examples of
    the global batch, so the gradient is the mean over them wherever they sit. Gradients are summed
    over devices (BatchNorm statistics averaged, see `synchronised_batch_norm`); returns the new
    state and the batch's metrics summed over devices.
    """
    step = state.step
    scale = drop_scale(step, setup.total_steps, config.drop_warmup)
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


def make_train_steps(setup: Setup, config):
    """Jitted (state, train data, keys, epoch permutation, first, count) -> (state, summed metrics).

    Runs `count` consecutive steps of the epoch starting at its step `first` in one device loop;
    both are traced, so every chunk length shares one compilation. Each device takes its slice of
    every global batch (and of the batch's random augmentation draws) from the replicated dataset,
    so the result does not depend on the number of devices. Positions past the end of the
    (padded) permutation are the padding of the epoch's last batch: masked out of the step.
    """
    batch = config.batch_size
    local = batch // setup.mesh.size
    dtype = jnp.dtype(config.dtype)

    def train_steps(state, train, keys, perm, first, count):
        device = jax.lax.axis_index(parallel.AXIS)
        mine = lambda x: jax.lax.dynamic_slice_in_dim(x, device * local, local)

        def body(i, carry):
            state, sums = carry
            start = (first + i) * batch
            indices = jax.lax.dynamic_slice(perm, (start,), (batch,))
            real = start + jnp.arange(batch) < setup.num_train
            draws = augment.random_draws(jax.random.fold_in(keys["augment"], state.step), batch,
                                         setup.translate, setup.flip)
            images, labels = augment.training_batch(
                train["images"], train["labels"], mine(indices), jax.tree.map(mine, draws), train["mean"],
                train["std"], setup.translate, dtype)
            mask = mine(real) if config.partial_last_batch else None
            num_real = jnp.sum(real).astype(jnp.float32)
            state, metrics = train_step(state, images, labels, mask, num_real, keys, setup, config)
            return state, jax.tree.map(jnp.add, sums, metrics)

        zeros = {k: jnp.float32(0.0) for k in TRAIN_METRICS}
        return jax.lax.fori_loop(0, count, body, (state, zeros))

    replicated = PartitionSpec()
    sharded = jax.shard_map(train_steps, mesh=setup.mesh, in_specs=(replicated,) * 6,
                            out_specs=(replicated, replicated), check_vma=False)
    return compiler.jit(sharded, donate_argnums=0)


def epoch_permutation(keys, epoch: int, setup: Setup, batch_size: int):
    """The order of the training images in (1-based) `epoch`, padded with index 0 to whole batches."""
    perm = jax.random.permutation(jax.random.fold_in(keys["shuffle"], epoch), setup.num_train)
    return jnp.pad(perm, (0, max(0, setup.steps_per_epoch * batch_size - setup.num_train)))


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
    """Load the data onto the device and build the model, optimiser and initial state (the convention
    keys of `config` left at None are set from its convention)."""
    resolve_convention(config)
    dataset = data.load_dataset(config.dataset, config.data_dir, config.data_source)
    if config.num_classes is not None and config.num_classes != dataset.num_classes:
        raise ConfigError(f"num_classes={config.num_classes} but {dataset.name} has {dataset.num_classes} "
                          "classes; leave num_classes unset to take it from the dataset")
    mesh = parallel.make_mesh()
    setup = make_setup(config, dataset, mesh)
    keys = parallel.replicate(run_keys(config.seed), mesh)
    state = parallel.replicate(create_train_state(keys["init"], setup, dataset.train.images.shape[1:]), mesh)
    mean, std = dataset.normalization(config.normalization)
    train = parallel.replicate({"images": dataset.train.images, "labels": dataset.train.labels,
                                "mean": mean, "std": std}, mesh)
    evals = {"val": device_eval_split(dataset.val, config.eval_batch_size, mesh),
             "test": device_eval_split(dataset.test, config.eval_batch_size, mesh)}
    return Run(config, dataset, setup, keys, state, train, evals)


def evaluation_steps(total_steps: int, steps_per_epoch: int, eval_every_steps: int) -> list:
    """The global step counts after which the run evaluates: every epoch's end, or every
    `eval_every_steps` steps (the authors' SVHN accounting: every 200 iterations) and the last step."""
    every = eval_every_steps or steps_per_epoch
    steps = list(range(every, total_steps + 1, every))
    return steps if steps and steps[-1] == total_steps else steps + [total_steps]


def epoch_of(step: int, steps_per_epoch: int):
    """Epochs done after `step` steps: an int at an epoch's end, else a fraction (4 decimals)."""
    return step // steps_per_epoch if step % steps_per_epoch == 0 else round(step / steps_per_epoch, 4)


class Trainer:
    """The phases of a run after setup: train up to the next evaluation, evaluate, record."""

    def __init__(self, run: Run, run_dir: records.RunDir, ckpts: checkpoints.Checkpoints, train_steps,
                 count_errors):
        self.run, self.config, self.setup = run, run.config, run.setup
        self.run_dir, self.ckpts = run_dir, ckpts
        self.train_steps, self.count_errors = train_steps, count_errors
        self.schedule = learning_rate_schedule(self.config, self.setup.steps_per_epoch)
        self.permutations = {}

    def permutation(self, epoch: int):
        if epoch not in self.permutations:
            self.permutations = {epoch: epoch_permutation(self.run.keys, epoch, self.setup, self.config.batch_size)}
        return self.permutations[epoch]

    def train_until(self, state: TrainState, stop: int):
        """Train from `state.step` up to global step `stop` in chunks of at most `steps_per_call`
        steps that never cross an epoch's end; (state, summed train metrics)."""
        spe, total = self.setup.steps_per_epoch, self.setup.total_steps
        totals = dict.fromkeys(TRAIN_METRICS, 0.0)
        step, last_log = int(state.step), time.perf_counter()
        while step < stop:
            epoch, first = step // spe + 1, step % spe
            count = min(self.config.steps_per_call, stop - step, spe - first)
            state, sums = self.train_steps(state, self.run.train, self.run.keys, self.permutation(epoch), first, count)
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
                log.info("epoch %d: step %d/%d (%d/%d in all), loss %.4f", epoch, step - (epoch - 1) * spe, spe,
                         step, total, totals["loss"] / totals["images"])
        return state, totals

    def metrics_line(self, state: TrainState, totals: dict, lr: float, seconds: float) -> dict:
        """One line of metrics.jsonl: training metrics since the previous line, then evaluation."""
        errors = self.run.error_rates(self.count_errors, state)
        step = int(state.step)
        return {
            "epoch": epoch_of(step, self.setup.steps_per_epoch),
            "step": step,
            "train_loss": totals["loss"] / totals["images"],
            "train_error": 100.0 * totals["errors"] / totals["images"],
            "val_error": errors["val"],
            "test_error": errors["test"],
            "lr": lr,
            "epoch_time_s": seconds,
            "images_per_s": totals["images"] / seconds,
            "mean_active_blocks": totals["active_blocks"] / totals["steps"],
        }

    def record(self, state: TrainState, line: dict, history: list) -> None:
        """Append the line; checkpoint the latest state at the checkpoint cadence and the best one."""
        self.run_dir.append_metrics(line)
        history.append(line)
        step, spe = line["step"], self.setup.steps_per_epoch
        every_epochs = step % (self.config.checkpoint_every_epochs * spe) == 0
        if self.config.eval_every_steps or every_epochs or step == self.setup.total_steps:
            self.ckpts.save(checkpoints.LATEST, state, line)
        if records.best_line(history) is line:
            self.ckpts.save(checkpoints.BEST, state, line)

    def log_line(self, line: dict) -> None:
        progress = (f"epoch {line['epoch']}/{self.config.num_epochs}" if not self.config.eval_every_steps else
                    f"step {line['step']}/{self.setup.total_steps} (epoch {line['epoch']:.2f})")
        log.info("%s  loss %.4f  train %.2f%%  val %.2f%%  test %.2f%%  lr %.4g  %.1f s (%.0f img/s)  "
                 "active blocks %.1f/%d", progress, line["train_loss"], line["train_error"], line["val_error"],
                 line["test_error"], line["lr"], line["epoch_time_s"], line["images_per_s"],
                 line["mean_active_blocks"], self.setup.model.num_blocks)

    def fit(self, state: TrainState, history: list) -> TrainState:
        """Train from `state.step` to the end, evaluating and recording at every evaluation step."""
        try:
            for stop in evaluation_steps(self.setup.total_steps, self.setup.steps_per_epoch,
                                         self.config.eval_every_steps):
                if stop <= int(state.step):
                    continue
                lr = float(f"{float(self.schedule(int(state.step))):.7g}")  # float32 -> the config's decimal
                start = time.perf_counter()
                state, totals = self.train_until(state, stop)
                line = self.metrics_line(state, totals, lr, time.perf_counter() - start)
                self.record(state, line, history)
                self.log_line(line)
        finally:
            self.ckpts.wait()
            self.ckpts.close()
        return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, restart: bool = False) -> dict:
    """Train as `config` says, writing config.json, metrics.jsonl, summary.json and checkpoints to
    `workdir`. A workdir holding an earlier run of the same config is resumed from its latest
    checkpoint; `restart` deletes the earlier run instead."""
    validate(config, data.DATASETS, jax.device_count())
    resolve_convention(config)
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
    if restored is not None:
        state, meta = restored
        log.info("resuming from the checkpoint of epoch %s (step %d)", meta["epoch"], int(state.step))
    history = run_dir.truncate_metrics(int(state.step))

    compile_start = time.perf_counter()
    train_steps = make_train_steps(setup, config).lower(
        state, run.train, run.keys, epoch_permutation(run.keys, 0, setup, config.batch_size), 0, 1).compile()
    count_errors = make_count_errors(config, setup.model, setup.mesh)
    compile_s = time.perf_counter() - compile_start
    log.info("compiled the train step in %.1f s", compile_s)

    Trainer(run, run_dir, ckpts, train_steps, count_errors).fit(state, history)

    summary = records.summarize(history)
    summary.update(num_params=num_params, expected_active_blocks=expected_active, compile_s=compile_s,
                   wall_time_s=time.perf_counter() - wall_start)
    run_dir.write_summary(summary)
    log.info("test error at best validation (epoch %s): %.2f%%; final test error %.2f%%",
             summary["best_val_epoch"], summary["test_error_at_best_val"], summary["final_test_error"])
    return summary
