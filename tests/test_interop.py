import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from sd_jax.bench import PEER_PATH
from sd_jax.config import default_config
from sd_jax.interop import from_torch_state_dict
from sd_jax.models.cifar import ResNetCIFAR
from sd_jax.training import parallel
from sd_jax.training.plan import TrainState, make_plan, run_keys
from sd_jax.training.steps import train_step


def numpy_state_dict(depth, num_classes=10, seed=0):
    """A state_dict in the PyTorch CIFAR-ResNet layout, shapes written out from PyTorch's conventions."""
    rng = np.random.default_rng(seed)
    n = (depth - 2) // 6
    sd = {"conv1.weight": rng.normal(size=(16, 3, 3, 3))}

    def bn(prefix, c):
        sd.update({f"{prefix}.weight": rng.uniform(0.5, 1.5, c), f"{prefix}.bias": rng.normal(size=c),
                   f"{prefix}.running_mean": rng.normal(size=c), f"{prefix}.running_var": rng.uniform(0.5, 2, c),
                   f"{prefix}.num_batches_tracked": np.array(7)})

    bn("bn1", 16)
    c_in = 16
    for s, c in enumerate((16, 32, 64), start=1):
        for i in range(n):
            sd[f"layer{s}.{i}.conv1.weight"] = rng.normal(size=(c, c_in, 3, 3)) * 0.1
            sd[f"layer{s}.{i}.conv2.weight"] = rng.normal(size=(c, c, 3, 3)) * 0.1
            bn(f"layer{s}.{i}.bn1", c)
            bn(f"layer{s}.{i}.bn2", c)
            c_in = c
    sd["linear.weight"] = rng.normal(size=(num_classes, 64))
    sd["linear.bias"] = rng.normal(size=num_classes)
    return sd


def test_conversion_places_every_tensor():
    sd = numpy_state_dict(20)
    variables = from_torch_state_dict(sd, 20)
    np.testing.assert_allclose(variables["params"]["conv1"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_allclose(variables["params"]["stage2"]["block1"]["f"]["bn2"]["scale"],
                               sd["layer2.1.bn2.weight"])
    np.testing.assert_allclose(variables["batch_stats"]["stage3"]["block2"]["f"]["bn1"]["var"],
                               sd["layer3.2.bn1.running_var"])
    np.testing.assert_allclose(variables["params"]["linear"]["kernel"], sd["linear.weight"].T)
    model = ResNetCIFAR(20)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)
    scanned = from_torch_state_dict(sd, 20, scan_blocks=True)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    np.testing.assert_allclose(ResNetCIFAR(20, scan_blocks=True).apply(scanned, x), model.apply(variables, x),
                               rtol=1e-4, atol=1e-4)


def test_wrapped_checkpoints_are_accepted():
    sd = numpy_state_dict(20)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}
    a, b = from_torch_state_dict(wrapped, 20), from_torch_state_dict(sd, 20)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_bad_state_dicts_list_every_problem():
    sd = numpy_state_dict(20)
    del sd["layer2.0.conv1.weight"]
    sd["layer4.0.conv1.weight"] = np.zeros((3, 3, 3, 3))
    sd["linear.bias"] = np.zeros(7)
    with pytest.raises(ValueError) as error:
        from_torch_state_dict(sd, 20)
    message = str(error.value)
    assert "missing keys: ['layer2.0.conv1.weight']" in message
    assert "unexpected keys: ['layer4.0.conv1.weight']" in message
    assert "linear.bias: got (7,), expected (10,)" in message
    with pytest.raises(ValueError, match="missing keys"):
        from_torch_state_dict(numpy_state_dict(20), 32)


def load_peer():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if not os.path.exists(PEER_PATH):
        pytest.skip(f"peer {PEER_PATH} not found")
    spec = importlib.util.spec_from_file_location("torch_resnet_sd", PEER_PATH)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    return torch, peer


