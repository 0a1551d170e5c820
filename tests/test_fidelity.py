"""Each detail of the authors' Torch code (yueatsprograms/Stochastic_Depth, 86b5cdd) the config can
choose, checked against a value derived independently of the code under test."""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.training import records
from sd_jax.config import CONVENTIONS, default_config, load_config
from sd_jax.models.cifar import ResNetCIFAR, option_a_shortcut
from sd_jax.training.experiment import make_experiment
from sd_jax.training.feeds import epoch_permutation
from sd_jax.training.loop import train_and_evaluate
from sd_jax.training.plan import init_variables, steps_per_epoch
from sd_jax.training.steps import make_train_steps
from tests.test_training import tiny_config


def init_params(**model_kwargs):
    """ResNet-110's initial parameters as train.py draws them (one draw for all parameters)."""
    return init_variables(ResNetCIFAR(110, 10, **model_kwargs), jax.random.key(0), (32, 32, 3))["params"]


def leaves_named(tree, name):
    return [np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(tree)
            if getattr(path[-1], "key", None) == name]


@pytest.mark.slow
def test_batchnorm_scale_starts_uniform_in_0_1_like_torch7():
    scales = np.concatenate([s.ravel() for s in leaves_named(init_params(bn_scale_init="uniform"), "scale")])
    assert scales.size == 16 + 2 * (18 * 16 + 18 * 32 + 18 * 64)  # stem + two BNs per block
    assert scales.min() >= 0.0 and scales.max() < 1.0
    # Uniform[0, 1): mean 1/2 and standard deviation 1/sqrt(12), within 5 standard errors.
    assert abs(scales.mean() - 0.5) < 5 * np.sqrt(1 / 12 / scales.size)
    assert scales.std() == pytest.approx(np.sqrt(1 / 12), rel=0.05)
    ones = np.concatenate([s.ravel() for s in leaves_named(init_params(bn_scale_init="ones"), "scale")])
    assert np.all(ones == 1.0)


@pytest.mark.parametrize("fan", ["fan_in", "fan_out"])
def test_conv_init_is_he_normal_over_the_chosen_fan(fan):
    params = init_params(conv_init_fan=fan)
    kernel = np.asarray(params["stage3"]["block5"]["f"]["conv1"]["kernel"])  # 3x3x64x64: 36,864 draws
    stem = np.asarray(params["conv1"]["kernel"])  # 3x3x3x16: fan_in 27, fan_out 144
    for weights in (kernel, stem):
        h, w, c_in, c_out = weights.shape
        expected = np.sqrt(2.0 / (h * w * (c_in if fan == "fan_in" else c_out)))
        # The sample std of n normal draws has a relative standard error of 1/sqrt(2n).
        assert weights.std() == pytest.approx(expected, rel=5 / np.sqrt(2 * weights.size))
        assert abs(weights.mean()) < 5 * expected / np.sqrt(weights.size)


def test_classifier_init_is_torch_linear_uniform_with_bias():
    linear = init_params(classifier_init="torch")["linear"]
    bound = 1 / np.sqrt(64)
    for values in (np.asarray(linear["kernel"]), np.asarray(linear["bias"])):
        assert np.all(np.abs(values) <= bound)
    kernel = np.asarray(linear["kernel"])  # 640 draws from U(-1/8, 1/8): std 1/8/sqrt(3)
    assert kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.15)
    assert np.abs(np.asarray(linear["bias"])).max() > 0  # Torch draws the bias too
    flax_default = init_params(classifier_init="lecun")["linear"]
    assert np.all(np.asarray(flax_default["bias"]) == 0)


def test_average_shortcut_is_the_mean_of_each_2x2_window_then_zero_channels():
    x = np.random.default_rng(0).normal(size=(2, 6, 4, 3)).astype(np.float32)
    got = np.asarray(option_a_shortcut(jnp.asarray(x), 5, 2, "average"))
    by_hand = np.zeros((2, 3, 2, 5), np.float32)
    for i in range(3):
        for j in range(2):
            by_hand[:, i, j, :3] = (x[:, 2 * i, 2 * j] + x[:, 2 * i + 1, 2 * j] + x[:, 2 * i, 2 * j + 1]
                                    + x[:, 2 * i + 1, 2 * j + 1]) / 4
    np.testing.assert_allclose(got, by_hand, rtol=1e-6, atol=1e-7)
    subsampled = np.asarray(option_a_shortcut(jnp.asarray(x), 5, 2, "subsample"))
    np.testing.assert_array_equal(subsampled[..., :3], x[:, ::2, ::2])


