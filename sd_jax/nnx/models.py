"""The CIFAR ResNet and the bottleneck ResNet-50/101/152 as Flax NNX modules, built from
`sd_jax.nnx.StochasticDepth`, with the Linen models' variable names (`linen_variables`,
`load_linen_variables` convert; PyTorch weights come in through sd_jax.interop and these).

The architecture's description is shared with the Linen models (sd_jax.models): stage widths and
depths, survival schedules, option-A shortcuts, initialisers and the arithmetic of every layer;
what is here is only how NNX modules hold it. The blocks are unrolled (no `scan_blocks`).
"""
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from sd_jax.layers.batch_norm import example_mask
from sd_jax.layers.stochastic_depth import draw_gates, has_gate
from sd_jax.layers.survival import survival_probabilities
from sd_jax.models import cifar, imagenet
from sd_jax.nnx.layers import BatchNorm, Conv3x3, StochasticDepth


class BasicBranch(nnx.Module):
    """The CIFAR ResNet's residual branch: conv-BN-ReLU-conv-BN (`sd_jax.models.cifar.BasicBranch`)."""

    def __init__(self, in_features: int, features: int, stride: int = 1, *, dtype: Any = jnp.float32,
                 conv_grads: str = "auto", bn_axis_name: Optional[str] = None, bn_scale_init: str = "uniform",
                 conv_init_fan: str = "fan_in", rngs: nnx.Rngs):
        conv = functools.partial(Conv3x3, dtype=dtype, conv_grads=conv_grads, init_fan=conv_init_fan, rngs=rngs)
        bn = functools.partial(BatchNorm, features, dtype=dtype, axis_name=bn_axis_name,
                               scale_init=cifar.bn_scale_initializer(bn_scale_init), rngs=rngs)
        self.conv1, self.bn1 = conv(in_features, features, stride), bn()
        self.conv2, self.bn2 = conv(features, features), bn()

    def __call__(self, x, mask=None):
        y = jax.nn.relu(self.bn1(self.conv1(x), mask))
        return self.bn2(self.conv2(y), mask)