@pytest.mark.parametrize("depth", [20, 110])
@pytest.mark.parametrize("p_last", [1.0, 0.5])
def test_eval_logits_match_pytorch(depth, p_last):
    torch, peer = load_peer()
    torch.manual_seed(depth)
    net = peer.ResNetSD(depth, 10, p_last, "linear").train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):  # a few steps give non-trivial BatchNorm statistics
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(torch.randn(16, 3, 32, 32)),
                                          torch.randint(0, 10, (16,))).backward()
        opt.step()
    net.eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        expected = net(x).numpy()
    variables = from_torch_state_dict(net.state_dict(), depth, 10, p_last=p_last, survival_mode="linear")
    ours = ResNetCIFAR(depth, 10, p_last=p_last).apply(variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
    # float32 rounding grows with the logits (|logit| reaches ~200 at depth 110): bound it relative
    # to their magnitude, never looser than 1e-4 absolute. A wrong layer errs by O(1) relative.
    assert np.max(np.abs(np.asarray(ours) - expected)) <= max(1e-4, 1e-5 * np.abs(expected).max())


def test_average_shortcut_models_load_too(monkeypatch):
    # The authors' repository since 2017 (and the course project) downsample the shortcut by a 2x2
    # average: the peer with that shortcut matches ResNetCIFAR(shortcut_downsample="average").
    torch, peer = load_peer()

    def average_shortcut(self, x):
        if self.stride != 1:
            x = torch.nn.functional.avg_pool2d(x, 2)
        return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x

    monkeypatch.setattr(peer.Block, "shortcut", average_shortcut)
    torch.manual_seed(1)
    net = peer.ResNetSD(20, 10, 0.5, "linear").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = net(x).numpy()
    variables = from_torch_state_dict(net.state_dict(), 20, 10, p_last=0.5, shortcut_downsample="average")
    model = ResNetCIFAR(20, 10, p_last=0.5, shortcut_downsample="average")
    nhwc = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
    ours = np.asarray(model.apply(variables, nhwc))
    assert np.max(np.abs(ours - expected)) <= max(1e-4, 1e-5 * np.abs(expected).max())
    subsampled = np.asarray(ResNetCIFAR(20, 10, p_last=0.5).apply(variables, nhwc))
    assert np.max(np.abs(subsampled - expected)) > 1e-2  # the choice matters: not a vacuous match


def test_evaluate_cli_agrees_with_pytorch_on_the_same_data(tmp_path, capsys):
    torch, peer = load_peer()
    from sd_jax import interop
    from sd_jax.data import cifar_svhn
    torch.manual_seed(0)
    net = peer.ResNetSD(8, 10, 0.5, "linear").train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    dataset = cifar_svhn.load_dataset("synthetic")
    mean, std = (a.reshape(1, 3, 1, 1) for a in dataset.normalization("channel_mean_std"))

    def to_torch(images):
        return torch.from_numpy((images.transpose(0, 3, 1, 2) / np.float32(255.0) - mean) / std).float()

    for start in range(0, 512, 64):  # train briefly, so the error rates are not all 90%
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(to_torch(dataset.train.images[start:start + 64])),
                                          torch.from_numpy(dataset.train.labels[start:start + 64]).long()).backward()
        opt.step()
    net.eval()
    path = tmp_path / "peer.pth"
    torch.save({"state_dict": net.state_dict()}, path)
    result = interop.main(["--checkpoint", str(path), "--depth", "8", "--dataset", "synthetic", "--p-last", "0.5"])
    assert capsys.readouterr().out.strip().startswith("{")
    for name, split in (("val", dataset.val), ("test", dataset.test)):
        with torch.no_grad():
            predictions = net(to_torch(split.images)).argmax(1).numpy()
        expected = 100.0 * np.mean(predictions != split.labels)
        assert result[f"{name}_error"] == pytest.approx(expected, abs=100.0 / len(split) + 1e-9)


def test_float64_training_step_matches_a_float64_pytorch_step():
    """With jax_enable_x64 and a float64 model, one whole training step (`train_step`: the loss, the
    Nesterov SGD update of every parameter, the BatchNorm running statistics) equals the peer's
    float64 PyTorch step from the same weights to 1e-6 relative (BatchNorm statistics kept in
    float32 put them 1.5e-6 off at ResNet-8, 1.6e-3 at ResNet-110). The updates are compared, not the
    weights, so that the gradients' precision is what is measured."""
    torch, peer = load_peer()
    depth, batch = 8, 16
    torch.manual_seed(0)
    net = peer.ResNetSD(depth, 10, 1.0)
    with torch.no_grad():  # BatchNorm scales and biases away from their initial 1 and 0
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5), module.bias.normal_()
    net = net.double().train()
    config = default_config()
    config.update(depth=depth, p_last=1.0, batch_size=batch)
    lr = config.learning_rate
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=config.momentum, nesterov=config.nesterov,
                          weight_decay=config.weight_decay)
    sizes = {}  # examples x pixels each BatchNorm averages over: Torch's running variance is unbiased, ours not
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(lambda m, i, o, name=name: sizes.update({name: i[0][:, 0].numel()}))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(batch, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (batch,))
    loss = torch.nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    momentum = 1 - net.bn1.momentum
    change = {k: (v - before[k]).numpy() for k, v in net.state_dict().items() if not k.endswith("tracked")}
    for bn, n in sizes.items():  # the change ours makes: the biased variance of the same batch
        unbiased = before[f"{bn}.running_var"].numpy() + change[f"{bn}.running_var"] / (1 - momentum)
        change[f"{bn}.running_var"] = (1 - momentum) * (unbiased * (n - 1) / n - before[f"{bn}.running_var"].numpy())

    with jax.enable_x64(True):
        expected = from_torch_state_dict(change, depth, 10, p_last=1.0)
        mesh = Mesh(np.array(jax.devices()[:1]), (parallel.AXIS,))
        plan = make_plan(config, batch, 10, translate=0, flip=False, mesh=mesh)
        plan = dataclasses.replace(plan, model=plan.model.clone(dtype=jnp.float64))
        start = from_torch_state_dict(before, depth, 10, p_last=1.0)
        state = TrainState.create(apply_fn=plan.model.apply, params=start["params"],
                                  batch_stats=start["batch_stats"], tx=plan.tx)
        step = jax.jit(jax.shard_map(lambda s, images, labels, keys: train_step(s, images, labels, None, batch, keys,
                                                                                 plan, config),
                                     mesh=mesh, in_specs=PartitionSpec(), out_specs=PartitionSpec(), check_vma=False))
        images = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
        assert images.dtype == jnp.float64
        new, metrics = step(state, images, jnp.asarray(y.numpy()), run_keys(0))
        ours = {"params": jax.tree.map(jnp.subtract, new.params, start["params"]),
                "batch_stats": jax.tree.map(jnp.subtract, new.batch_stats, start["batch_stats"])}
        assert float(metrics["loss"]) / batch == pytest.approx(loss.item(), rel=1e-12)
    flat_ours, flat_expected = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (ours, expected))
    # ResNet-8: 23 parameters (stem conv + BN 3, three blocks of 2 convs + 2 BNs 18, linear 2), 14 statistics
    assert flat_ours.keys() == flat_expected.keys() and len(flat_ours) == 23 + 14
    for path, want in flat_expected.items():
        got = np.asarray(flat_ours[path])
        assert got.dtype == np.float64, path
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max(), err_msg=str(path))
