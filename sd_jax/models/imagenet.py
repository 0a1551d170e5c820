"""Bottleneck ResNet-50/101/152 with stochastic depth: the paper's ImageNet network and the model of
MosaicML composer's stochastic-depth method, in torchvision's ResNet v1.5 layout.

Layout (torchvision.models.resnet): stem 7x7/2 conv, BN, ReLU, 3x3/2 max-pool; four stages of
bottleneck blocks (1x1, 3x3 with the stride, 1x1 to 4x the width); a projection shortcut (1x1 conv
+ BN) on the first block of every stage, where the shape changes; global average pool, fully
connected. BatchNorm momentum 0.1 (PyTorch sense), epsilon 1e-5; no conv bias; conv weights He
normal over fan_out as torchvision initialises them. The stage machinery, the block wrapper and the
BatchNorm settings are the CIFAR model's (sd_jax.models.cifar).
"""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sd_jax.layers import initializers
from sd_jax.layers.batch_norm import example_mask
from sd_jax.models.cifar import Stage, batch_norm, classifier, global_average_pool, model_gates
from sd_jax.layers.stochastic_depth import identity
from sd_jax.layers.survival import survival_probabilities

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
he_fan_out = initializers.he_normal("fan_out")  # torchvision's kaiming_normal_


def stage_blocks(depth: int) -> tuple:
    if depth not in STAGE_BLOCKS:
        raise ValueError(f"ImageNet ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")
    return STAGE_BLOCKS[depth]


def stage_sizes(depth: int) -> dict:
    """{stage name: blocks} for the layout converters (sd_jax.models.cifar.stack_blocks)."""
    return {f"layer{s + 1}": n for s, n in enumerate(stage_blocks(depth))}


def block_survival_probabilities(depth: int, p_last: float, mode: str, drop_downsample_blocks: bool) -> np.ndarray:
    """p_l of every block; with `drop_downsample_blocks=False` the first block of each stage (the
    projection blocks) survives with 1 and the schedule spreads over the others."""
    num_blocks = sum(stage_blocks(depth))
    if drop_downsample_blocks:
        return survival_probabilities(num_blocks, p_last, mode)
    firsts = np.cumsum((0,) + stage_blocks(depth)[:-1])
    probs = np.ones(num_blocks)
    droppable = np.setdiff1d(np.arange(num_blocks), firsts)
    probs[droppable] = survival_probabilities(len(droppable), p_last, mode)
    return probs


def conv(features: int, kernel: int, stride: int, dtype, name: str):
    """A bias-free conv with PyTorch's symmetric padding (kernel // 2 on every side)."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, dtype=dtype, kernel_init=he_fan_out, name=name)


class BottleneckBranch(nn.Module):
    """The residual branch of torchvision's Bottleneck: 1x1-BN-ReLU, 3x3 (stride)-BN-ReLU, 1x1 to
    4x width-BN. `zero_init_last_bn` starts the last BN's scale at 0 (torchvision's
    zero_init_residual, Goyal et al.), so every block starts as its shortcut."""

    width: int
    stride: int = 1
    dtype: Any = jnp.float32
    bn_axis_name: Optional[str] = None
    zero_init_last_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        bn = functools.partial(batch_norm, train, self.dtype, axis_name=self.bn_axis_name, scale_init="ones")
        y = nn.relu(bn(name="bn1")(conv(self.width, 1, 1, self.dtype, "conv1")(x), mask))
        y = nn.relu(bn(name="bn2")(conv(self.width, 3, self.stride, self.dtype, "conv2")(y), mask))
        y = conv(EXPANSION * self.width, 1, 1, self.dtype, "conv3")(y)
        return bn(name="bn3", scale_init="zeros" if self.zero_init_last_bn else "ones")(y, mask)


class Projection(nn.Module):
    """The projection shortcut: 1x1 conv with the block's stride, then BN (torchvision's downsample)."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    bn_axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        y = conv(self.features, 1, self.stride, self.dtype, "conv")(x)
        return batch_norm(train, self.dtype, "bn", self.bn_axis_name, "ones")(y, mask)


