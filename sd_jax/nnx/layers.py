"""The stochastic-depth layer and the layers of the models as Flax NNX modules.

The arithmetic is the Linen layers' own (sd_jax.layers: the gate, BatchNorm's statistics, the 3x3
convolution), so the two APIs compute the same numbers; only the way a module holds its state
differs. Training or evaluation is an attribute, as in NNX's own layers: `model.train()` sets
`deterministic=False` (gates drawn) and `use_running_average=False` (batch statistics);
`model.eval()` sets both to True.
"""
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx

from sd_jax.layers.batch_norm import EPSILON, MOMENTUM, at_least_float32, normalize, running_average, train_statistics
from sd_jax.layers.conv import conv3x3_in
from sd_jax.layers.initializers import he_normal
from sd_jax.layers.gate import gated_residual
from sd_jax.layers.stochastic_depth import DROP_MODES, always_survives, drop_path, evaluation_scale, identity
from sd_jax.layers.survival import scaled_survival

RngSource = Union[nnx.Rngs, nnx.RngStream, jax.Array]


class Gates(nnx.Variable):
    """The record of a block's last training call: the fraction of the batch its branch ran for
    (1 or 0 for a block gate); NaN until the block has trained. `nnx.state(model, Gates)`."""


class StochasticDepth(nnx.Module):
    """out = activation(shortcut(x) + f(x)), where the branch f survives with probability p.

    The NNX twin of `sd_jax.layers.StochasticDepth` (read its docstring for the method): `branch`
    is any NNX module called as `branch(x)` (or `branch(x, mask=mask)` when a mask is given); it
    becomes the attribute `f`. `shortcut` is a function or an NNX module (a projection), the
    attribute `skip`; it always runs, outside the gate. `survival_prob` is fixed at construction;
    the Python number 1 makes a plain residual block with no gate.

    Training (`deterministic=False`): in "block" mode one Bernoulli(p) gate per call, drawn from
    the layer's own fork of the `rngs` stream `rng_collection` ("drop"), or from `rngs` itself when
    it is an `nnx.RngStream` (which blocks may share); a closed gate skips the
    branch forward and backward (`sd_jax.layers.gate.gated_residual`, the Linen layer's conditional,
    rather than `nnx.cond`, whose derivative writes zeros for every value the branch keeps) and
    leaves its BatchNorm statistics as they were. "sample" mode scales f(x) by a per-example
    mask / p (drop path; no compute is skipped). `drop_scale` scales the drop rate (warm-up).
    Evaluation (`deterministic=True`): activation(shortcut(x) + p f(x)) in "block" mode,
    activation(shortcut(x) + f(x)) in "sample" mode. The attribute `active` (a `Gates` variable)
    records the last training call.
    """

    def __init__(self, branch: nnx.Module, survival_prob: Any,
                 shortcut: Union[Callable[[jax.Array], jax.Array], nnx.Module] = identity, *,
                 drop_mode: str = "block", activation: Optional[Callable[[jax.Array], jax.Array]] = jax.nn.relu,
                 gate_certain_blocks: bool = False, deterministic: bool = False, rng_collection: str = "drop",
                 rngs: Optional[Union[nnx.Rngs, nnx.RngStream]] = None):
        if drop_mode not in DROP_MODES:
            raise ValueError(f"drop mode must be one of {DROP_MODES}, got {drop_mode!r}")
        self.f, self.skip, self.survival_prob = branch, shortcut, survival_prob
        self.drop_mode, self.activation, self.gate_certain_blocks = drop_mode, activation, gate_certain_blocks
        self.deterministic, self.rng_collection = deterministic, rng_collection
        gated = not always_survives(survival_prob) or gate_certain_blocks
        if gated and rngs is None:
            raise ValueError(f"a block that survives with probability {survival_prob} draws a gate: pass "
                             f"rngs=nnx.Rngs({rng_collection}=SEED) (or an nnx.Rngs with a default stream)")
        if not gated:
            self.rngs = nnx.data(None)
        elif isinstance(rngs, nnx.RngStream):
            self.rngs = rngs  # shared as it is: the models give all their blocks one stream, one counter
        else:
            self.rngs = rngs[rng_collection].fork()
        self.active = Gates(jnp.float32(jnp.nan))

    def _activate(self, out):
        return out if self.activation is None else self.activation(out)

    def _call(self, module, x, mask):
        return module(x) if mask is None else module(x, mask=mask)

    def _key(self, rngs: Optional[RngSource]):
        source = self.rngs if rngs is None else rngs
        if isinstance(source, nnx.Rngs):
            source = source[self.rng_collection]
        return source() if isinstance(source, nnx.RngStream) else source

    def __call__(self, x, *, drop_scale: Any = 1.0, mask=None, deterministic: Optional[bool] = None,
                 rngs: Optional[RngSource] = None, gate=None):
        """`rngs` (an nnx.Rngs, an RngStream or a key) replaces the layer's own stream for this call;
        `gate` (a boolean scalar), when given, is this call's block gate, drawn by the caller
        (`sd_jax.layers.stochastic_depth.draw_gates`: one draw for many blocks, as the models do)."""
        shortcut = self._call(self.skip, x, mask) if isinstance(self.skip, nnx.Module) else self.skip(x)
        p = self.survival_prob
        if self.deterministic if deterministic is None else deterministic:
            scale = evaluation_scale(self.drop_mode, p)
            return self._activate(shortcut + (scale * self._call(self.f, x, None)).astype(shortcut.dtype))
        if always_survives(p) and not self.gate_certain_blocks:
            self.active[...] = jnp.float32(1.0)
            return self._activate(shortcut + self._call(self.f, x, mask).astype(shortcut.dtype))
        p = scaled_survival(jnp.asarray(p, jnp.float32), drop_scale)
        if self.drop_mode == "sample":
            residual, kept = drop_path(self._key(rngs), p, x, self._call(self.f, x, mask))
            self.active[...] = kept
            return self._activate(shortcut + residual.astype(shortcut.dtype))
        gate = jax.random.bernoulli(self._key(rngs), p) if gate is None else gate
        self.active[...] = gate.astype(jnp.float32)
        graphdef, params, state = nnx.split(self.f, nnx.Param, ...)

        def branch(params, state, x, mask):
            module = nnx.merge(graphdef, params, state, copy=True)
            y = self._call(module, x, mask)
            return y, nnx.split(module, nnx.Param, ...)[2]

        out, new_state = gated_residual(branch, self.activation, gate, params, x, shortcut, state, mask)
        nnx.update(self.f, new_state)
        return out


