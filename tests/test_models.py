import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.models.cifar import (ResNetCIFAR, blocks_per_stage, count_params, option_a_shortcut, to_scanned_layout,
                           to_unrolled_layout)


def param_count(depth, num_classes=10, scan_blocks=False):
    model = ResNetCIFAR(depth, num_classes, scan_blocks=scan_blocks)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return count_params(shapes["params"])


def closed_form_params(depth, num_classes=10):
    """Independent count: conv kernels + BN scale/bias + dense, for option-A CIFAR ResNets."""
    n = blocks_per_stage(depth)
    total = 3 * 3 * 3 * 16 + 2 * 16  # stem conv + BN
    c_in = 16
    for c in (16, 32, 64):
        for _ in range(n):
            total += 9 * c_in * c + 9 * c * c + 4 * c
            c_in = c
    return total + 64 * num_classes + num_classes


@pytest.mark.parametrize("depth,expected", [(20, 269_722), (110, 1_727_962), (1202, 19_421_274)])
def test_parameter_counts(depth, expected):
    assert closed_form_params(depth) == expected
    assert param_count(depth, scan_blocks=True) == expected
    if depth < 1202:
        assert param_count(depth, scan_blocks=False) == expected


def test_cifar100_head():
    assert param_count(20, 100) == closed_form_params(20, 100)


@pytest.mark.parametrize("depth", [0, 21, 7])
def test_bad_depth(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        blocks_per_stage(depth)


def test_option_a_shortcut_subsamples_and_appends_zero_channels():
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    y = np.asarray(option_a_shortcut(jnp.asarray(x), 5, 2))
    assert y.shape == (2, 2, 2, 5)
    np.testing.assert_array_equal(y[..., :3], x[:, [0, 2]][:, :, [0, 2]])
    np.testing.assert_array_equal(y[..., 3:], 0)
    np.testing.assert_array_equal(option_a_shortcut(jnp.asarray(x), 3, 1), x)


@pytest.mark.slow
def test_scan_and_unrolled_agree_given_the_same_weights():
    depth = 20
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    scanned = ResNetCIFAR(depth, scan_blocks=True, p_last=0.5)
    variables = scanned.init(jax.random.key(1), x)
    variables = {"params": variables["params"],
                 "batch_stats": jax.tree.map(lambda v: v + 0.2, variables["batch_stats"])}
    unrolled_vars = to_unrolled_layout(variables, depth)
    unrolled = ResNetCIFAR(depth, scan_blocks=False, p_last=0.5)
    np.testing.assert_allclose(scanned.apply(variables, x), unrolled.apply(unrolled_vars, x), atol=1e-5)
    # Training with nothing dropped: same outputs and same BatchNorm updates.
    out_s, upd_s = scanned.clone(p_last=1.0).apply(variables, x, train=True, rngs={"drop": jax.random.key(2)},
                                                   mutable=["batch_stats", "gates"])
    out_u, upd_u = unrolled.clone(p_last=1.0).apply(unrolled_vars, x, train=True,
                                                    rngs={"drop": jax.random.key(2)},
                                                    mutable=["batch_stats", "gates"])
    np.testing.assert_allclose(out_s, out_u, atol=1e-5)
    back = to_scanned_layout({"batch_stats": upd_u["batch_stats"]}, depth)["batch_stats"]
    for a, b in zip(jax.tree.leaves(upd_s["batch_stats"]), jax.tree.leaves(back)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert jax.tree.structure(to_scanned_layout(unrolled_vars, depth)) == jax.tree.structure(variables)


@pytest.mark.slow
@pytest.mark.parametrize("scan_blocks", [False, True])
def test_gates_count_active_blocks(scan_blocks):
    from sd_jax.models.cifar import active_blocks
    model = ResNetCIFAR(20, scan_blocks=scan_blocks, p_last=0.5)
    x = jnp.ones((2, 16, 16, 3))
    variables = model.init(jax.random.key(0), x)
    def count(key):
        _, upd = model.apply(variables, x, train=True, rngs={"drop": key}, mutable=["batch_stats", "gates"])
        return active_blocks(upd["gates"])

    counts = np.asarray(jax.jit(jax.vmap(count))(jax.random.split(jax.random.key(3), 60)))
    assert set(counts.tolist()) <= set(range(10))
    expected = float(np.sum(model.survival_probabilities()))  # 6.5
    assert abs(np.mean(counts) - expected) < 4 * np.sqrt(2.0 / 60)  # variance per step < 9 * 0.25


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_each_blocks_gate_opens_with_its_survival_probability(scan_blocks):
    """The model draws its gates in one call (`draw_gates`): block by block, scanned or not, each
    opens at its own p_l."""
    model = ResNetCIFAR(14, scan_blocks=scan_blocks, p_last=0.2)
    x = jnp.ones((2, 8, 8, 3))
    variables = model.init(jax.random.key(0), x)

    def gates(key):
        _, upd = model.apply(variables, x, train=True, rngs={"drop": key}, mutable=["batch_stats", "gates"])
        return jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(upd["gates"])])

    draws = 300
    rates = np.mean(np.asarray(jax.jit(jax.vmap(gates))(jax.random.split(jax.random.key(7), draws))), 0)
    probs = model.survival_probabilities()  # 0.867 ... 0.2; the leaves' order is the blocks' order
    assert np.all(np.abs(rates - probs) < 4 * np.sqrt(probs * (1 - probs) / draws))


@pytest.mark.slow
def test_bfloat16_compute_float32_params():
    model = ResNetCIFAR(20, dtype=jnp.bfloat16)
    x = jnp.ones((2, 16, 16, 3))
    variables = model.init(jax.random.key(0), x)
    assert {p.dtype for p in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
    logits = model.apply(variables, x)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
    ref = ResNetCIFAR(20).apply(variables, x)
    np.testing.assert_allclose(logits, ref, atol=0.1, rtol=0.05)


@pytest.mark.slow
def test_cifar_model_unchanged_against_the_stored_reference():
    """Outputs, BatchNorm updates, gates and gradients equal those stored before the layer learnt
    projection shortcuts (tests/cifar_reference.py): bit for bit on the JAX version, backend and CPU
    instruction sets that stored them, to float tolerance elsewhere (another XLA or CPU may fuse or
    vectorise differently: the same jaxlib on the CPU this was first stored on and on the next one
    differed in the last bits)."""
    from tests import cifar_reference
    reference = cifar_reference.stored()
    same_build = (str(reference.pop("jax_version")) == jax.__version__
                  and str(reference.pop("backend")) == jax.default_backend()
                  and str(reference.pop("cpu", "")) == cifar_reference.cpu_features())
    now = cifar_reference.compute()
    assert set(now) == set(reference)
    for name, value in reference.items():
        if same_build:
            np.testing.assert_array_equal(now[name], value, err_msg=name)
        else:
            np.testing.assert_allclose(now[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