JittedBottleneck = nn.jit(BottleneckBranch, static_argnames=("train",))  # as the CIFAR model's branch


class ResNetImageNet(nn.Module):
    """Bottleneck ResNet-50/101/152 with stochastic depth over its 16/33/50 blocks.

    Block l of L (1-based, the projection blocks included) survives with p_l = 1 - l/L (1 - p_L)
    (`survival_mode` "linear"; "uniform": p_L): the paper's ImageNet run, and composer's
    `drop_rate = d, drop_distribution="linear"` with p_last = 1 - d. `drop_downsample_blocks=False`
    keeps the four projection blocks always on (survival 1) and spreads the schedule over the other
    blocks only (l counts those). `apply(variables, x, train=..., drop_scale=..., mask=...)` as
    for `ResNetCIFAR`.
    """

    depth: int = 50
    num_classes: int = 1000
    p_last: float = 0.5
    survival_mode: str = "linear"
    drop_mode: str = "block"
    dtype: Any = jnp.float32
    scan_blocks: bool = False
    bn_axis_name: Optional[str] = None
    drop_downsample_blocks: bool = True
    zero_init_last_bn: bool = False
    gate_certain_blocks: bool = False  # see StochasticDepth; make_model sets it on the CPU

    @property
    def num_blocks(self) -> int:
        return sum(stage_blocks(self.depth))

    def survival_probabilities(self) -> np.ndarray:
        return block_survival_probabilities(self.depth, self.p_last, self.survival_mode, self.drop_downsample_blocks)

    def stage_sizes(self) -> dict:
        return stage_sizes(self.depth)

    def block_macs(self, image_size: int = 224):
        """(multiply-adds of each bottleneck branch, of everything outside them: stem, projection
        shortcuts, which always run, and classifier) for one image, convolutions and fc only."""
        half = lambda size: -(-size // 2)  # noqa: E731 - a stride-2 conv or pool with "same" padding
        size, channels_in, costs = half(half(image_size)), STAGE_WIDTHS[0], []
        fixed = half(image_size) ** 2 * 7 * 7 * 3 * STAGE_WIDTHS[0] + EXPANSION * STAGE_WIDTHS[-1] * self.num_classes
        for s, (blocks, width) in enumerate(zip(stage_blocks(self.depth), STAGE_WIDTHS)):
            for i in range(blocks):
                out = half(size) if (s > 0 and i == 0) else size
                costs.append(size * size * channels_in * width + out * out * (9 * width * width + width * EXPANSION * width))
                if i == 0:
                    fixed += out * out * channels_in * EXPANSION * width
                channels_in, size = EXPANSION * width, out
        return np.array(costs, np.float64), float(fixed)

    @nn.compact
    def __call__(self, x, train: bool = False, drop_scale: Any = 1.0, mask=None):
        probs = [float(p) for p in self.survival_probabilities()]
        gates = model_gates(self, probs, train, self.drop_mode, self.gate_certain_blocks, drop_scale)
        mask = example_mask(mask)
        x = conv(STAGE_WIDTHS[0], 7, 2, self.dtype, "conv1")(x)
        x = nn.relu(batch_norm(train, self.dtype, "bn1", self.bn_axis_name, "ones")(x, mask))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        start = 0
        for s, (blocks, width) in enumerate(zip(stage_blocks(self.depth), STAGE_WIDTHS)):
            branch_class = BottleneckBranch if self.is_initializing() else JittedBottleneck  # as the CIFAR model
            branch = lambda stride: branch_class(width, stride, self.dtype, self.bn_axis_name, self.zero_init_last_bn,
                                                 parent=None)
            stride = 1 if s == 0 else 2
            projection = Projection(EXPANSION * width, stride, self.dtype, self.bn_axis_name, parent=None)
            x = Stage(branch(stride), projection, branch(1), identity, tuple(probs[start:start + blocks]), train,
                      self.drop_mode, self.scan_blocks, self.gate_certain_blocks,
                      name=f"layer{s + 1}")(x, drop_scale, mask, gates[start:start + blocks])
            start += blocks
        return classifier(self.num_classes, EXPANSION * STAGE_WIDTHS[-1], "torch")(global_average_pool(x))