class BatchNorm(nnx.Module):
    """`sd_jax.layers.BatchNorm` as an NNX module (Torch's momentum and epsilon, statistics in at
    least float32, an optional mask of real examples, `axis_name` for synchronised statistics);
    variables `scale`, `bias` (nnx.Param) and `mean`, `var` (nnx.BatchStat), named as Linen's."""

    def __init__(self, features: int, *, use_running_average: bool = False, dtype: Any = jnp.float32,
                 axis_name: Optional[str] = None, scale_init: Callable = nnx.initializers.ones,
                 momentum: float = MOMENTUM, epsilon: float = EPSILON, rngs: nnx.Rngs):
        stats_dtype = at_least_float32(dtype)
        self.mean = nnx.BatchStat(jnp.zeros((features,), stats_dtype))
        self.var = nnx.BatchStat(jnp.ones((features,), stats_dtype))
        self.scale = nnx.Param(scale_init(rngs.params(), (features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.use_running_average, self.dtype, self.axis_name = use_running_average, dtype, axis_name
        self.momentum, self.epsilon = momentum, epsilon

    def __call__(self, x, mask=None):
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            x, mean, var = train_statistics(x, mask, self.axis_name)
            self.mean[...] = running_average(self.mean[...], mean, self.momentum)
            self.var[...] = running_average(self.var[...], var, self.momentum)
        return normalize(x, mean, var, self.scale[...], self.bias[...], self.epsilon, self.dtype)


class Conv3x3(nnx.Module):
    """`sd_jax.layers.Conv3x3` as an NNX module: bias-free 3x3 conv, padding 1, He-normal init over
    `init_fan`, the backward pass `conv_grads` chooses; its variable `kernel` (HWIO) is Linen's."""

    def __init__(self, in_features: int, features: int, stride: int = 1, *, dtype: Any = jnp.float32,
                 conv_grads: str = "auto", init_fan: str = "fan_in", rngs: nnx.Rngs):
        self.kernel = nnx.Param(he_normal(init_fan)(rngs.params(), (3, 3, in_features, features), jnp.float32))
        self.stride, self.dtype, self.conv_grads = stride, dtype, conv_grads

    def __call__(self, x):
        return conv3x3_in(x, self.kernel[...], self.stride, self.dtype, self.conv_grads)


def active_blocks(model: nnx.Module) -> jax.Array:
    """Number of blocks that ran (per example, averaged) in the model's last training call."""
    return sum(jnp.sum(g) for g in jax.tree.leaves(nnx.state(model, Gates)))
