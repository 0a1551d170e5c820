"""The parameter initialisers and the one draw for all of a model's parameters (train.py's init)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.layers import initializers
from sd_jax.models.cifar import ResNetCIFAR, stack_blocks
from sd_jax.models.imagenet import ResNetImageNet
from sd_jax.training.plan import init_variables

KEY = jax.random.key(7)


@pytest.mark.parametrize("shape", [(3, 3, 16, 32), (1, 1, 64, 256), (64, 10)])
def test_each_initialiser_alone_draws_what_flax_and_jax_draw(shape):
    """Outside `one_draw` (NNX, a plain `model.init`) the initialisers are Flax's and JAX's own, bit for bit."""
    for fan in ("fan_in", "fan_out"):
        np.testing.assert_array_equal(initializers.he_normal(fan)(KEY, shape),
                                      nn.initializers.variance_scaling(2.0, fan, "normal")(KEY, shape))
    np.testing.assert_array_equal(initializers.lecun_normal()(KEY, shape), nn.initializers.lecun_normal()(KEY, shape))
    np.testing.assert_array_equal(initializers.uniform(-0.125, 0.125)(KEY, shape),
                                  jax.random.uniform(KEY, shape, jnp.float32, -0.125, 0.125))
    np.testing.assert_array_equal(initializers.uniform(0.0, 1.0)(KEY, shape), nn.initializers.uniform(1.0)(KEY, shape))


class FourVariables(nn.Module):
    @nn.compact
    def __call__(self):
        return (self.param("a", initializers.he_normal("fan_in"), (3, 3, 2, 4)),
                self.param("b", initializers.uniform(-1.0, 3.0), (5,)),
                self.param("c", initializers.he_normal("fan_out"), (2, 3)),
                self.variable("stats", "d", initializers.constant(1.0), None, (2,), jnp.float32).value)


def test_one_draw_builds_each_variable_from_its_slice_of_one_standard_draw():
    compiled = []
    variables = initializers.one_draw(FourVariables().init, KEY, lambda f: compiled.append(f) or jax.jit(f))
    normal_key, _, uniform_key = jax.random.split(KEY, 3)  # one key per distribution, in STANDARD_DRAWS order
    normal = np.asarray(jax.random.normal(normal_key, (72 + 6,)))  # a then c: the order of the leaves
    uniform = np.asarray(jax.random.uniform(uniform_key, (5,)))
    params = variables["params"]
    np.testing.assert_allclose(params["a"], normal[:72].reshape(3, 3, 2, 4) * np.sqrt(2 / 18), rtol=1e-6)
    np.testing.assert_allclose(params["b"], uniform * 4.0 - 1.0, rtol=1e-6)
    np.testing.assert_allclose(params["c"], normal[72:].reshape(2, 3) * np.sqrt(2 / 3), rtol=1e-6)
    np.testing.assert_array_equal(variables["stats"]["d"], [1.0, 1.0])
    assert len(compiled) == 1  # the draws alone: every variable came from this module's initialisers


class WithAFlaxDefault(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, bias_init=initializers.constant(0.5))(x)  # Flax's own LeCun kernel initialiser


def test_a_variable_from_another_initialiser_keeps_its_own_draw():
    init = lambda k: WithAFlaxDefault().init(k, jnp.zeros((1, 4)))
    variables = initializers.one_draw(init, KEY)
    np.testing.assert_array_equal(variables["params"]["Dense_0"]["kernel"], init(KEY)["params"]["Dense_0"]["kernel"])
    np.testing.assert_array_equal(variables["params"]["Dense_0"]["bias"], np.full(3, 0.5, np.float32))


def random_draws(jaxpr) -> list:
    """The shapes of the random_bits calls in a jaxpr and every jaxpr nested in it."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "random_bits":
            shapes.append(eqn.params["shape"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes += random_draws(sub)
    return shapes


@pytest.mark.parametrize("model", [ResNetCIFAR(110, p_last=0.5), ResNetImageNet(50, p_last=0.5)],
                         ids=["cifar110", "imagenet50"])
def test_a_model_compiles_one_draw_per_distribution_and_nothing_else(model):
    """The authors' convention (CIFAR): normal convs; uniform BN scales and classifier (weights and
    bias). torchvision's (ImageNet): normal convs, uniform classifier; constant BN."""
    x = jnp.zeros((1, 32, 32, 3))
    programs = []
    initializers.one_draw(lambda k: model.init(k, x), KEY, lambda f: programs.append(jax.make_jaxpr(f)(KEY)) or jax.jit(f))
    leaves = jax.tree_util.tree_leaves_with_path(jax.eval_shape(model.init, KEY, x)["params"])
    normal = sum(v.size for path, v in leaves if path[-1].key == "kernel" and v.ndim == 4)
    uniform = sum(v.size for path, v in leaves if path[0].key == "linear" or (
        path[-1].key == "scale" and isinstance(model, ResNetCIFAR)))
    assert len(programs) == 1 and len(programs[0].out_avals) == 2
    assert sorted(random_draws(programs[0].jaxpr)) == sorted([(normal,), (uniform,)])


def test_initial_variables_have_their_distributions_and_no_number_twice():
    model = ResNetCIFAR(20, p_last=0.5)
    variables = init_variables(model, jax.random.key(3), (32, 32, 3))
    assert jax.tree.structure(variables) == jax.tree.structure(jax.eval_shape(model.init, KEY, jnp.zeros((1, 32, 32, 3))))
    params = variables["params"]
    kernels = [(path, np.asarray(v)) for path, v in jax.tree_util.tree_leaves_with_path(params)
               if path[-1].key == "kernel" and v.ndim == 4]
    # Each conv kernel standardised by its He std sqrt(2 / fan_in): together one standard normal
    # sample (mean 0, variance 1, 4.55% beyond 2 std: not truncated), within 5 standard errors.
    z = np.concatenate([(k / np.sqrt(2 / np.prod(k.shape[:-1]))).ravel() for _, k in kernels])
    assert abs(z.mean()) < 5 / np.sqrt(z.size) and abs(z.var() - 1) < 5 * np.sqrt(2 / z.size)
    tail = np.mean(np.abs(z) > 2)
    assert abs(tail - 0.0455) < 5 * np.sqrt(0.0455 * 0.9545 / z.size)
    scales = np.concatenate([np.asarray(v).ravel() for path, v in jax.tree_util.tree_leaves_with_path(params)
                             if path[-1].key == "scale"])
    assert scales.min() >= 0 and scales.max() < 1 and abs(scales.mean() - 0.5) < 5 * np.sqrt(1 / 12 / scales.size)
    bound = 1 / np.sqrt(64)
    assert np.all(np.abs(params["linear"]["kernel"]) <= bound) and np.abs(params["linear"]["bias"]).max() > 0
    # No number handed out twice: every pair of random kernels of one shape differs everywhere but by chance.
    by_shape = {}
    for path, k in kernels:
        for other_path, other in by_shape.get(k.shape, []):
            assert np.mean(k == other) < 0.01, (jax.tree_util.keystr(path), jax.tree_util.keystr(other_path))
        by_shape.setdefault(k.shape, []).append((path, k))
    assert all(np.all(v == 0) for v in jax.tree.leaves(variables["batch_stats"]["bn1"]["mean"]))


@pytest.mark.parametrize("model", [ResNetCIFAR(20, p_last=0.5, scan_blocks=True),
                                   ResNetImageNet(50, p_last=0.5, scan_blocks=True)], ids=["cifar", "imagenet"])
def test_a_scanned_model_starts_from_the_unrolled_ones_numbers_stacked(model):
    shape = (32, 32, 3)
    scanned = init_variables(model, jax.random.key(3), shape)
    unrolled = init_variables(model.clone(scan_blocks=False), jax.random.key(3), shape)
    expected = stack_blocks(unrolled, model.stage_sizes())
    assert jax.tree.structure(scanned) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
