"""The bottleneck ResNets (ImageNet) and the stochastic-depth layer around a projection shortcut."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sd_jax.models.cifar import count_params, stack_blocks
from sd_jax.models.imagenet import BottleneckBranch, Projection, ResNetImageNet, stage_sizes
from sd_jax.layers.stochastic_depth import StochasticDepth


def closed_form_params(blocks, num_classes=1000):
    """Independent count for torchvision's layout: convs, BN scale/bias, projections, fc."""
    total, channels = 7 * 7 * 3 * 64 + 2 * 64, 64
    for n, width in zip(blocks, (64, 128, 256, 512)):
        for i in range(n):
            total += channels * width + 9 * width * width + width * 4 * width + 2 * (width + width + 4 * width)
            if i == 0:
                total += channels * 4 * width + 2 * 4 * width
            channels = 4 * width
    return total + channels * num_classes + num_classes


@pytest.mark.parametrize("depth,blocks,expected", [(50, (3, 4, 6, 3), 25_557_032), (101, (3, 4, 23, 3), 44_549_160),
                                                   (152, (3, 8, 36, 3), 60_192_808)])
def test_parameter_counts_are_torchvisions(depth, blocks, expected):
    assert closed_form_params(blocks) == expected
    for scan in (False, True):
        shapes = jax.eval_shape(ResNetImageNet(depth, scan_blocks=scan).init, jax.random.key(0),
                                jnp.zeros((1, 64, 64, 3)))
        assert count_params(shapes["params"]) == expected


def test_survival_schedule_is_composers_linear_drop_rate():
    drop_rate, count = 0.2, 16  # composer: block i (0-based) of `count` drops with (i + 1) / count * drop_rate
    composer = np.array([1.0 - (i + 1) / count * drop_rate for i in range(count)])
    np.testing.assert_allclose(ResNetImageNet(50, p_last=1.0 - drop_rate).survival_probabilities(), composer)
    kept = ResNetImageNet(50, p_last=0.8, drop_downsample_blocks=False).survival_probabilities()
    firsts = [0, 3, 7, 13]  # the projection blocks of ResNet-50's stages
    assert kept[firsts].tolist() == [1.0] * 4
    others = np.delete(kept, firsts)
    np.testing.assert_allclose(others, [1.0 - (i + 1) / 12 * 0.2 for i in range(12)])


def downsampling_block():
    layer = StochasticDepth(BottleneckBranch(4, 2, parent=None), Projection(16, 2, parent=None))
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 8))
    variables = layer.init(jax.random.key(1), x, 1.0, train=True)
    stats = jax.tree.map(lambda v: v + 0.3, variables["batch_stats"])  # not at init: eval depends on them
    return layer, x, {"params": variables["params"], "batch_stats": stats}


def part(variables, name):
    return {collection: tree[name] for collection, tree in variables.items()}


def test_closed_gate_returns_relu_of_the_projection_which_still_learns():
    layer, x, variables = downsampling_block()

    def run(params, p):
        return layer.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, p, train=True,
                           rngs={"drop": jax.random.key(2)}, mutable=["batch_stats", "gates"])

    out, updates = run(variables["params"], 0.0)
    projected, projection_stats = Projection(16, 2).apply(part(variables, "skip"), x, train=True,
                                                          mutable=["batch_stats"])
    np.testing.assert_allclose(out, jax.nn.relu(projected), atol=1e-6)
    assert float(updates["gates"]["active"][0]) == 0.0
    for a, b in zip(jax.tree.leaves(updates["batch_stats"]["f"]), jax.tree.leaves(variables["batch_stats"]["f"])):
        np.testing.assert_array_equal(a, b)  # the dropped branch's statistics are untouched
    for a, b in zip(jax.tree.leaves(updates["batch_stats"]["skip"]), jax.tree.leaves(projection_stats["batch_stats"])):
        np.testing.assert_allclose(a, b, atol=1e-6)  # the projection's are updated
    grads = jax.grad(lambda params: jnp.sum(run(params, 0.0)[0] ** 2))(variables["params"])
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["f"]))
    assert all(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(grads["skip"]))

    out, _ = run(variables["params"], 1.0)
    residual, _ = BottleneckBranch(4, 2).apply(part(variables, "f"), x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out, jax.nn.relu(projected + residual), atol=1e-5)


