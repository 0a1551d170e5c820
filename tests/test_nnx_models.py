"""The Flax NNX models (sd_jax.nnx) against the Linen ones: the same numbers from the same weights
in float64, and the same gates in the program compiled for an H100."""
import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sd_jax import aot, nnx as sd_nnx, targets
from sd_jax.models.cifar import ResNetCIFAR as LinenCIFAR
from sd_jax.models.imagenet import ResNetImageNet as LinenImageNet
from sd_jax.nnx.models import Stage
from sd_jax.training import compiler
from sd_jax.training.compiled import count_conditionals, gpu_thunks, memory
from tests.test_aot import NEEDS_GPU_COMPILER


def same_gate_draws(model, gates):
    """Give the NNX model a gate stream whose first draw is the Linen model's gates (`gates`, 0/1 in
    block order), the model drawing as it does: bernoulli(stream(), every block's p as float32),
    an RngStream(seed)'s first key being fold_in(key(seed), 0). The blocks, in order."""
    stages = [m for _, m in nnx.iter_modules(model) if isinstance(m, Stage)]
    blocks = [b for stage in stages for b in stage.blocks()]
    p = jnp.asarray([b.survival_prob for b in blocks], jnp.float32)
    seeds = jnp.arange(100_000)
    drawn = jax.vmap(lambda s: jax.random.bernoulli(jax.random.fold_in(jax.random.key(s), 0), p))(seeds)
    seed = int(seeds[jnp.argmax(jnp.all(drawn == jnp.asarray(gates, bool), axis=1))])
    model.gate_rngs = nnx.RngStream(seed, tag="drop")
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
                                  rngs={"drop": jax.random.key(3)}, mutable=["batch_stats", "gates"], mask=mask)
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
    """ResNet-8 (3 gates; docs/api.md has ResNet-110's numbers): the same conditionals, none waiting for
    the host with the project's options (compiler.jit), and each waiting with a plain jax.jit (nnx.jit)."""
    for project_options, round_trips in ((True, 0), (False, 2 * 3)):
        linen, nnx_program = (compiled_training_step(8, project_options, which) for which in ("linen", "nnx"))
        assert linen["conditionals"] == nnx_program["conditionals"] == 2 * 3  # a forward and a backward one per gate
        assert linen["host_round_trips"] == nnx_program["host_round_trips"] == round_trips