def conv(in_features: int, features: int, kernel: int, stride: int, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """`sd_jax.models.imagenet.conv` in NNX: bias-free, PyTorch's symmetric padding, He normal over fan_out."""
    pad = kernel // 2
    return nnx.Conv(in_features, features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                    use_bias=False, dtype=dtype, kernel_init=imagenet.he_fan_out, rngs=rngs)


class BottleneckBranch(nnx.Module):
    """torchvision's Bottleneck branch (`sd_jax.models.imagenet.BottleneckBranch`)."""

    def __init__(self, in_features: int, width: int, stride: int = 1, *, dtype: Any = jnp.float32,
                 bn_axis_name: Optional[str] = None, zero_init_last_bn: bool = False, rngs: nnx.Rngs):
        bn = functools.partial(BatchNorm, dtype=dtype, axis_name=bn_axis_name, rngs=rngs)
        out = imagenet.EXPANSION * width
        self.conv1, self.bn1 = conv(in_features, width, 1, 1, dtype, rngs), bn(width)
        self.conv2, self.bn2 = conv(width, width, 3, stride, dtype, rngs), bn(width)
        self.conv3 = conv(width, out, 1, 1, dtype, rngs)
        self.bn3 = bn(out, scale_init=cifar.bn_scale_initializer("zeros" if zero_init_last_bn else "ones"))

    def __call__(self, x, mask=None):
        y = jax.nn.relu(self.bn1(self.conv1(x), mask))
        y = jax.nn.relu(self.bn2(self.conv2(y), mask))
        return self.bn3(self.conv3(y), mask)


class Projection(nnx.Module):
    """The projection shortcut: 1x1 conv with the block's stride, then BN (`sd_jax.models.imagenet.Projection`)."""

    def __init__(self, in_features: int, features: int, stride: int = 1, *, dtype: Any = jnp.float32,
                 bn_axis_name: Optional[str] = None, rngs: nnx.Rngs):
        self.conv = conv(in_features, features, 1, stride, dtype, rngs)
        self.bn = BatchNorm(features, dtype=dtype, axis_name=bn_axis_name, rngs=rngs)

    def __call__(self, x, mask=None):
        return self.bn(self.conv(x), mask)


class Stage(nnx.Module):
    """Blocks run one after another; attributes block0..block{n-1}, as the Linen model's stages."""

    def __init__(self, blocks):
        self.num_blocks = len(blocks)
        for i, block in enumerate(blocks):
            setattr(self, f"block{i}", block)

    def blocks(self) -> list:
        return [getattr(self, f"block{i}") for i in range(self.num_blocks)]

    def __call__(self, x, drop_scale, mask, gates):
        """`gates`: each block's gate drawn by the model, or None for a block that draws none."""
        for block, gate in zip(self.blocks(), gates):
            x = block(x, drop_scale=drop_scale, mask=mask, gate=gate)
        return x


def run_stages(stages, stream: Optional[nnx.RngStream], x, drop_scale, mask):
    """The stages one after another, every gate of a training call drawn in one random call from
    `stream` (`draw_gates`, as the Linen models do) and handed to its block."""
    blocks = [b for stage in stages for b in stage.blocks()]
    gates = [None] * len(blocks)
    if stream is not None and any(has_gate(b.drop_mode, b.survival_prob, b.gate_certain_blocks)
                                  and not b.deterministic for b in blocks):
        gates = draw_gates(stream(), [b.survival_prob for b in blocks], drop_scale)
    start = 0
    for stage in stages:
        x = stage(x, drop_scale, mask, gates[start:start + stage.num_blocks])
        start += stage.num_blocks
    return x


def gate_stream(rngs: nnx.Rngs, survival_probs, gate_certain_blocks: bool) -> Optional[nnx.RngStream]:
    """One fork of the "drop" stream for all of a model's gates (a step then updates one counter,
    not one per block or stage: a kernel each on a GPU); None when no block has a gate."""
    if not gate_certain_blocks and min(survival_probs) >= 1.0:
        return None
    try:
        return rngs["drop"].fork()
    except KeyError:
        raise ValueError("a model with stochastic depth draws its gates from the stream \"drop\": pass "
                         "rngs=nnx.Rngs(params=SEED, drop=SEED) (or an nnx.Rngs with a default stream)") from None


def classifier(fan_in: int, num_classes: int, init: str, rngs: nnx.Rngs) -> nnx.Linear:
    kernel_init, bias_init = cifar.classifier_initializers(fan_in, init)
    return nnx.Linear(fan_in, num_classes, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)


class ResNetCIFAR(nnx.Module):
    """Depth-(6n+2) CIFAR ResNet with stochastic depth: `sd_jax.models.ResNetCIFAR` (its fields,
    defaults and docstring) as an NNX module. `rngs` needs the streams "params" and "drop" (or a
    default stream). Call as `model(x, drop_scale=..., mask=...)` on NHWC float images;
    `model.train()` / `model.eval()` switch the gates and BatchNorm."""

    def __init__(self, depth: int, num_classes: int = 10, *, p_last: float = 0.5, survival_mode: str = "linear",
                 drop_mode: str = "block", dtype: Any = jnp.float32, conv_grads: str = "auto",
                 bn_axis_name: Optional[str] = None, bn_scale_init: str = "uniform", conv_init_fan: str = "fan_in",
                 classifier_init: str = "torch", shortcut_downsample: str = "subsample",
                 gate_certain_blocks: bool = False, rngs: nnx.Rngs):
        n = cifar.blocks_per_stage(depth)
        self.depth = depth
        self.survival_probs = tuple(float(p) for p in survival_probabilities(3 * n, p_last, survival_mode))
        branch = functools.partial(BasicBranch, dtype=dtype, conv_grads=conv_grads, bn_axis_name=bn_axis_name,
                                   bn_scale_init=bn_scale_init, conv_init_fan=conv_init_fan, rngs=rngs)
        self.conv1 = Conv3x3(3, cifar.STAGE_FEATURES[0], dtype=dtype, conv_grads=conv_grads, init_fan=conv_init_fan,
                             rngs=rngs)
        self.bn1 = BatchNorm(cifar.STAGE_FEATURES[0], dtype=dtype, axis_name=bn_axis_name,
                             scale_init=cifar.bn_scale_initializer(bn_scale_init), rngs=rngs)
        channels, probs, gates = cifar.STAGE_FEATURES[0], iter(self.survival_probs), gate_stream(
            rngs, self.survival_probs, gate_certain_blocks)
        for s, features in enumerate(cifar.STAGE_FEATURES):
            blocks = []
            for i in range(n):
                stride = 2 if s > 0 and i == 0 else 1
                blocks.append(StochasticDepth(branch(channels, features, stride), next(probs),
                                              cifar.option_a(features, stride, shortcut_downsample),
                                              drop_mode=drop_mode, gate_certain_blocks=gate_certain_blocks, rngs=gates))
                channels = features
            setattr(self, f"stage{s + 1}", Stage(blocks))
        self.gate_rngs = nnx.data(gates)
        self.linear = classifier(channels, num_classes, classifier_init, rngs)

    def stage_sizes(self) -> dict:
        return cifar.cifar_stage_sizes(self.depth)

    def __call__(self, x, *, drop_scale: Any = 1.0, mask=None):
        mask = example_mask(mask)
        x = jax.nn.relu(self.bn1(self.conv1(x), mask))
        stages = [getattr(self, f"stage{s + 1}") for s in range(len(cifar.STAGE_FEATURES))]
        x = run_stages(stages, self.gate_rngs, x, drop_scale, mask)
        return self.linear(cifar.global_average_pool(x))


class ResNetImageNet(nnx.Module):
    """Bottleneck ResNet-50/101/152 with stochastic depth: `sd_jax.models.ResNetImageNet` (its
    fields, defaults and docstring) as an NNX module; `rngs` and calls as `ResNetCIFAR`'s."""

    def __init__(self, depth: int = 50, num_classes: int = 1000, *, p_last: float = 0.5,
                 survival_mode: str = "linear", drop_mode: str = "block", dtype: Any = jnp.float32,
                 bn_axis_name: Optional[str] = None, drop_downsample_blocks: bool = True,
                 zero_init_last_bn: bool = False, gate_certain_blocks: bool = False, rngs: nnx.Rngs):
        self.depth = depth
        self.survival_probs = tuple(float(p) for p in imagenet.block_survival_probabilities(
            depth, p_last, survival_mode, drop_downsample_blocks))
        self.conv1 = conv(3, imagenet.STAGE_WIDTHS[0], 7, 2, dtype, rngs)
        self.bn1 = BatchNorm(imagenet.STAGE_WIDTHS[0], dtype=dtype, axis_name=bn_axis_name, rngs=rngs)
        channels, probs, gates = imagenet.STAGE_WIDTHS[0], iter(self.survival_probs), gate_stream(
            rngs, self.survival_probs, gate_certain_blocks)
        for s, (num_blocks, width) in enumerate(zip(imagenet.stage_blocks(depth), imagenet.STAGE_WIDTHS)):
            blocks, out = [], imagenet.EXPANSION * width
            for i in range(num_blocks):
                stride = 2 if s > 0 and i == 0 else 1
                shortcut = (Projection(channels, out, stride, dtype=dtype, bn_axis_name=bn_axis_name, rngs=rngs)
                            if i == 0 else imagenet.identity)
                branch = BottleneckBranch(channels, width, stride, dtype=dtype, bn_axis_name=bn_axis_name,
                                          zero_init_last_bn=zero_init_last_bn, rngs=rngs)
                blocks.append(StochasticDepth(branch, next(probs), shortcut, drop_mode=drop_mode,
                                              gate_certain_blocks=gate_certain_blocks, rngs=gates))
                channels = out
            setattr(self, f"layer{s + 1}", Stage(blocks))
        self.gate_rngs = nnx.data(gates)
        self.linear = classifier(channels, num_classes, "torch", rngs)

    def stage_sizes(self) -> dict:
        return imagenet.stage_sizes(self.depth)

    def __call__(self, x, *, drop_scale: Any = 1.0, mask=None):
        mask = example_mask(mask)
        x = jax.nn.relu(self.bn1(self.conv1(x), mask))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        stages = [getattr(self, f"layer{s + 1}") for s in range(len(imagenet.STAGE_WIDTHS))]
        x = run_stages(stages, self.gate_rngs, x, drop_scale, mask)
        return self.linear(cifar.global_average_pool(x))


COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


def linen_variables(model: nnx.Module) -> dict:
    """The model's parameters and BatchNorm statistics as the Linen model's variables
    ({"params": ..., "batch_stats": ...}, the unrolled layout)."""
    return {name: nnx.to_pure_dict(nnx.state(model, kind)) for name, kind in COLLECTIONS.items()}


def load_linen_variables(model: nnx.Module, variables: dict) -> None:
    """Set the model's parameters and BatchNorm statistics from the Linen model's `variables`
    (either layout: the scanned one, `scan_blocks=True`, is unstacked first)."""
    if any("blocks" in stage for stage in variables.get("params", {}).values() if isinstance(stage, dict)):
        variables = cifar.unstack_blocks(variables, model.stage_sizes())
    for name, kind in COLLECTIONS.items():
        state = nnx.state(model, kind)
        expected, given = _paths(nnx.to_pure_dict(state)), _paths(variables.get(name, {}))
        if expected != given:
            raise ValueError(f"the {name} do not match this model: missing {sorted(expected - given)[:5]}, "
                             f"unexpected {sorted(given - expected)[:5]}")
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, variables[name]))
        nnx.update(model, state)


def _paths(tree) -> set:
    return {"/".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}
