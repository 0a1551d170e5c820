"""The Flax NNX layer (sd_jax.nnx): its behaviour, the documented NNX training loop, the models'
variables as Linen's (their parity with the Linen models: tests/test_nnx_models.py)."""
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sd_jax import nnx as sd_nnx
from sd_jax.models.cifar import ResNetCIFAR as LinenCIFAR, to_scanned_layout

ROOT = Path(__file__).resolve().parent.parent


def branch_and_input(seed=0):
    """A CIFAR basic branch (convolutions and BatchNorm) on 2 channels and an input with negative values."""
    branch = sd_nnx.BasicBranch(2, 2, rngs=nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(seed + 1), (3, 4, 4, 2))
    return branch, x


def plain_training_output(branch, x):
    """relu(x + f(x)) and f's gradients of sum(out * w), by a copy of the branch called directly."""
    weights = jax.random.normal(jax.random.key(9), x.shape)
    copy = nnx.clone(branch)
    grads = nnx.grad(lambda b: jnp.sum(jax.nn.relu(x + b(x)) * weights))(copy)
    return jax.nn.relu(x + nnx.clone(branch)(x)), grads, weights


def gated_training(layer, x, weights):
    out = layer(x)
    grads = nnx.grad(lambda m: jnp.sum(m(x) * weights))(nnx.clone(layer))
    return out, grads


def test_a_closed_gate_returns_the_shortcut_and_leaves_the_branch_untouched():
    branch, x = branch_and_input()
    stats = nnx.to_pure_dict(nnx.state(branch, nnx.BatchStat))
    _, _, weights = plain_training_output(branch, x)
    layer = sd_nnx.StochasticDepth(branch, 0.0, rngs=nnx.Rngs(drop=0))  # p = 0: the gate is always closed
    out, grads = gated_training(layer, x, weights)
    np.testing.assert_array_equal(out, jax.nn.relu(x))
    assert float(layer.active[...]) == 0.0
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(layer.f, nnx.BatchStat)), stats)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(nnx.state(grads, nnx.Param)))


def test_an_open_gate_computes_the_residual_block_and_its_gradients():
    branch, x = branch_and_input()
    expected, expected_grads, weights = plain_training_output(branch, x)
    layer = sd_nnx.StochasticDepth(branch, 1.0, gate_certain_blocks=True, rngs=nnx.Rngs(drop=0))  # a gate that opens
    out, grads = gated_training(layer, x, weights)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert float(layer.active[...]) == 1.0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 nnx.to_pure_dict(nnx.state(grads.f, nnx.Param)), nnx.to_pure_dict(nnx.state(expected_grads, nnx.Param)))
    stats = nnx.state(layer.f, nnx.BatchStat)  # the open branch's statistics moved as the plain branch's
    copy = nnx.clone(branch_and_input()[0])
    copy(x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 nnx.to_pure_dict(stats), nnx.to_pure_dict(nnx.state(copy, nnx.BatchStat)))


def conditionals_in(layer, x, **kwargs) -> int:
    graphdef, state = nnx.split(layer)
    jaxpr = jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x, **kwargs))(state, x)
    return str(jaxpr).count("cond[")


def test_only_a_block_surviving_with_the_number_1_has_no_gate():
    branch, x = branch_and_input()
    assert conditionals_in(sd_nnx.StochasticDepth(branch, 1.0), x) == 0  # no rngs needed either
    assert conditionals_in(sd_nnx.StochasticDepth(branch, 0.9, rngs=nnx.Rngs(drop=0)), x) == 1
    assert conditionals_in(sd_nnx.StochasticDepth(branch, 1.0, gate_certain_blocks=True, rngs=nnx.Rngs(0)), x) == 1


def test_drop_scale_0_opens_every_gate_and_a_missing_stream_is_a_clear_error():
    branch, x = branch_and_input()
    expected, _, _ = plain_training_output(branch, x)
    layer = sd_nnx.StochasticDepth(branch, 0.0, rngs=nnx.Rngs(drop=0))
    np.testing.assert_allclose(layer(x, drop_scale=0.0), expected, rtol=1e-5, atol=1e-6)  # warm-up start: p = 1
    assert float(layer.active[...]) == 1.0
    with pytest.raises(ValueError, match=r"rngs=nnx.Rngs\(drop=SEED\)"):
        sd_nnx.StochasticDepth(branch, 0.5)


