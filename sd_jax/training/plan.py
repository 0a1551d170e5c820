"""What a run trains, built from its config without data: the model, the optimiser and its
learning-rate schedule, the step counts, the augmentation, the device mesh, the train state and the
run's random keys."""
import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax.sharding import Mesh

from sd_jax.training import compiler, parallel
from sd_jax.config import ConfigError, resolve_convention, resolve_platform_defaults
from sd_jax.layers import initializers
from sd_jax.layers.conv import resolve_conv_grads
from sd_jax.models.cifar import ResNetCIFAR, stack_blocks
from sd_jax.models.imagenet import ResNetImageNet


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
    platform = mesh.devices.flat[0].platform
    resolve_platform_defaults(config, platform)
    synchronised = synchronised_batch_norm(config) and mesh.size > 1
    common = dict(depth=config.depth, num_classes=num_classes, p_last=config.p_last,
                  survival_mode=config.survival_mode, drop_mode=config.drop_mode, dtype=jnp.dtype(config.dtype),
                  scan_blocks=config.scan_blocks, bn_axis_name=parallel.AXIS if synchronised else None,
                  gate_certain_blocks=platform == "cpu")
    if config.model == "resnet_imagenet":
        return ResNetImageNet(**common, drop_downsample_blocks=config.drop_downsample_blocks,
                              zero_init_last_bn=config.zero_init_last_bn)
    return ResNetCIFAR(**common, conv_grads=resolve_conv_grads(config.conv_grads, platform),
                       bn_scale_init=config.bn_scale_init, conv_init_fan=config.conv_init_fan,
                       classifier_init=config.classifier_init,
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


def init_variables(model: nn.Module, key, image_shape, device=None) -> dict:
    """The model's initial params and batch_stats as host (numpy) arrays, built from one standard
    draw per distribution (`initializers.one_draw`, through the unrolled model; stacked for a
    scanned one, so both layouts start from the same numbers), the draws compiled for `device`'s
    platform. ImageNet ResNet-152's initialisation compiled for 5.2-5.6 s drawn per parameter
    shape, for 0.3 s so (2-core CPU; docs/performance.md, "Start-up")."""
    x = jnp.zeros((1,) + tuple(image_shape))
    variables = initializers.one_draw(lambda k: model.clone(scan_blocks=False).init(k, x), key,
                                      functools.partial(compiler.jit, device=device))
    return stack_blocks(variables, model.stage_sizes()) if model.scan_blocks else variables


def initial_state(key, plan: TrainingPlan, image_shape) -> TrainState:
    """The training state at step 0, its variables from `init_variables` (host arrays: the caller
    places the state, `parallel.replicate`)."""
    return make_train_state(init_variables(plan.model, key, image_shape, plan.mesh.devices.flat[0]), plan)


def make_train_state(variables: dict, plan: TrainingPlan) -> TrainState:
    """The training state at step 0 from the initial `variables` (`initial_state`; abstract ones
    under `jax.eval_shape` for deviceless compilation)."""
    state = TrainState.create(apply_fn=plan.model.apply, params=variables["params"],
                              batch_stats=variables["batch_stats"], tx=plan.tx)
    return state.replace(step=jnp.zeros((), jnp.int32))


def run_keys(seed: int) -> dict:
    """Independent root keys for parameter init, shuffling, augmentation and block gates."""
    init, shuffle, augmentation, drop = jax.random.split(jax.random.key(seed), 4)
    return {"init": init, "shuffle": shuffle, "augment": augmentation, "drop": drop}
