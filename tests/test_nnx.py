"""The Flax NNX layer and models (sd_jax.nnx): the layer's behaviour, the documented NNX training
loop, parity with the Linen models in float64, and the compiled program's gates for an H100."""
import functools
import re
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sd_jax import aot, nnx as sd_nnx, targets
from sd_jax.layers.survival import scaled_survival
from sd_jax.models.cifar import ResNetCIFAR as LinenCIFAR, to_scanned_layout
from sd_jax.models.imagenet import ResNetImageNet as LinenImageNet
from sd_jax.training import compiler
from sd_jax.training.compiled import count_conditionals, gpu_thunks, memory
from tests.test_aot import NEEDS_GPU_COMPILER

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


def same_gate_draws(model, gates):
    """Give every gated NNX block a stream whose first draw is the Linen block's gate (`gates`, 0/1
    in block order), the NNX layer drawing as it does: bernoulli(stream(), p as float32)."""
    blocks = [m for _, m in nnx.iter_modules(model) if isinstance(m, sd_nnx.StochasticDepth)]
    assert len(blocks) == len(gates)
    for block, gate in zip(blocks, gates):
        p = scaled_survival(jnp.asarray(block.survival_prob, jnp.float32), 1.0)
        seed = next(s for s in range(1000) if bool(jax.random.bernoulli(nnx.RngStream(s, tag="drop")(), p)) == gate)
        block.rngs = nnx.RngStream(seed, tag="drop")
    return blocks


def linen_gates(gates, names) -> list:
    return [float(gates[stage][block]["active"][0]) for stage, block in names]


def assert_close(actual, expected, what):
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=0, atol=1e-6 * scale, err_msg=what)


def assert_models_agree(linen, nnx_model, image_shape, num_classes, block_names, mask=None):
    """From the same float64 weights: evaluation logits, then one training step's loss, gradients,
    new BatchNorm statistics and gates, to 1e-6 (of the largest value); `mask`: the real examples
    of a padded batch."""
    x = jax.random.normal(jax.random.key(0), (4,) + image_shape, jnp.float64)
    labels = jnp.arange(4) % num_classes
    variables = linen.init({"params": jax.random.key(1)}, x, train=False)
    variables = jax.tree.map(lambda v: v.astype(jnp.float64), variables)
    sd_nnx.load_linen_variables(nnx_model, variables)
    nnx_model.eval()
    assert_close(nnx_model(x), linen.apply(variables, x, train=False), "evaluation logits")

    def linen_loss(params):
        logits, new = linen.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                  rngs={"drop": jax.random.key(2)}, mutable=["batch_stats", "gates"], mask=mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new

    (loss, new), grads = jax.jit(jax.value_and_grad(linen_loss, has_aux=True))(variables["params"])
    gates = linen_gates(new["gates"], block_names)
    assert 0 < sum(gates) < len(gates)  # some blocks ran, some were dropped
    nnx_model.train()
    blocks = same_gate_draws(nnx_model, gates)

    @nnx.jit
    def nnx_step(model):
        loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x, mask=mask), labels).mean()  # noqa: E731
        return nnx.value_and_grad(loss_fn)(model)

    nnx_loss, nnx_grads = nnx_step(nnx_model)
    assert [float(b.active[...]) for b in blocks] == gates
    assert_close(nnx_loss, loss, "loss")
    jax.tree.map(lambda a, b: assert_close(a, b, "gradients"), nnx.to_pure_dict(nnx_grads), grads)
    jax.tree.map(lambda a, b: assert_close(a, b, "BatchNorm statistics"),
                 sd_nnx.linen_variables(nnx_model)["batch_stats"], new["batch_stats"])


def test_the_nnx_cifar_resnet_equals_the_linen_one_in_float64():
    with jax.enable_x64(True):
        linen = LinenCIFAR(8, p_last=0.5, dtype=jnp.float64)
        model = sd_nnx.ResNetCIFAR(8, p_last=0.5, dtype=jnp.float64, rngs=nnx.Rngs(params=5, drop=6))
        assert_models_agree(linen, model, (32, 32, 3), 10, [(f"stage{s}", "block0") for s in (1, 2, 3)],
                            mask=jnp.array([True, True, False, True]))  # a padded last batch: BatchNorm's mask