@pytest.mark.parametrize("drop_mode,scale", [("block", 0.7), ("sample", 1.0)])
def test_evaluation_scales_the_branch_by_p_in_block_mode_only(drop_mode, scale):
    branch, x = branch_and_input()
    layer = sd_nnx.StochasticDepth(branch, 0.7, drop_mode=drop_mode, rngs=nnx.Rngs(drop=0))
    layer.eval()
    f = nnx.clone(branch)
    f.eval()
    np.testing.assert_allclose(layer(x), jax.nn.relu(x + scale * f(x)), rtol=1e-6, atol=1e-6)
    assert np.isnan(float(layer.active[...]))  # evaluation records nothing


def test_sample_mode_keeps_each_example_or_drops_it_and_scales_by_1_over_p():
    branch, x = branch_and_input()
    x = jnp.concatenate([x] * 8)  # 24 examples
    f = nnx.clone(branch)(x)
    layer = sd_nnx.StochasticDepth(branch, 0.5, drop_mode="sample", rngs=nnx.Rngs(drop=3))
    out = layer(x)
    kept = np.array([bool(np.allclose(o, jax.nn.relu(xi + fi / 0.5), atol=1e-5)) for o, xi, fi in zip(out, x, f)])
    dropped = np.array([bool(np.allclose(o, jax.nn.relu(xi))) for o, xi in zip(out, x)])
    assert np.all(kept ^ dropped) and 0 < kept.sum() < len(x)
    assert float(layer.active[...]) == pytest.approx(kept.mean())


def documented_loop():
    """The code blocks of docs/api.md's NNX section, as a user would paste them."""
    text = (ROOT / "docs" / "api.md").read_text()
    section = text[text.index("## Flax NNX"):]
    return re.findall(r"```python\n(.*?)```", section[:section.index("\n## ", 1)], re.S)


def test_the_documented_nnx_training_loop_learns_with_blocks_dropped():
    loop, functional = documented_loop()
    namespace = {}
    exec(loop, namespace)  # noqa: S102 - the documentation's own example
    losses, ran = np.array(namespace["losses"]), np.array(namespace["ran"])
    assert np.median(losses[-10:]) < 0.1 * losses[0]  # one step's loss depends on the blocks it dropped
    assert ran.min() < 8 and ran.max() > 0  # some of the 8 blocks dropped in some steps, some ran
    assert float(namespace["accuracy"]) > 0.9  # evaluation with every block, scaled by p (4 classes)
    exec(functional, namespace)  # noqa: S102 - the compiler.jit form continues the same model
    assert float(namespace["loss"]) < losses[0]


def test_a_model_needs_the_drop_stream_only_when_it_has_gates():
    with pytest.raises(ValueError, match=r"stream \"drop\".*rngs=nnx.Rngs\(params=SEED, drop=SEED\)"):
        sd_nnx.ResNetCIFAR(8, rngs=nnx.Rngs(params=0))
    constant = sd_nnx.ResNetCIFAR(8, p_last=1.0, rngs=nnx.Rngs(params=0))
    assert conditionals_in(constant, jnp.zeros((2, 32, 32, 3))) == 0


def test_linen_variables_round_trip_and_a_mismatch_names_the_paths():
    model = sd_nnx.ResNetCIFAR(8, rngs=nnx.Rngs(0))
    variables = sd_nnx.linen_variables(model)
    linen = LinenCIFAR(8).init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)), train=False)
    assert jax.tree.structure(variables) == jax.tree.structure(linen)
    other = sd_nnx.ResNetCIFAR(8, rngs=nnx.Rngs(1))
    sd_nnx.load_linen_variables(other, variables)
    jax.tree.map(np.testing.assert_array_equal, sd_nnx.linen_variables(other), variables)
    deeper = sd_nnx.ResNetCIFAR(14, rngs=nnx.Rngs(2))  # variables of the scanned layout are unstacked
    unrolled = LinenCIFAR(14).init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)), train=False)
    sd_nnx.load_linen_variables(deeper, to_scanned_layout(unrolled, 14))
    jax.tree.map(np.testing.assert_array_equal, sd_nnx.linen_variables(deeper), unrolled)
    with pytest.raises(ValueError, match="missing.*linear"):
        sd_nnx.load_linen_variables(other, {"params": {k: v for k, v in variables["params"].items() if k != "linear"},
                                            "batch_stats": variables["batch_stats"]})