def test_cifar_epoch_has_352_steps_and_sees_every_image_once():
    assert steps_per_epoch(45_000, 128, True) == 352  # split(128): 351 full + one of 72
    assert steps_per_epoch(45_000, 128, False) == 351
    config = tiny_config(batch_size=100)  # 1024 synthetic images: 10 batches of 100 + one of 24
    run = make_experiment(config)
    assert run.plan.steps_per_epoch == 11
    perm = np.asarray(epoch_permutation(run.keys, 1, run.plan, config.batch_size))
    assert perm.shape == (1100,) and sorted(perm[:1024]) == list(range(1024))
    train_steps = make_train_steps(run.plan, config)
    _, sums = train_steps(run.state, run.train_data, run.keys, jnp.asarray(perm), 0, 11)
    assert float(sums["images"]) == 1024 and float(sums["steps"]) == 11


@pytest.mark.slow
def test_partial_batch_step_equals_a_step_on_its_real_images_alone():
    # The padded last batch (8 real images of 32) must update parameters and BatchNorm statistics
    # exactly as a batch of those 8 images alone: the loss is their mean, statistics their own.
    config = tiny_config(batch_size=32, augment_translate=0, augment_flip=False, p_last=0.5)
    run = make_experiment(config)
    subset = {k: v[:40] if k in ("images", "labels") else v for k, v in run.train_data.items()}
    plan = dataclasses.replace(run.plan, num_train=40, steps_per_epoch=2)
    perm = jnp.asarray(np.random.default_rng(1).permutation(40))
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    padded_perm = jnp.pad(perm, (0, 24))
    padded, padded_sums = make_train_steps(plan, config)(
        copy(run.state), subset, run.keys, padded_perm, 1, 1)

    alone_config = tiny_config(batch_size=8, augment_translate=0, augment_flip=False, p_last=0.5,
                               partial_last_batch=False)
    alone_plan = dataclasses.replace(plan, num_train=8, steps_per_epoch=1)
    alone, alone_sums = make_train_steps(alone_plan, alone_config)(
        copy(run.state), subset, run.keys, perm[32:], 0, 1)
    assert float(padded_sums["images"]) == float(alone_sums["images"]) == 8
    assert float(padded_sums["loss"]) == pytest.approx(float(alone_sums["loss"]), rel=1e-5)
    assert float(padded_sums["errors"]) == float(alone_sums["errors"])
    for ours, reference in ((padded.params, alone.params), (padded.batch_stats, alone.batch_stats)):
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_eval_every_steps_cadence_checkpoints_and_exact_resume(tmp_path):
    config = tiny_config(eval_every_steps=5)  # 8 steps per epoch, 24 in all
    workdir = str(tmp_path / "run")
    summary = train_and_evaluate(config, workdir)
    lines = records.read_metrics(workdir)
    assert [l["step"] for l in lines] == [5, 10, 15, 20, 24]
    assert [l["epoch"] for l in lines] == [0.625, 1.25, 1.875, 2.5, 3]
    best = min(reversed(lines), key=lambda l: l["val_error"])
    assert (summary["best_val_step"], summary["test_error_at_best_val"]) == (best["step"], best["test_error"])
    kept = os.path.join(workdir, "checkpoints")  # the latest two and the best
    assert sorted(int(name) for name in os.listdir(kept) if name.isdigit()) == sorted({20, 24, best["step"]})

    # What a kill after step 20's evaluation leaves: its checkpoint and metrics. Resuming redoes 21-24.
    interrupted = str(tmp_path / "interrupted")
    shutil.copytree(workdir, interrupted)
    with open(os.path.join(interrupted, records.METRICS_FILE), "w") as f:  # the line of step 24 is lost too
        f.writelines(json.dumps(line, sort_keys=True) + "\n" for line in lines[:4])
    shutil.rmtree(os.path.join(interrupted, "checkpoints", "24"))
    os.remove(os.path.join(interrupted, records.SUMMARY_FILE))
    train_and_evaluate(config, interrupted)
    timing = ("epoch_time_s", "images_per_s")
    strip = lambda line: {k: v for k, v in line.items() if k not in timing}
    assert [strip(l) for l in records.read_metrics(interrupted)] == [strip(l) for l in lines]


@pytest.mark.parametrize("name", ["cifar10_resnet110_sd", "cifar10_resnet110_constant", "cifar100_resnet110_sd",
                                  "cifar100_resnet110_constant", "svhn_resnet152_sd", "svhn_resnet152_constant"])
def test_paper_configs_follow_the_authors_code(name):
    config = load_config(name)
    assert config.convention == "authors"
    assert all(config[key] in (None, value) for key, value in CONVENTIONS["authors"].items())
    svhn = name.startswith("svhn")
    assert config.eval_every_steps == (200 if svhn else 0)  # main.lua: accounting every 200 iterations
    assert tuple(config.lr_boundaries) == ((30, 35) if svhn else (250, 375))  # 0.6/0.7 or 0.5/0.75 of maxEpochs
    assert config.depth == (152 if svhn else 110) and config.num_epochs == (50 if svhn else 500)


def test_conventions_differ_only_where_documented():
    authors, pytorch = CONVENTIONS["authors"], CONVENTIONS["pytorch"]
    assert {k for k in authors if authors[k] != pytorch[k]} == {"bn_scale_init", "conv_init_fan", "normalization"}
    assert default_config().convention == "authors"