@pytest.mark.slow  # two float64 ResNet-50 compilations: left to the full run
def test_the_nnx_resnet50_equals_the_linen_one_in_float64():
    """Projection shortcuts (modules, outside the gate), kept-on projection blocks (no gate)."""
    with jax.enable_x64(True):
        kwargs = dict(depth=50, num_classes=5, p_last=0.5, dtype=jnp.float64, drop_downsample_blocks=False)
        linen, model = LinenImageNet(**kwargs), sd_nnx.ResNetImageNet(**kwargs, rngs=nnx.Rngs(params=5, drop=6))
        names = [(f"layer{s + 1}", f"block{i}") for s, n in enumerate((3, 4, 6, 3)) for i in range(n)]
        gated = [name for name, p in zip(names, linen.survival_probabilities()) if p < 1.0]
        assert len(gated) == 12
        assert_models_agree(linen, model, (32, 32, 3), 5, names)


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
    deeper = sd_nnx.ResNetCIFAR(20, rngs=nnx.Rngs(2))  # variables of the scanned layout are unstacked
    unrolled = LinenCIFAR(20).init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)), train=False)
    sd_nnx.load_linen_variables(deeper, to_scanned_layout(unrolled, 20))
    jax.tree.map(np.testing.assert_array_equal, sd_nnx.linen_variables(deeper), unrolled)
    with pytest.raises(ValueError, match="missing.*linear"):
        sd_nnx.load_linen_variables(other, {"params": {k: v for k, v in variables["params"].items() if k != "linear"},
                                            "batch_stats": variables["batch_stats"]})


def compiled_training_step(depth: int, project_options: bool, which: str) -> dict:
    """Conditionals, host round trips, thunks (nested ones included) and memory of one SGD training
    step of the depth-`depth` CIFAR ResNet at p_L 0.5, batch 128, Linen or NNX, compiled for one
    H100 without the device."""
    device = targets.target("h100").devices(1)[0]
    mesh = jax.sharding.Mesh(np.array([device]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    x = jax.ShapeDtypeStruct((128, 32, 32, 3), jnp.float32, sharding=replicated)
    y = jax.ShapeDtypeStruct((128,), jnp.int32, sharding=replicated)
    tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels
    if which == "linen":
        model = LinenCIFAR(depth, p_last=0.5, conv_grads="xla")
        variables = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)), train=False)
        state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]), jax.random.key(1))

        def step(state, x, y):
            params, batch_stats, opt_state, key = state

            def loss_fn(params):
                logits, new = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                          rngs={"drop": key}, mutable=["batch_stats"])
                return cross_entropy(logits, y).mean(), new["batch_stats"]

            (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), batch_stats, opt_state, jax.random.fold_in(key, 1)), loss
    else:
        model = sd_nnx.ResNetCIFAR(depth, p_last=0.5, conv_grads="xla", rngs=nnx.Rngs(params=0, drop=1))
        graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))

        def step(state, x, y):
            model, optimizer = nnx.merge(graphdef, state)
            loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y).mean())(model)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), loss
    jit = functools.partial(compiler.jit, device=device) if project_options else jax.jit
    jitted = jit(step, donate_argnums=0)  # the state updated in place, as train.py's calls do
    with tempfile.TemporaryDirectory() as dump:
        compiled = jitted.lower(aot.abstract(state, replicated), x, y).compile({"xla_dump_to": dump})
        thunks, host_round_trips = gpu_thunks(dump)
    return {"conditionals": count_conditionals(compiled.as_text()), "host_round_trips": host_round_trips,
            "thunks": sum(thunks.values()), "memory": memory(compiled)["total"]}


@pytest.mark.slow  # deviceless compilations: left to the full run
@NEEDS_GPU_COMPILER
@pytest.mark.usefixtures("compile_only_targets")
def test_the_nnx_resnet_compiles_for_an_h100_with_the_linen_ones_gates():
    """ResNet-20 (9 gates; docs/api.md has ResNet-110's numbers): the same conditionals, none waiting for
    the host with the project's options (compiler.jit), and each waiting with a plain jax.jit (nnx.jit)."""
    for project_options, round_trips in ((True, 0), (False, 2 * 9)):
        linen, nnx_program = (compiled_training_step(20, project_options, which) for which in ("linen", "nnx"))
        assert linen["conditionals"] == nnx_program["conditionals"] == 2 * 9  # a forward and a backward one per gate
        assert linen["host_round_trips"] == nnx_program["host_round_trips"] == round_trips
