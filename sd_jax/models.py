"""The CIFAR ResNet of He et al. (2016) with stochastic depth, as in Huang et al. (2016)."""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.conv import Conv3x3
from sd_jax.schedules import survival_probabilities
from sd_jax.stochastic_depth import StochasticDepth

STAGE_FEATURES = (16, 32, 64)


def blocks_per_stage(depth: int) -> int:
    """n for a depth-(6n+2) CIFAR ResNet."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, 1202, ...), got {depth}")
    return (depth - 2) // 6


def option_a_shortcut(x, features: int, stride: int):
    """He et al.'s option A: stride-2 subsampling, then zero channels appended after the identity."""
    if stride != 1:
        x = x[:, ::stride, ::stride, :]
    extra = features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra))) if extra else x


def batch_norm(train: bool, dtype, name: str, axis_name=None):
    """BatchNorm as in Torch7/PyTorch: momentum 0.1 (Flax 0.9), epsilon 1e-5; statistics averaged
    over the devices of `axis_name` when given (synchronised BatchNorm)."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        axis_name=axis_name if train else None, name=name)


class BasicBranch(nn.Module):
    """Residual branch of a post-activation basic block: conv-BN-ReLU-conv-BN."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    conv_grads: str = "auto"
    bn_axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(Conv3x3, self.features, dtype=self.dtype, conv_grads=self.conv_grads)
        y = conv(stride=self.stride, name="conv1")(x)
        y = nn.relu(batch_norm(train, self.dtype, "bn1", self.bn_axis_name)(y))
        y = conv(name="conv2")(y)
        return batch_norm(train, self.dtype, "bn2", self.bn_axis_name)(y)


# Under nn.jit each branch enters the traced step as one nested call, which halves the time JAX
# takes to differentiate the 54 conds of ResNet-110 (docs/performance.md); the HLO is unchanged.
JittedBranch = nn.jit(BasicBranch, static_argnames=("train",))


class ScannedStochasticDepth(StochasticDepth):
    """StochasticDepth with the (carry, scanned input, broadcast) signature `nn.scan` needs."""

    train: bool = False

    def __call__(self, x, survival_prob, drop_scale):
        return super().__call__(x, survival_prob, train=self.train, drop_scale=drop_scale), None


class Stage(nn.Module):
    """n stochastic-depth basic blocks of one width; the first one may downsample.

    With `scan_blocks`, blocks 2..n (identical in shape) run under `nn.scan` with their survival
    probabilities as the scanned input, so compile time does not grow with depth.
    """

    features: int
    stride: int
    survival_probs: tuple
    train: bool
    drop_mode: str = "block"
    dtype: Any = jnp.float32
    conv_grads: str = "auto"
    scan_blocks: bool = False
    bn_axis_name: Optional[str] = None

    def _branch(self, stride):
        return JittedBranch(self.features, stride, self.dtype, self.conv_grads, self.bn_axis_name, parent=None)

    def _shortcut(self, stride):
        return functools.partial(option_a_shortcut, features=self.features, stride=stride)

    @nn.compact
    def __call__(self, x, drop_scale):
        first = StochasticDepth(self._branch(self.stride), self._shortcut(self.stride), self.drop_mode,
                                name="block0")
        x = first(x, self.survival_probs[0], train=self.train, drop_scale=drop_scale)
        rest = self.survival_probs[1:]
        if not self.scan_blocks:
            for i, p in enumerate(rest, start=1):
                block = StochasticDepth(self._branch(1), self._shortcut(1), self.drop_mode, name=f"block{i}")
                x = block(x, p, train=self.train, drop_scale=drop_scale)
            return x
        if not rest:
            return x
        blocks = nn.scan(
            ScannedStochasticDepth,
            variable_axes={"params": 0, "batch_stats": 0, "gates": 0},
            split_rngs={"params": True, "drop": True},
            in_axes=(0, nn.broadcast),
            length=len(rest),
        )(self._branch(1), self._shortcut(1), self.drop_mode, train=self.train, name="blocks")
        x, _ = blocks(x, jnp.asarray(rest, jnp.float32), drop_scale)
        return x


class ResNetCIFAR(nn.Module):
    """Depth-(6n+2) CIFAR ResNet with stochastic depth over its 3n residual blocks.

    `p_last` and `mode` set the survival schedule (p_last=1.0: the constant-depth baseline).
    `drop_mode` "block" is the paper's method; "sample" is per-example drop path.
    `dtype` is the compute dtype; parameters stay float32. `apply(variables, x, train=...)` takes
    NHWC float images; training needs a "drop" RNG and mutable "batch_stats" (and "gates" to read
    which blocks ran). `bn_axis_name` synchronises BatchNorm statistics over that mapped axis.
    """

    depth: int
    num_classes: int = 10
    p_last: float = 0.5
    mode: str = "linear"
    drop_mode: str = "block"
    dtype: Any = jnp.float32
    scan_blocks: bool = False
    conv_grads: str = "auto"
    bn_axis_name: Optional[str] = None

    @property
    def num_blocks(self) -> int:
        return 3 * blocks_per_stage(self.depth)

    def survival_probabilities(self) -> np.ndarray:
        return survival_probabilities(self.num_blocks, self.p_last, self.mode)

    @nn.compact
    def __call__(self, x, train: bool = False, drop_scale: Any = 1.0):
        n = blocks_per_stage(self.depth)
        probs = [float(p) for p in self.survival_probabilities()]
        x = Conv3x3(STAGE_FEATURES[0], dtype=self.dtype, conv_grads=self.conv_grads, name="conv1")(x)
        x = nn.relu(batch_norm(train, self.dtype, "bn1", self.bn_axis_name)(x))
        for s, features in enumerate(STAGE_FEATURES):
            x = Stage(
                features, 1 if s == 0 else 2, tuple(probs[s * n:(s + 1) * n]), train, self.drop_mode,
                self.dtype, self.conv_grads, self.scan_blocks, self.bn_axis_name, name=f"stage{s + 1}",
            )(x, drop_scale)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return nn.Dense(self.num_classes, name="linear")(x)


def count_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def active_blocks(gates) -> jax.Array:
    """Number of blocks that ran (per example, averaged) from the "gates" collection of one step."""
    return sum(jnp.sum(g) for g in jax.tree.leaves(gates))


def to_scanned_layout(variables, depth: int):
    """Unrolled-layout variables (stageS/blockI) -> scan_blocks=True layout (stageS/blocks, stacked)."""
    n = blocks_per_stage(depth)

    def convert(stage):
        rest = [stage[f"block{i}"] for i in range(1, n)]
        out = {"block0": stage["block0"]}
        if rest:
            out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *rest)
        return out

    return _map_stages(variables, convert)


def to_unrolled_layout(variables, depth: int):
    """scan_blocks=True layout variables -> the unrolled layout (stageS/block0..block{n-1})."""
    n = blocks_per_stage(depth)

    def convert(stage):
        out = {"block0": stage["block0"]}
        for i in range(1, n):
            out[f"block{i}"] = jax.tree.map(lambda x, i=i: x[i - 1], stage["blocks"])
        return out

    return _map_stages(variables, convert)


def _map_stages(variables, convert):
    return {
        collection: {k: convert(v) if k.startswith("stage") else v for k, v in tree.items()}
        for collection, tree in variables.items()
    }
