"""The CIFAR ResNet of He et al. (2016) with stochastic depth, as in Huang et al. (2016)."""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.layers.batch_norm import BatchNorm, at_least_float32, example_mask
from sd_jax.layers.conv import Conv3x3
from sd_jax.layers import initializers
from sd_jax.layers.gate import SAVE_POLICY
from sd_jax.layers.survival import survival_probabilities
from sd_jax.layers.stochastic_depth import StochasticDepth, draw_gates, has_gate

STAGE_FEATURES = (16, 32, 64)
BN_SCALE_INITS = ("uniform", "ones")
CLASSIFIER_INITS = ("torch", "lecun")
SHORTCUT_DOWNSAMPLES = ("subsample", "average")


def blocks_per_stage(depth: int) -> int:
    """n for a depth-(6n+2) CIFAR ResNet."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, 1202, ...), got {depth}")
    return (depth - 2) // 6


def option_a_shortcut(x, features: int, stride: int, downsample: str = "subsample"):
    """He et al.'s option A: downsample, then zero channels appended after the identity.

    "subsample" keeps every stride-th pixel: the authors' code as of the paper
    (`SpatialAveragePooling(1, 1, stride, stride)`); "average" takes the mean of each stride x stride
    window, as their repository has since commit 8389752 (2017-02-11).
    """
    if stride != 1 and downsample == "average":
        x = nn.avg_pool(x, (stride, stride), strides=(stride, stride))
    elif stride != 1:
        x = x[:, ::stride, ::stride, :]
    extra = features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra))) if extra else x


def option_a(features: int, stride: int, downsample: str):
    """The option-A shortcut of a block as a function of x, `downsample` checked."""
    if downsample not in SHORTCUT_DOWNSAMPLES:
        raise ValueError(f"shortcut_downsample must be one of {SHORTCUT_DOWNSAMPLES}, got {downsample!r}")
    return functools.partial(option_a_shortcut, features=features, stride=stride, downsample=downsample)


def global_average_pool(x):
    """The mean over space, in at least float32 (the classifier's input)."""
    return jnp.mean(x.astype(at_least_float32(x.dtype)), axis=(1, 2))


def bn_scale_initializer(name: str):
    """"uniform" in [0, 1): Torch7's BatchNormalization:reset(), which the authors' code left in
    place (their README explains why); "ones": PyTorch and Flax; "zeros": the last BN of a
    residual branch under zero_init_residual (the ImageNet models)."""
    choices = {"uniform": initializers.uniform(0.0, 1.0), "ones": initializers.constant(1.0),
               "zeros": initializers.constant(0.0)}
    if name not in choices:
        raise ValueError(f"bn_scale_init must be one of {BN_SCALE_INITS}, got {name!r}")
    return choices[name]


def batch_norm(train: bool, dtype, name: str, axis_name=None, scale_init: str = "uniform"):
    """BatchNorm as in Torch7/PyTorch: momentum 0.1, epsilon 1e-5; statistics averaged over the
    devices of `axis_name` when given (synchronised BatchNorm)."""
    return BatchNorm(use_running_average=not train, dtype=dtype, axis_name=axis_name if train else None,
                     scale_init=bn_scale_initializer(scale_init), name=name)


def torch_uniform(fan_in: int):
    """Torch7's and PyTorch's default nn.Linear init, for weights and bias: uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / np.sqrt(fan_in)
    return initializers.uniform(-bound, bound)


def classifier_initializers(fan_in: int, init: str):
    """(kernel, bias) initialisers of the final Dense layer: "torch" (the authors' nn.Linear) or
    "lecun" (Flax's default: LeCun normal weights, zero bias)."""
    if init not in CLASSIFIER_INITS:
        raise ValueError(f"classifier_init must be one of {CLASSIFIER_INITS}, got {init!r}")
    if init == "lecun":
        return initializers.lecun_normal(), initializers.constant(0.0)
    return torch_uniform(fan_in), torch_uniform(fan_in)


def classifier(num_classes: int, fan_in: int, init: str):
    """The final Dense layer, initialised as `classifier_initializers` says."""
    kernel_init, bias_init = classifier_initializers(fan_in, init)
    return nn.Dense(num_classes, kernel_init=kernel_init, bias_init=bias_init, name="linear")


class BasicBranch(nn.Module):
    """Residual branch of a post-activation basic block: conv-BN-ReLU-conv-BN."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    conv_grads: str = "auto"
    bn_axis_name: Optional[str] = None
    bn_scale_init: str = "uniform"
    conv_init_fan: str = "fan_in"

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        conv = functools.partial(Conv3x3, self.features, dtype=self.dtype, conv_grads=self.conv_grads,
                                 init_fan=self.conv_init_fan)
        bn = functools.partial(batch_norm, train, self.dtype, axis_name=self.bn_axis_name,
                               scale_init=self.bn_scale_init)
        y = conv(stride=self.stride, name="conv1")(x)
        y = nn.relu(bn(name="bn1")(y, mask))
        y = conv(name="conv2")(y)
        return bn(name="bn2")(y, mask)


# Under nn.jit each branch enters the traced step as one nested call, which halves the time JAX
# takes to differentiate the 54 conds of ResNet-110 (docs/performance.md); the HLO is unchanged.
# Initialisation traces the plain class: `initializers.one_draw` builds a variable on the host only
# if its initialiser returned into the model's own trace, and a jitted branch's trace is reused.
JittedBranch = nn.jit(BasicBranch, static_argnames=("train",))


class ScannedStochasticDepth(StochasticDepth):
    """StochasticDepth with the (carry, scanned input, broadcast) signature `nn.scan` needs.
    `always_on`: every scanned block survives with probability 1, so none gets a gate."""

    train: bool = False
    always_on: bool = False

    def __call__(self, x, survival_prob, gate, drop_scale, mask):
        survival_prob = 1.0 if self.always_on else survival_prob
        return super().__call__(x, survival_prob, train=self.train, drop_scale=drop_scale, mask=mask, gate=gate), None


class Stage(nn.Module):
    """n stochastic-depth blocks: the first with its own branch and shortcut (it may change the
    shape), then n - 1 identical ones. Shared by the CIFAR and ImageNet models.

    Branches are unbound Linen modules (`parent=None`), adopted by each block; shortcuts are
    functions or modules (see `StochasticDepth`). With `scan_blocks`, blocks 2..n run under
    `nn.scan` with their survival probabilities as the scanned input, so compile time does not grow
    with depth. `gate_certain_blocks`: see `StochasticDepth`.
    """

    first_branch: nn.Module
    first_shortcut: Any
    branch: nn.Module
    shortcut: Any
    survival_probs: tuple
    train: bool
    drop_mode: str = "block"
    scan_blocks: bool = False
    gate_certain_blocks: bool = False

    @nn.compact
    def __call__(self, x, drop_scale, mask, gates):
        """`gates`: each block's gate drawn by the model, or None for a block that draws none
        (`model_gates`)."""
        first = StochasticDepth(self.first_branch, self.first_shortcut, self.drop_mode,
                                gate_certain_blocks=self.gate_certain_blocks, name="block0")
        x = first(x, self.survival_probs[0], train=self.train, drop_scale=drop_scale, mask=mask, gate=gates[0])
        rest = self.survival_probs[1:]
        if not self.scan_blocks:
            for i, p in enumerate(rest, start=1):
                block = StochasticDepth(self.branch, self.shortcut, self.drop_mode,
                                        gate_certain_blocks=self.gate_certain_blocks, name=f"block{i}")
                x = block(x, p, train=self.train, drop_scale=drop_scale, mask=mask, gate=gates[i])
            return x
        if not rest:
            return x
        always_on = min(rest) >= 1.0
        block = ScannedStochasticDepth
        if always_on and self.train and not self.gate_certain_blocks:
            # Differentiating a scan keeps every value the body's backward pass reads, one copy per
            # block: the gateless blocks keep only what a gate keeps (sd_jax.layers.gate) and
            # recompute the elementwise rest, as XLA does for the unrolled ones. (Not around a gate:
            # the backward pass would run the gate's forward conditional again.)
            block = nn.remat(block, policy=SAVE_POLICY, prevent_cse=False)
        blocks = nn.scan(
            block,
            variable_axes={"params": 0, "batch_stats": 0, "gates": 0},
            split_rngs={"params": True, "drop": True},
            in_axes=(0, 0, nn.broadcast, nn.broadcast),
            length=len(rest),
        )(self.branch, self.shortcut, self.drop_mode, gate_certain_blocks=self.gate_certain_blocks, train=self.train,
          always_on=always_on, name="blocks")
        drawn = None if gates[1] is None else jnp.stack(gates[1:])
        x, _ = blocks(x, jnp.asarray(rest, jnp.float32), drawn, drop_scale, mask)
        return x


def model_gates(module: nn.Module, survival_probs, train: bool, drop_mode: str, gate_certain_blocks: bool,
                drop_scale) -> list:
    """Every block's gate of a training step in one random call from the module's "drop" stream
    (`draw_gates`); all None where no block has one (evaluation, initialisation, constant depth,
    "sample" mode)."""
    if not train or module.is_initializing() or not any(
            has_gate(drop_mode, p, gate_certain_blocks) for p in survival_probs):
        return [None] * len(survival_probs)
    return draw_gates(module.make_rng("drop"), survival_probs, drop_scale)


class ResNetCIFAR(nn.Module):
    """Depth-(6n+2) CIFAR ResNet with stochastic depth over its 3n residual blocks.

    `p_last` and `survival_mode` set the survival schedule (p_last=1.0: the constant-depth baseline).
    `drop_mode` "block" is the paper's method; "sample" is per-example drop path.
    `dtype` is the compute dtype; parameters stay float32. `apply(variables, x, train=...)` takes
    NHWC float images; training needs a "drop" RNG and mutable "batch_stats" (and "gates" to read
    which blocks ran). `bn_axis_name` synchronises BatchNorm statistics over that mapped axis.
    `mask` (N,) marks the real images of a padded training batch for the BatchNorm statistics.
    The defaults of `bn_scale_init`, `conv_init_fan`, `classifier_init` and `shortcut_downsample`
    follow the authors' Torch code as of the paper (docs/fidelity.md).
    """

    depth: int
    num_classes: int = 10
    p_last: float = 0.5
    survival_mode: str = "linear"
    drop_mode: str = "block"
    dtype: Any = jnp.float32
    scan_blocks: bool = False
    conv_grads: str = "auto"
    bn_axis_name: Optional[str] = None
    bn_scale_init: str = "uniform"
    conv_init_fan: str = "fan_in"
    classifier_init: str = "torch"
    shortcut_downsample: str = "subsample"
    gate_certain_blocks: bool = False  # see StochasticDepth; make_model sets it on the CPU

    @property
    def num_blocks(self) -> int:
        return 3 * blocks_per_stage(self.depth)

    def survival_probabilities(self) -> np.ndarray:
        return survival_probabilities(self.num_blocks, self.p_last, self.survival_mode)

    def stage_sizes(self) -> dict:
        """{stage name: blocks}: the layout converters' argument (`stack_blocks`, `unstack_blocks`)."""
        return cifar_stage_sizes(self.depth)

    def block_macs(self, image_size: int = 32):
        """(multiply-adds of each residual branch, of everything outside them: stem and classifier)
        for one image, convolutions and the classifier only."""
        n = blocks_per_stage(self.depth)
        costs, channels_in, size = [], STAGE_FEATURES[0], image_size
        for stage, channels in enumerate(STAGE_FEATURES):
            for i in range(n):
                out_size = -(-size // 2) if (stage > 0 and i == 0) else size
                costs.append(9 * out_size * out_size * channels * (channels_in + channels))
                channels_in, size = channels, out_size
        fixed = 9 * image_size * image_size * 3 * STAGE_FEATURES[0] + STAGE_FEATURES[-1] * self.num_classes
        return np.array(costs, np.float64), float(fixed)

    @nn.compact
    def __call__(self, x, train: bool = False, drop_scale: Any = 1.0, mask=None):
        n = blocks_per_stage(self.depth)
        probs = [float(p) for p in self.survival_probabilities()]
        gates = model_gates(self, probs, train, self.drop_mode, self.gate_certain_blocks, drop_scale)
        mask = example_mask(mask)
        x = Conv3x3(STAGE_FEATURES[0], dtype=self.dtype, conv_grads=self.conv_grads, init_fan=self.conv_init_fan,
                    name="conv1")(x)
        x = nn.relu(batch_norm(train, self.dtype, "bn1", self.bn_axis_name, self.bn_scale_init)(x, mask))
        for s, features in enumerate(STAGE_FEATURES):
            branch_class = BasicBranch if self.is_initializing() else JittedBranch
            branch = lambda stride: branch_class(features, stride, self.dtype, self.conv_grads, self.bn_axis_name,
                                                 self.bn_scale_init, self.conv_init_fan, parent=None)
            shortcut = lambda stride: option_a(features, stride, self.shortcut_downsample)
            stride = 1 if s == 0 else 2
            x = Stage(branch(stride), shortcut(stride), branch(1), shortcut(1), tuple(probs[s * n:(s + 1) * n]),
                      train, self.drop_mode, self.scan_blocks, self.gate_certain_blocks,
                      name=f"stage{s + 1}")(x, drop_scale, mask, gates[s * n:(s + 1) * n])
        return classifier(self.num_classes, STAGE_FEATURES[-1], self.classifier_init)(global_average_pool(x))


def count_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def active_blocks(gates) -> jax.Array:
    """Number of blocks that ran (per example, averaged) from the "gates" collection of one step."""
    return sum(jnp.sum(g) for g in jax.tree.leaves(gates))


def cifar_stage_sizes(depth: int) -> dict:
    return {f"stage{s + 1}": blocks_per_stage(depth) for s in range(len(STAGE_FEATURES))}


def stack_blocks(variables, stage_sizes: dict):
    """Unrolled-layout variables (STAGE/blockI) -> the scan_blocks=True layout (STAGE/block0 and
    STAGE/blocks, blocks 1..n-1 stacked on the host); `stage_sizes` maps each stage's name to its n."""

    def convert(stage, n):
        out = {"block0": stage["block0"]}
        if n > 1:
            out["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *[stage[f"block{i}"] for i in range(1, n)])
        return out

    return _map_stages(variables, stage_sizes, convert)


def unstack_blocks(variables, stage_sizes: dict):
    """scan_blocks=True layout variables -> the unrolled layout (STAGE/block0..block{n-1})."""

    def convert(stage, n):
        out = {"block0": stage["block0"]}
        for i in range(1, n):
            out[f"block{i}"] = jax.tree.map(lambda x, i=i: x[i - 1], stage["blocks"])
        return out

    return _map_stages(variables, stage_sizes, convert)


def to_scanned_layout(variables, depth: int):
    """ResNetCIFAR variables, unrolled -> scan_blocks=True layout."""
    return stack_blocks(variables, cifar_stage_sizes(depth))


def to_unrolled_layout(variables, depth: int):
    """ResNetCIFAR variables, scan_blocks=True -> unrolled layout."""
    return unstack_blocks(variables, cifar_stage_sizes(depth))


def _map_stages(variables, stage_sizes, convert):
    return {
        collection: {k: convert(v, stage_sizes[k]) if k in stage_sizes else v for k, v in tree.items()}
        for collection, tree in variables.items()
    }
