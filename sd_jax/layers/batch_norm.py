"""BatchNorm as in Torch7/PyTorch, with an optional per-example mask for a padded last batch.

Why not `flax.linen.BatchNorm`: with a mask and a device axis it averages the devices' masked means,
which is wrong when the devices hold different numbers of real images (the last, partial batch of
an epoch). Here the statistics are sums and counts added over the devices, so every real image
weighs the same wherever it sits. Without a mask the arithmetic is Flax's (E[x], E[x^2], variance
clipped at 0), and the variables have Flax's names and shapes, so checkpoints are interchangeable.
The statistics are computed, and kept, in at least float32 and in float64 for a float64 input or
model, as Flax's `BatchNorm` computes them (`promote_types(dtype, float32)`).
"""
from typing import Any, Callable, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from sd_jax.layers import initializers
from sd_jax.layers.gate import SAVED_NAME

MOMENTUM = 0.9  # running = MOMENTUM * running + (1 - MOMENTUM) * batch: Torch/PyTorch momentum 0.1
EPSILON = 1e-5


def at_least_float32(dtype):
    """The dtype of averages (BatchNorm statistics, pooling): float32 for bfloat16 and float32, float64 when given."""
    return jnp.promote_types(dtype, jnp.float32)


@flax.struct.dataclass
class ExampleMask:
    """Which examples of a padded batch are real, and how many. A model makes it once per call
    (`example_mask`), so that every BatchNorm reads the count: inside a gate's conditional XLA
    cannot share the mask's sum between blocks, and each open gate summed it again (a kernel)."""

    real: jax.Array  # (N,) bool
    count: jax.Array  # () float32


def example_mask(mask):
    """`mask` ((N,) bool: the real examples) as an `ExampleMask`; None and an `ExampleMask` as they are."""
    if mask is None or isinstance(mask, ExampleMask):
        return mask
    return ExampleMask(mask, jnp.sum(mask.astype(jnp.float32)))


def _sums(x, mask, axis_name):
    """(sum x, sum x^2, count) over batch and space, masked per example, added over `axis_name`."""
    axes = tuple(range(x.ndim - 1))
    mask = example_mask(mask)
    if mask is None:
        count = jnp.asarray(x.size // x.shape[-1], x.dtype)
        sums = jnp.stack([jnp.sum(x, axes), jnp.sum(x * x, axes)])
    else:
        weights = mask.real.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        count = mask.count.astype(x.dtype) * (x.size // (x.shape[0] * x.shape[-1]))
        sums = jnp.stack([jnp.sum(x * weights, axes), jnp.sum(x * x * weights, axes)])
    if axis_name is not None:
        sums, count = jax.lax.psum((sums, count), axis_name)
    return sums[0], sums[1], count


def batch_moments(x, mask=None, axis_name=None):
    """Mean and (biased) variance per channel of NHWC `x` over the examples where `mask` is true."""
    x = x.astype(at_least_float32(x.dtype))
    if mask is None and axis_name is None:  # Flax's own reduction order: identical results
        mean, mean_sq = jnp.mean(x, tuple(range(x.ndim - 1))), jnp.mean(x * x, tuple(range(x.ndim - 1)))
    else:
        total, total_sq, count = _sums(x, mask, axis_name)
        count = checkpoint_name(jnp.maximum(count, 1.0), SAVED_NAME)
        mean, mean_sq = total / count, total_sq / count
    # What a gated branch keeps of the statistics for its backward pass (sd_jax.layers.gate): the
    # reductions, so that it recomputes only elementwise work.
    mean, mean_sq = checkpoint_name((mean, mean_sq), SAVED_NAME)
    return mean, jnp.maximum(mean_sq - mean * mean, 0.0)


def train_statistics(x, mask=None, axis_name=None):
    """(x, mean, variance) of a training step: `x` named as what a gated branch keeps for its
    backward pass (a convolution's output; sd_jax.layers.gate), so it recomputes the elementwise rest."""
    x = checkpoint_name(x, SAVED_NAME)
    return (x,) + batch_moments(x, mask, axis_name)


def running_average(running, batch, momentum: float = MOMENTUM):
    """The running statistic after one batch: momentum * running + (1 - momentum) * batch."""
    return (momentum * running + (1 - momentum) * batch).astype(running.dtype)


def normalize(x, mean, var, scale, bias, epsilon: float, dtype):
    """(x - mean) / sqrt(var + epsilon) * scale + bias, in `dtype`. The per-channel factor is what a
    gated branch keeps (sd_jax.layers.gate): its backward pass would otherwise recompute it, a kernel."""
    factor = checkpoint_name(jax.lax.rsqrt(var + epsilon) * scale, SAVED_NAME)
    return jnp.asarray((x - mean) * factor + bias, dtype)


class BatchNorm(nn.Module):
    """Normalise over batch and space with batch statistics (training) or running averages.

    `scale_init` sets the initial scale: ones (PyTorch) or uniform in [0, 1) (Torch7's
    `BatchNormalization:reset()`, which the authors' code kept). `axis_name` averages the
    statistics over that mapped axis (synchronised BatchNorm). `mask` (N,) leaves padded examples
    out of the statistics.
    """

    use_running_average: bool
    dtype: Any = jnp.float32
    axis_name: Optional[str] = None
    scale_init: Callable = initializers.constant(1.0)
    momentum: float = MOMENTUM
    epsilon: float = EPSILON

    @nn.compact
    def __call__(self, x, mask=None):
        features, stats_dtype = (x.shape[-1],), at_least_float32(self.dtype)
        running_mean = self.variable("batch_stats", "mean", initializers.constant(0.0), None, features, stats_dtype)
        running_var = self.variable("batch_stats", "var", initializers.constant(1.0), None, features, stats_dtype)
        scale = self.param("scale", self.scale_init, features, jnp.float32)
        bias = self.param("bias", initializers.constant(0.0), features, jnp.float32)
        if self.use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            x, mean, var = train_statistics(x, mask, self.axis_name)
            if not self.is_initializing():
                running_mean.value = running_average(running_mean.value, mean, self.momentum)
                running_var.value = running_average(running_var.value, var, self.momentum)
        return normalize(x, mean, var, scale, bias, self.epsilon, self.dtype)
