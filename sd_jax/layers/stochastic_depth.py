"""A residual connection with stochastic depth around any residual branch (a Flax Linen layer)."""
import functools
import numbers
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd_jax.layers.gate import gated_residual, on_gpu
from sd_jax.layers.survival import scaled_survival

DROP_MODES = ("block", "sample")


def identity(x):
    return x


def evaluation_scale(drop_mode: str, survival_prob):
    """The branch's factor at evaluation: p in "block" mode (the paper), 1 in "sample" mode."""
    return survival_prob if drop_mode == "block" else 1.0


def drop_path(key, p, x, residual):
    """"sample" mode: (the residual with each example kept with probability p and scaled by 1/p,
    the fraction kept); the mask is drawn per example of `x`."""
    keep = jax.random.bernoulli(key, p, (x.shape[0],) + (1,) * (x.ndim - 1))
    scale = jnp.where(keep, 1.0 / jnp.maximum(p, 1e-12), 0.0).astype(residual.dtype)
    return residual * scale, keep.mean()


def draw_gates(key, survival_probs, drop_scale=1.0) -> list:
    """The "block"-mode gates of several blocks in one random call, a boolean scalar each: block i
    open with probability 1 - drop_scale * (1 - p_i). A draw per block compiles to a random-bit
    program per block, which XLA fuses into one kernel whose size slows its fusion passes
    quadratically (docs/performance.md). The draw is `jax.random.bernoulli`'s, bit for bit (uniform
    < p). On a GPU each gate is the comparison of its element of the uniform vector with its
    probability: XLA writes every gate's comparison in one kernel (a conditional reads its
    predicate from a buffer of its own; a bare slice per gate would be a kernel each) and fuses it
    into whatever else reads the gate, so that the choices of the blocks' new BatchNorm statistics
    (`sd_jax.layers.gate`) share kernels. Elsewhere each gate is a reduction of the drawn booleans,
    which XLA also writes in one kernel: with the comparisons, XLA:CPU ran a step with every block
    dropped 9 times slower (ResNet-110: 0.154 against 0.017 s)."""
    probs = scaled_survival(jnp.asarray(survival_probs, jnp.float32), drop_scale)
    uniform = jax.random.uniform(key, probs.shape, probs.dtype)
    blocks = range(probs.shape[0])

    def reduced(uniform, probs):
        drawn, index = uniform < probs, jnp.arange(probs.shape[0])
        return [jnp.any(drawn & (index == i)) for i in blocks]

    return on_gpu(lambda uniform, probs: [uniform[i] < probs[i] for i in blocks], reduced, uniform, probs)


def always_survives(survival_prob) -> bool:
    """Whether `survival_prob` is known at trace time to be 1: such a block needs no gate at all."""
    return isinstance(survival_prob, numbers.Real) and survival_prob >= 1.0


def has_gate(drop_mode: str, survival_prob, gate_certain_blocks: bool) -> bool:
    """Whether a block's training call runs its branch behind a gate (see `StochasticDepth`)."""
    return drop_mode == "block" and (gate_certain_blocks or not always_survives(survival_prob))


