import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sd_jax.layers.conv import Conv3x3, conv3x3


def reference_conv(x, kernel, stride):
    return lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("stride,size,c_in,c_out", [(1, 8, 3, 5), (2, 8, 4, 6), (2, 7, 3, 2), (1, 5, 2, 2)])
def test_explicit_backward_matches_autodiff(stride, size, c_in, c_out):
    kx, kw = jax.random.split(jax.random.key(stride * 100 + size))
    x = jax.random.normal(kx, (2, size, size, c_in))
    kernel = jax.random.normal(kw, (3, 3, c_in, c_out))
    ours = jax.grad(lambda x, k: jnp.sum(jnp.sin(conv3x3(x, k, stride))), (0, 1))(x, kernel)
    ref = jax.grad(lambda x, k: jnp.sum(jnp.sin(reference_conv(x, k, stride))), (0, 1))(x, kernel)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(conv3x3(x, kernel, stride), reference_conv(x, kernel, stride), atol=1e-6)


def test_padding_is_symmetric_like_pytorch():
    # A stride-2 conv of an all-ones image with an all-ones kernel: with padding 1 on every side
    # (PyTorch padding=1) the top-left output sums a 2x2 window, the next one a 2x3 window.
    y = conv3x3(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), 2)
    np.testing.assert_array_equal(np.asarray(y)[0, :, :, 0], [[4, 6], [6, 9]])


def test_module_variants_agree_and_use_float32_params():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    explicit, xla = Conv3x3(4, 2, conv_grads="explicit"), Conv3x3(4, 2, conv_grads="xla")
    variables = explicit.init(jax.random.key(1), x)
    assert variables["params"]["kernel"].dtype == jnp.float32
    assert "bias" not in variables["params"]
    np.testing.assert_allclose(explicit.apply(variables, x), xla.apply(variables, x), atol=1e-6)
    y = Conv3x3(4, 1, dtype=jnp.bfloat16).apply(variables, x)
    assert y.dtype == jnp.bfloat16
