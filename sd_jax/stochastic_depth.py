"""A residual connection with stochastic depth around any residual branch (a Flax Linen layer)."""
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd_jax.survival import scaled_survival

DROP_MODES = ("block", "sample")


def identity(x):
    return x


class StochasticDepth(nn.Module):
    """out = activation(shortcut(x) + f(x)), where the branch f survives with probability p.

    `branch` is any Linen module called as `branch(x, train=...)`; it is adopted as the submodule
    `f`. `shortcut` is a parameter-free function. Drop modes (`drop_mode`):
      - "block" (the paper): one Bernoulli(p) gate per call from the "drop" RNG stream. A closed
        gate returns `shortcut(x)` through `nn.cond`, so the branch's forward and backward compute
        is skipped, its BatchNorm statistics stay as they were and its parameters get zero gradient.
        Evaluation: activation(shortcut(x) + p * f(x)).
      - "sample" (drop path): a per-example Bernoulli(p) mask scaling f(x) by mask / p; it cannot
        skip compute. Evaluation: activation(shortcut(x) + f(x)).
    `drop_scale` in [0, 1] scales the drop rate during training (1 - p) for drop-rate warm-up;
    evaluation always uses the target p. Training records the fraction of the batch for which the
    branch ran in the "gates" collection (make it mutable to read it). `mask` (N,), when given, is
    passed on as `branch(x, train=..., mask=mask)`: the real examples of a padded batch, for the
    branch's BatchNorm statistics.
    """

    branch: nn.Module
    shortcut: Callable[[jax.Array], jax.Array] = identity
    drop_mode: str = "block"
    activation: Optional[Callable[[jax.Array], jax.Array]] = nn.relu

    def setup(self):
        if self.drop_mode not in DROP_MODES:
            raise ValueError(f"drop mode must be one of {DROP_MODES}, got {self.drop_mode!r}")
        self.f = self.branch.clone(parent=None)

    def _combine(self, shortcut, residual):
        out = shortcut + residual.astype(shortcut.dtype)
        return out if self.activation is None else self.activation(out)

    def _residual(self, x, train: bool, mask):
        return self.f(x, train=train) if mask is None else self.f(x, train=train, mask=mask)

    def __call__(self, x, survival_prob: Any, *, train: bool, drop_scale: Any = 1.0, mask=None):
        if not train:
            scale = survival_prob if self.drop_mode == "block" else 1.0
            return self._combine(self.shortcut(x), scale * self.f(x, train=False))
        if self.is_initializing():
            return self._combine(self.shortcut(x), self._residual(x, True, mask))
        p = scaled_survival(jnp.asarray(survival_prob, jnp.float32), drop_scale)
        key = self.make_rng("drop")
        if self.drop_mode == "sample":
            keep = jax.random.bernoulli(key, p, (x.shape[0],) + (1,) * (x.ndim - 1))
            self.sow("gates", "active", keep.mean())
            residual = self._residual(x, True, mask)
            scale = jnp.where(keep, 1.0 / jnp.maximum(p, 1e-12), 0.0).astype(residual.dtype)
            return self._combine(self.shortcut(x), residual * scale)
        gate = jax.random.bernoulli(key, p)
        self.sow("gates", "active", gate.astype(jnp.float32))
        return nn.cond(
            gate,
            lambda module, x, mask: module._combine(module.shortcut(x), module._residual(x, True, mask)),
            lambda module, x, mask: module.shortcut(x),
            self,
            x,
            mask,
        )
