"""The gate's custom VJP (sd_jax.layers.gate) against JAX differentiating the plain conditional it
replaces, in float64: the output, the new state and every gradient, gate open and closed."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from sd_jax.layers import gate as gate_module
from sd_jax.layers.gate import SAVED_NAME, gated_residual


def branch(params, state, x, mask):
    """A residual branch with what the real ones have: a matrix and vectors as parameters, a value
    kept for the backward pass by name, an elementwise rest to recompute, a running statistic and
    a per-example mask."""
    h = checkpoint_name(x @ params["w"], SAVED_NAME)
    weights = mask.astype(x.dtype)[:, None]
    mean = checkpoint_name(jnp.sum(h * weights, 0) / jnp.sum(weights), SAVED_NAME)
    y = jnp.tanh(h - mean) * params["scale"] + params["bias"]
    return jax.nn.relu(y) @ params["w2"], {"stats": {"mean": 0.9 * state["stats"]["mean"] + 0.1 * mean}}


def reference(activation, gate, params, x, shortcut, state, mask):
    """What the layer computed before: `lax.cond` over the branch, differentiated by JAX."""
    y, new_state = lax.cond(gate, lambda: branch(params, state, x, mask), lambda: (jnp.zeros_like(shortcut), state))
    pre = shortcut + y
    return (pre if activation is None else activation(pre)), new_state


def inputs(seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 7)
    params = {"w": jax.random.normal(keys[0], (3, 5), jnp.float64), "w2": jax.random.normal(keys[1], (5, 3), jnp.float64),
              "scale": jax.random.normal(keys[2], (5,), jnp.float64), "bias": jax.random.normal(keys[3], (5,), jnp.float64)}
    x = jax.random.normal(keys[4], (4, 3), jnp.float64)
    shortcut = jax.random.normal(keys[5], (4, 3), jnp.float64)
    state = {"stats": {"mean": jax.random.normal(keys[6], (5,), jnp.float64)}}
    return params, x, shortcut, state, jnp.array([True, True, False, True])


@pytest.fixture
def float64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("open_gate", [True, False])
@pytest.mark.parametrize("activation", [jax.nn.relu, jnp.tanh, None], ids=["relu", "tanh", "none"])
@pytest.mark.parametrize("packed_max_size", [gate_module.PACKED_MAX_SIZE, 4], ids=["packed", "mostly-unpacked"])
def test_values_and_gradients_equal_the_differentiated_conditional(float64, monkeypatch, open_gate, activation,
                                                                   packed_max_size):
    monkeypatch.setattr(gate_module, "PACKED_MAX_SIZE", packed_max_size)
    params, x, shortcut, state, mask = inputs()
    weights = jax.random.normal(jax.random.PRNGKey(1), shortcut.shape, jnp.float64)
    gate = jnp.asarray(open_gate)

    def loss(function, params, x, shortcut):
        out, new_state = function(gate, params, x, shortcut, state, mask)
        return jnp.sum(weights * out), (out, new_state)

    ours = lambda *args: gated_residual(branch, activation, *args)
    theirs = lambda *args: reference(activation, *args)
    (_, (out, new_state)), grads = jax.jit(jax.value_and_grad(lambda *a: loss(ours, *a), (0, 1, 2), has_aux=True))(
        params, x, shortcut)
    (_, (out_ref, state_ref)), grads_ref = jax.value_and_grad(lambda *a: loss(theirs, *a), (0, 1, 2), has_aux=True)(
        params, x, shortcut)
    np.testing.assert_allclose(out, out_ref, rtol=1e-12, atol=1e-12)
    for leaf, leaf_ref in zip(jax.tree.leaves((new_state, grads)), jax.tree.leaves((state_ref, grads_ref))):
        np.testing.assert_allclose(leaf, leaf_ref, rtol=1e-12, atol=1e-12)
    if not open_gate:  # a dropped branch: no gradient for its parameters, its statistic as it was
        assert all(not np.any(leaf) for leaf in jax.tree.leaves(grads[0]))
        np.testing.assert_array_equal(new_state["stats"]["mean"], state["stats"]["mean"])
    else:
        assert all(np.any(leaf) for leaf in jax.tree.leaves(grads[0]))



@pytest.mark.parametrize("open_gate", [True, False])
def test_what_a_closed_branch_leaves_uninitialised_is_never_read(float64, monkeypatch, open_gate):
    """On a GPU a closed branch returns its kept values, packed state and gradients uninitialised
    (`lax.empty`; elsewhere zeros): the GPU's code, run here with NaN for what `lax.empty` leaves,
    still gives the output, the new state and the gradients of the differentiated conditional."""
    monkeypatch.setattr(gate_module.lax, "platform_dependent", lambda *args, cuda, **others: cuda(*args))
    monkeypatch.setattr(gate_module.lax, "empty", lambda shape, dtype: jnp.full(shape, jnp.nan, dtype))
    params, x, shortcut, state, mask = inputs(3)
    gate = jnp.asarray(open_gate)

    def loss(function, params, x, shortcut):
        out, new_state = function(gate, params, x, shortcut, state, mask)
        return jnp.sum(jnp.sin(out)), new_state

    ours = lambda *args: gated_residual(branch, jax.nn.relu, *args)
    theirs = lambda *args: reference(jax.nn.relu, *args)
    (_, new_state), grads = jax.jit(jax.value_and_grad(lambda *a: loss(ours, *a), (0, 1, 2), has_aux=True))(
        params, x, shortcut)
    (_, state_ref), grads_ref = jax.value_and_grad(lambda *a: loss(theirs, *a), (0, 1, 2), has_aux=True)(
        params, x, shortcut)
    for leaf, leaf_ref in zip(jax.tree.leaves((new_state, grads)), jax.tree.leaves((state_ref, grads_ref))):
        assert np.all(np.isfinite(leaf))
        np.testing.assert_allclose(leaf, leaf_ref, rtol=1e-12, atol=1e-12)
