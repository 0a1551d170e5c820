"""3x3 convolution (padding 1, stride 1 or 2, no bias) with an explicitly written backward pass.

Why: on XLA:CPU, the convolutions JAX derives for a conv's backward pass use non-canonical dimension
orders; at the top level XLA fixes that with layout changes, but inside a `lax.cond` branch (every
stochastic-depth block) it does not, and they fall back to a generic loop 50-100x slower. Here the
backward pass is written as ordinary NHWC/HWIO convolutions on explicitly transposed operands, which
XLA:CPU runs on its fast path everywhere. `conv_grads="xla"` keeps JAX's own derivative.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from sd_jax.layers.initializers import he_normal

_NHWC = ("NHWC", "HWIO", "NHWC")
_PAD = ((1, 1), (1, 1))
CONV_GRADS = ("auto", "explicit", "xla")


def _conv(x, kernel, stride):
    return lax.conv_general_dilated(x, kernel, (stride, stride), _PAD, dimension_numbers=_NHWC)


def _dilate(g, height, width):
    """Place the stride-2 output grad on the input grid (zeros between), cropped to height x width."""
    n, h, w, c = g.shape
    g = jnp.pad(g[:, :, None, :, None, :], ((0, 0), (0, 0), (0, 1), (0, 0), (0, 1), (0, 0)))
    return g.reshape(n, 2 * h, 2 * w, c)[:, :height, :width]


def _input_grad(g, kernel):
    """Gradient w.r.t. the input: correlate the (dilated) output grad with the flipped kernel."""
    return _conv(g, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), 1)


def _kernel_grad(x, g):
    """Gradient w.r.t. the kernel as a canonical conv: batch becomes the contracted feature axis."""
    lhs = jnp.transpose(x, (3, 1, 2, 0))  # C_in, H, W, N
    rhs = jnp.transpose(g, (1, 2, 0, 3))  # H, W, N, C_out  (a kernel the size of the image)
    out = _conv(lhs, rhs, 1)  # C_in, 3, 3, C_out
    return jnp.transpose(out, (1, 2, 0, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3(x, kernel, stride):
    """NHWC x HWIO 3x3 convolution, padding 1 on every side (as PyTorch/Torch7 `padding=1`)."""
    return _conv(x, kernel, stride)


def _conv3x3_fwd(x, kernel, stride):
    return _conv(x, kernel, stride), (x, kernel)


def _conv3x3_bwd(stride, residuals, g):
    x, kernel = residuals
    if stride == 2:
        g = _dilate(g, x.shape[1], x.shape[2])
    elif stride != 1:
        raise ValueError(f"conv3x3 supports stride 1 or 2, got {stride}")
    return _input_grad(g, kernel).astype(x.dtype), _kernel_grad(x, g).astype(kernel.dtype)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def resolve_conv_grads(conv_grads: str, platform: str = "") -> str:
    """"auto" -> "explicit" on CPU (where it avoids the slow path), "xla" on GPU/TPU; `platform`
    defaults to JAX's default backend (sd_jax.aot names the target's)."""
    if conv_grads not in CONV_GRADS:
        raise ValueError(f"conv_grads must be one of {CONV_GRADS}, got {conv_grads!r}")
    if conv_grads == "auto":
        return "explicit" if (platform or jax.default_backend()) == "cpu" else "xla"
    return conv_grads


def conv3x3_in(x, kernel, stride: int, dtype, conv_grads: str = "auto"):
    """The 3x3 convolution computed in `dtype`, with the backward pass `conv_grads` resolves to."""
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if resolve_conv_grads(conv_grads) == "explicit":
        return conv3x3(x, kernel, stride)
    return _conv(x, kernel, stride)


class Conv3x3(nn.Module):
    """Bias-free 3x3 conv, padding 1, He-normal init: std sqrt(2 / fan).

    `init_fan="fan_in"` is the authors' Torch code (`nninit.kaiming, {gain='relu'}`, whose fan is
    nInputPlane * kH * kW); "fan_out" is torchvision's and fb.resnet.torch's. The authors' convs
    also carry a bias initialised to 0; every conv feeds a BatchNorm, which removes it, so it is
    left out.
    """

    features: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32
    conv_grads: str = "auto"
    init_fan: str = "fan_in"

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", he_normal(self.init_fan), (3, 3, x.shape[-1], self.features), jnp.float32)
        return conv3x3_in(x, kernel, self.stride, self.dtype, self.conv_grads)