class StochasticDepth(nn.Module):
    """out = activation(shortcut(x) + f(x)), where the branch f survives with probability p.

    `branch` is any Linen module called as `branch(x, train=...)`; it is adopted as the submodule
    `f`. `shortcut` is a parameter-free function (the CIFAR nets' identity or option A) or a Linen
    module called as `shortcut(x, train=...)` (a projection: 1x1 conv + BatchNorm), adopted as the
    submodule `skip`. The shortcut runs outside the gate, always: its parameters always get
    gradients and its BatchNorm statistics always update, as the authors' Torch code (the skip path
    always runs) and composer (a dropped downsampling block returns relu(downsample(x))) do.
    Drop modes (`drop_mode`):
      - "block" (the paper): one Bernoulli(p) gate per call from the "drop" RNG stream. A closed
        gate returns activation(shortcut(x)) through a conditional, forward and backward
        (`sd_jax.layers.gate`: a custom VJP whose closed branches write only what the step reads),
        so the branch's compute is skipped, its BatchNorm statistics stay as they were and its
        parameters get zero gradient. Evaluation: activation(shortcut(x) + p * f(x)).
      - "sample" (drop path): a per-example Bernoulli(p) mask scaling f(x) by mask / p; it cannot
        skip compute. Evaluation: activation(shortcut(x) + f(x)).
    `drop_scale` in [0, 1] scales the drop rate during training (1 - p) for drop-rate warm-up;
    evaluation always uses the target p. A block whose `survival_prob` is the Python number 1 (the
    constant-depth baseline, ImageNet's undroppable projection blocks) has no gate: a plain residual
    block, no conditional in the compiled program, unless `gate_certain_blocks` keeps an always-open
    one (XLA:CPU runs the branch's convolutions about twice as fast inside a conditional as at the
    top of the training loop: docs/performance.md; the models set it on the CPU only).
    Training records the fraction of the batch for which the
    branch ran in the "gates" collection (make it mutable to read it). `mask` (N,), when given, is
    passed on as `branch(x, train=..., mask=mask)` (and so to a module shortcut): the real examples
    of a padded batch, for the BatchNorm statistics. `gate`, when given, is the call's "block" gate
    drawn by the caller: a model with many blocks draws them all in one call (`draw_gates`, as the
    models do), which compiles far faster than a draw per block.
    """

    branch: nn.Module
    shortcut: Union[Callable[[jax.Array], jax.Array], nn.Module] = identity
    drop_mode: str = "block"
    activation: Optional[Callable[[jax.Array], jax.Array]] = nn.relu
    gate_certain_blocks: bool = False

    def setup(self):
        if self.drop_mode not in DROP_MODES:
            raise ValueError(f"drop mode must be one of {DROP_MODES}, got {self.drop_mode!r}")
        self.f = self.branch.clone(parent=None)
        if isinstance(self.shortcut, nn.Module):
            self.skip = self.shortcut.clone(parent=None)

    def _shortcut(self, x, train: bool, mask):
        if not isinstance(self.shortcut, nn.Module):
            return self.shortcut(x)
        return self.skip(x, train=train) if mask is None else self.skip(x, train=train, mask=mask)

    def _activate(self, out):
        return out if self.activation is None else self.activation(out)

    def _residual(self, x, train: bool, mask):
        return self.f(x, train=train) if mask is None else self.f(x, train=train, mask=mask)

    def __call__(self, x, survival_prob: Any, *, train: bool, drop_scale: Any = 1.0, mask=None, gate=None):
        shortcut = self._shortcut(x, train, mask)
        if not train:
            scale = evaluation_scale(self.drop_mode, survival_prob)
            return self._activate(shortcut + (scale * self.f(x, train=False)).astype(shortcut.dtype))
        if self.is_initializing() or (always_survives(survival_prob) and not self.gate_certain_blocks):
            if not self.is_initializing():
                self.sow("gates", "active", jnp.float32(1.0))
            return self._activate(shortcut + self._residual(x, True, mask).astype(shortcut.dtype))
        p = scaled_survival(jnp.asarray(survival_prob, jnp.float32), drop_scale)
        if self.drop_mode == "sample":
            residual, kept = drop_path(self.make_rng("drop"), p, x, self._residual(x, True, mask))
            self.sow("gates", "active", kept)
            return self._activate(shortcut + residual.astype(shortcut.dtype))
        gate = jax.random.bernoulli(self.make_rng("drop"), p) if gate is None else gate
        self.sow("gates", "active", gate.astype(jnp.float32))
        variables = dict(self.f.variables)
        params = variables.pop("params")
        rngs = {name: self.make_rng(name) for name in self.scope.rngs if name != "drop"}  # a branch's dropout, say
        out, new_state = gated_residual(functools.partial(_apply_branch, self.f.clone(parent=None)),
                                        self.activation, gate, params, x, shortcut, variables, (mask, rngs))
        for collection, tree in new_state.items():
            for name, value in tree.items():
                self.f.put_variable(collection, name, value)
        return out


def _apply_branch(branch: nn.Module, params, state, x, context):
    """The branch as a pure function: (its output, its new state); `context` is the mask of real
    examples (or None) and the keys of the RNG streams the layer was given."""
    mask, rngs = context
    kwargs = {} if mask is None else {"mask": mask}
    return branch.apply({"params": params, **state}, x, train=True, mutable=list(state), rngs=rngs, **kwargs)