@pytest.mark.parametrize("p", [0.3, 0.8])
def test_eval_scales_the_branch_by_its_survival_probability(p):
    layer, x, variables = downsampling_block()
    projected = Projection(16, 2).apply(part(variables, "skip"), x, train=False)
    residual = BottleneckBranch(4, 2).apply(part(variables, "f"), x, train=False)
    np.testing.assert_allclose(layer.apply(variables, x, p, train=False), jax.nn.relu(projected + p * residual),
                               atol=1e-5)


@pytest.mark.slow
def test_scanned_and_unrolled_resnet50_agree_and_each_droppable_block_is_a_conditional():
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    unrolled = ResNetImageNet(50, num_classes=10, p_last=0.8)
    variables = unrolled.init(jax.random.key(1), x)
    scanned = ResNetImageNet(50, num_classes=10, p_last=0.8, scan_blocks=True)
    np.testing.assert_allclose(scanned.apply(stack_blocks(variables, stage_sizes(50)), x),
                               unrolled.apply(variables, x), rtol=1e-4, atol=1e-4)

    def step(params):
        logits, _ = unrolled.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                   rngs={"drop": jax.random.key(3)}, mutable=["batch_stats", "gates"])
        return jnp.sum(logits)

    text = str(jax.make_jaxpr(jax.grad(step))(variables["params"]))
    forward_and_backward = 2 * 16  # a cond in the forward pass and one in its transpose, per block
    # not counting the choices by platform (`lax.platform_dependent`), which lowering resolves
    assert text.count(" cond[") - text.count("branches_platforms=") == forward_and_backward


@pytest.mark.slow
def test_a_few_steps_of_resnet50_lower_the_loss():
    model = ResNetImageNet(50, num_classes=10, p_last=0.8, scan_blocks=True, zero_init_last_bn=True)
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    labels = jnp.arange(8) % 10
    variables = model.init(jax.random.key(1), x)
    tx = optax.sgd(0.01, momentum=0.9)

    @jax.jit
    def step(params, batch_stats, opt_state, key):
        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                          rngs={"drop": key}, mutable=["batch_stats", "gates"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        changes, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, changes), updates["batch_stats"], opt_state, loss

    params, batch_stats, opt_state = variables["params"], variables["batch_stats"], tx.init(variables["params"])
    losses = []
    for i in range(8):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, jax.random.key(10 + i))
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("p_last", [1.0, 0.8])
def test_torchvision_weights_give_torchvisions_logits(p_last):
    """ResNet-50 with random weights after a few PyTorch training steps (BatchNorm statistics away
    from their init), at 64 px: eval-mode logits equal torchvision's. For p_last < 1 each block's
    last BN affine is scaled by its survival probability on the PyTorch side, which is what
    evaluation with stochastic depth computes: relu(shortcut + p f)."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed (CI installs it with torch)")
    from sd_jax.interop import from_torchvision_state_dict

    torch.manual_seed(0)
    net = torchvision.models.resnet50(num_classes=10)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(torch.randn(8, 3, 64, 64)), torch.randint(0, 10, (8,))).backward()
        optimizer.step()
    net.eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    model = ResNetImageNet(50, num_classes=10, p_last=p_last)
    with torch.no_grad():
        blocks = [block for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for block in layer]
        for block, p in zip(blocks, model.survival_probabilities()):
            block.bn3.weight.mul_(float(p))
            block.bn3.bias.mul_(float(p))
        x = torch.randn(4, 3, 64, 64)
        want = net(x).numpy()
    for scan_blocks in (False, True):
        variables = from_torchvision_state_dict(state, 50, num_classes=10, scan_blocks=scan_blocks)
        got = ResNetImageNet(50, num_classes=10, p_last=p_last, scan_blocks=scan_blocks).apply(
            variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
        np.testing.assert_allclose(got, want, atol=max(1e-4, 1e-5 * float(np.abs(want).max())), rtol=0)


def test_torchvision_state_dict_problems_are_listed():
    from sd_jax.interop import from_torchvision_state_dict

    shapes = jax.eval_shape(ResNetImageNet(50, num_classes=10).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    state = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32), "fc.weight": np.zeros((5, 2048), np.float32),
             "extra.weight": np.zeros(1, np.float32)}
    with pytest.raises(ValueError) as error:
        from_torchvision_state_dict(state, 50, num_classes=10)
    message = str(error.value)
    assert "missing keys" in message and "layer4.2.bn3.running_var" in message
    assert "unexpected keys: ['extra.weight']" in message and "fc.weight: got (2048, 5)" in message
    assert count_params(shapes["params"]) == closed_form_params((3, 4, 6, 3), num_classes=10)
