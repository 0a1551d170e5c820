import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.models.cifar import BasicBranch, option_a_shortcut
from sd_jax.layers.stochastic_depth import StochasticDepth, draw_gates

X = jax.random.normal(jax.random.key(0), (8, 8, 8, 4))


def make_layer(drop_mode="block", features=8, stride=2):
    branch = BasicBranch(features, stride, parent=None)
    shortcut = lambda x: option_a_shortcut(x, features, stride)
    return StochasticDepth(branch, shortcut, drop_mode), branch, shortcut


def init(layer):
    return layer.init(jax.random.key(1), X, 1.0, train=True)


def perturb_batch_stats(variables):
    """Non-trivial running statistics, so that eval-mode outputs depend on them."""
    stats = jax.tree.map(lambda v: v + 0.3, variables["batch_stats"])
    return {"params": variables["params"], "batch_stats": stats}


def train_apply(layer, variables, p, seed=2, drop_scale=1.0):
    return layer.apply(variables, X, p, train=True, drop_scale=drop_scale, rngs={"drop": jax.random.key(seed)},
                       mutable=["batch_stats", "gates"])


def branch_variables(variables):
    return {c: variables[c]["f"] for c in ("params", "batch_stats")}


def test_closed_gate_returns_activated_shortcut_and_keeps_batch_stats():
    layer, _, shortcut = make_layer()
    variables = perturb_batch_stats(init(layer))
    out, updates = train_apply(layer, variables, 0.0)
    np.testing.assert_array_equal(out, jax.nn.relu(shortcut(X)))  # X has negative values: relu matters
    for a, b in zip(jax.tree.leaves(updates["batch_stats"]), jax.tree.leaves(variables["batch_stats"])):
        np.testing.assert_array_equal(a, b)
    assert float(updates["gates"]["active"][0]) == 0.0


@pytest.mark.parametrize("p", [jnp.float32(1.0), 1.0], ids=["open gate", "no gate"])
def test_open_gate_runs_the_branch_and_updates_batch_stats(p):
    """A survival probability of 1 as an array opens the gate of a real conditional; as the Python
    number 1 (constant depth) it leaves the gate out: the same block either way."""
    layer, branch, shortcut = make_layer()
    variables = perturb_batch_stats(init(layer))
    out, updates = train_apply(layer, variables, p)
    residual, branch_updates = branch.apply(branch_variables(variables), X, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out, jax.nn.relu(shortcut(X) + residual), atol=1e-6)
    for a, b in zip(jax.tree.leaves(updates["batch_stats"]["f"]), jax.tree.leaves(branch_updates["batch_stats"])):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert float(updates["gates"]["active"][0]) == 1.0


def test_a_block_that_always_survives_has_no_conditional():
    layer, _, _ = make_layer()
    variables = init(layer)

    def conditionals(p):
        return str(jax.make_jaxpr(lambda v: train_apply(layer, v, p))(variables)).count(" cond[")

    assert conditionals(jnp.float32(1.0)) == 1 and conditionals(0.5) == 1
    assert conditionals(1.0) == 0
    layer = layer.clone(gate_certain_blocks=True)  # the CPU's choice: an always-open gate
    assert conditionals(1.0) == 1


def test_dropped_branch_gets_zero_gradient():
    layer, _, _ = make_layer()
    variables = init(layer)

    def grads(p):
        def loss(params):
            out, _ = train_apply(layer, {"params": params, "batch_stats": variables["batch_stats"]}, p)
            return jnp.sum(out ** 2)
        return jax.grad(loss)(variables["params"])

    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads(0.0)))
    assert all(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(grads(1.0)))


@pytest.mark.parametrize("p", [0.3, 0.75])
def test_eval_scales_branch_by_survival_probability(p):
    layer, branch, shortcut = make_layer()
    variables = perturb_batch_stats(init(layer))
    out = layer.apply(variables, X, p, train=False)
    residual = branch.apply(branch_variables(variables), X, train=False)
    np.testing.assert_allclose(out, jax.nn.relu(shortcut(X) + p * residual), atol=1e-6)


def test_gate_frequency_matches_survival_probability():
    layer, _, _ = make_layer()
    variables = init(layer)
    draws = 400
    gates = jax.vmap(lambda k: layer.apply(variables, X, 0.3, train=True, rngs={"drop": k},
                                           mutable=["batch_stats", "gates"])[1]["gates"]["active"][0])(
        jax.random.split(jax.random.key(5), draws))
    rate = float(jnp.mean(gates))
    assert abs(rate - 0.3) < 4 * np.sqrt(0.3 * 0.7 / draws)


def test_draw_gates_are_the_bernoulli_draws_of_the_scaled_survival_probabilities():
    """One call's gates, element by element, are jax.random.bernoulli over the vector of
    1 - drop_scale (1 - p_i): each a scalar of its own for a block's conditional."""
    probs = np.array([1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.0])
    for seed, scale in ((0, 1.0), (1, 0.5), (2, 1.0), (3, 0.25)):
        key = jax.random.key(seed)
        gates = jax.jit(draw_gates)(key, probs, scale)
        expected = np.asarray(jax.random.bernoulli(key, jnp.asarray(1.0 - scale * (1.0 - probs), jnp.float32)))
        assert [g.shape for g in gates] == [()] * len(probs)
        assert [bool(g) for g in gates] == expected.tolist()
    rates = np.mean([[bool(g) for g in draw_gates(k, probs)] for k in jax.random.split(jax.random.key(4), 300)], 0)
    assert np.all(np.abs(rates - probs) <= 4 * np.sqrt(probs * (1 - probs) / 300) + 1e-9)


@pytest.mark.parametrize("gate", [False, True])
def test_a_gate_given_by_the_caller_decides_the_block(gate):
    """`gate=` replaces the layer's own draw: closed, the activated shortcut whatever p; open, the
    residual block."""
    layer, branch, shortcut = make_layer()
    variables = perturb_batch_stats(init(layer))
    out, updates = layer.apply(variables, X, 0.5, train=True, gate=jnp.asarray(gate), mutable=["batch_stats", "gates"])
    residual = branch.apply(branch_variables(variables), X, train=True, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(out, jax.nn.relu(shortcut(X) + residual if gate else shortcut(X)), atol=1e-6)
    assert float(updates["gates"]["active"][0]) == float(gate)


def test_warmup_scale_zero_keeps_every_block():
    layer, _, _ = make_layer()
    variables = init(layer)
    for seed in range(20):
        _, updates = train_apply(layer, variables, 0.05, seed=seed, drop_scale=0.0)
        assert float(updates["gates"]["active"][0]) == 1.0


def test_sample_mode_masks_examples_and_rescales():
    p = 0.5
    layer, branch, shortcut = make_layer(drop_mode="sample")
    variables = init(layer)
    out, updates = train_apply(layer, variables, p)
    residual, _ = branch.apply(branch_variables(variables), X, train=True, mutable=["batch_stats"])
    dropped = jnp.all(out == jax.nn.relu(shortcut(X)), axis=(1, 2, 3))
    kept = jnp.all(jnp.abs(out - jax.nn.relu(shortcut(X) + residual / p)) < 1e-5, axis=(1, 2, 3))
    assert bool(jnp.all(dropped ^ kept))
    assert float(updates["gates"]["active"][0]) == pytest.approx(float(jnp.mean(kept)))
    eval_out = layer.apply(variables, X, p, train=False)
    np.testing.assert_allclose(
        eval_out, jax.nn.relu(shortcut(X) + branch.apply(branch_variables(variables), X, train=False)), atol=1e-6)


def test_wraps_any_branch_without_activation():
    class Dense(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return nn.Dense(x.shape[-1])(x)

    layer = StochasticDepth(Dense(parent=None), activation=None)
    x = jnp.ones((3, 5))
    variables = layer.init(jax.random.key(0), x, 1.0, train=True)
    dense = nn.Dense(5).apply({"params": variables["params"]["f"]["Dense_0"]}, x)
    np.testing.assert_allclose(layer.apply(variables, x, 0.5, train=False), x + 0.5 * dense, atol=1e-6)
    out, _ = layer.apply(variables, x, 0.0, train=True, rngs={"drop": jax.random.key(0)}, mutable=["gates"])
    np.testing.assert_array_equal(out, x)


def test_a_branch_gets_the_rng_streams_the_layer_was_given():
    """A user's branch with dropout runs inside the gate with the layer's "dropout" stream: an open
    gate's output follows the dropout key."""
    class DropoutBranch(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return nn.Dropout(0.5, deterministic=not train)(nn.Dense(x.shape[-1])(x))

    layer = StochasticDepth(DropoutBranch(parent=None), activation=None)
    x = jnp.ones((4, 8))
    variables = layer.init(jax.random.key(0), x, 1.0, train=True)

    def run(dropout_seed):
        return layer.apply(variables, x, jnp.float32(1.0), train=True, mutable=["gates"],
                           rngs={"drop": jax.random.key(0), "dropout": jax.random.key(dropout_seed)})[0]

    np.testing.assert_array_equal(run(1), run(1))
    assert np.any(run(1) != run(2)) and np.any(run(1) == x)  # dropped units leave the shortcut alone
