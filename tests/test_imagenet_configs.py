"""The ImageNet configs: what they set, their learning-rate schedules against independent
transcriptions, the clear stop until the ImageNet pipeline exists, and the published numbers."""
import math
import subprocess
import sys

import pytest

from sd_jax import report

from sd_jax.data import cifar_svhn

from sd_jax.training import records
from sd_jax.config import ConfigError, load_config, resolve_convention, validate
from sd_jax.models.imagenet import ResNetImageNet
from sd_jax.training.loop import train_and_evaluate
from sd_jax.training.plan import learning_rate_schedule, make_model
from tests.conftest import ROOT
from tests.test_resnet_imagenet import closed_form_params
from tests.test_training import tiny_config

IMAGENET_CONFIGS = {  # name: (depth, p_last)
    "imagenet_resnet152_paper_sd": (152, 0.5), "imagenet_resnet152_paper_constant": (152, 1.0),
    "imagenet_resnet50_composer_sd": (50, 0.8), "imagenet_resnet50_composer_constant": (50, 1.0),
    "imagenet_resnet101_composer_sd": (101, 0.6), "imagenet_resnet101_composer_constant": (101, 1.0),
}


@pytest.mark.slow
def test_without_the_data_train_py_stops_at_once_and_says_where_it_goes(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run([sys.executable, "train.py", "--config", "configs/imagenet_resnet50_composer_sd.py",
                             "--workdir", str(workdir), f"--config.data_dir={tmp_path / 'tfds'}"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in result.stderr
    assert str(tmp_path / "tfds" / "downloads" / "manual") in result.stderr
    assert "Traceback" not in result.stderr and not workdir.exists()


@pytest.mark.parametrize("name", sorted(IMAGENET_CONFIGS))
def test_imagenet_configs_are_complete_and_build_their_model(name):
    config = load_config(name)
    validate(config, cifar_svhn.DATASETS)
    model = make_model(resolve_convention(config), num_classes=1000)
    depth, p_last = IMAGENET_CONFIGS[name]
    assert isinstance(model, ResNetImageNet) and (model.depth, model.p_last) == (depth, p_last)
    assert model.drop_downsample_blocks and model.drop_mode == "block" and config.drop_gates == "shared"
    assert model.zero_init_last_bn == ("composer" in name)
    assert (config.batch_size, config.num_epochs) == ((1024, 90) if "composer" in name else (128, 120))
    assert config.image_size == 224 and config.partial_last_batch is False
    # fb.resnet.torch datasets/imagenet.lua: ColorJitter 0.4 and Lighting 0.1 for the paper; composer names neither
    assert (config.color_jitter, config.lighting_std) == ((0.0, 0.0) if "composer" in name else (0.4, 0.1))


def fb_resnet_torch_lr(epoch: int) -> float:
    """fb.resnet.torch train.lua, transcribed: LR * 0.1^floor((epoch - 1) / 30) for ImageNet."""
    return 0.1 * 0.1 ** math.floor((epoch - 1) / 30)


@pytest.mark.parametrize("epoch", [1, 30, 31, 60, 61, 90, 91, 120])
def test_paper_learning_rate_is_fb_resnet_torchs(epoch):
    steps = 10009  # 1,281,167 images in batches of 128, the last one partial
    schedule = learning_rate_schedule(load_config("imagenet_resnet152_paper_sd"), steps)
    for step in ((epoch - 1) * steps, epoch * steps - 1):
        assert float(schedule(step)) == pytest.approx(fb_resnet_torch_lr(epoch), rel=1e-6)


def test_composer_learning_rate_warms_up_linearly_then_follows_a_cosine():
    config = load_config("imagenet_resnet50_composer_sd")
    steps = 1252  # 1,281,167 / 1024, the last batch partial
    warmup, total, peak = 5 * steps, 90 * steps, 0.4

    def expected(t):  # Goyal et al.'s ramp from 0, then half a cosine to 0 at the last step
        if t < warmup:
            return peak * t / warmup
        return peak * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))

    schedule = learning_rate_schedule(config, steps)
    for t in (0, 1, warmup // 2, warmup - 1, warmup, warmup + 1, total // 2, total - 1, total):
        assert float(schedule(t)) == pytest.approx(expected(t), rel=1e-5, abs=1e-7), t


def test_linear_warmup_keeps_the_step_boundaries_where_they_were():
    config = tiny_config(lr_boundaries=(3, 5), lr_warmup_epochs=1, lr_warmup="linear", lr_warmup_value=0.0)
    schedule = learning_rate_schedule(config, steps_per_epoch=10)
    expected = {0: 0.0, 5: 0.05, 9: 0.09, 10: 0.1, 19: 0.1, 20: 0.01, 39: 0.01, 40: 0.001}
    assert {step: pytest.approx(float(schedule(step))) for step in expected} == expected


@pytest.mark.parametrize("overrides,message", [
    ({"model": "resnet_imagenet", "depth": 34}, "depth=34 (model='resnet_imagenet')"),
    ({"model": "vit"}, "model='vit' must be one of"),
    ({"lr_schedule": "cosine"}, "mean nothing to lr_schedule='cosine'"),
    ({"lr_schedule": "linear"}, "lr_schedule='linear' must be one of"),
    ({"lr_warmup": "exponential"}, "lr_warmup='exponential' must be one of"),
    ({"lr_warmup_value": 0.0, "lr_warmup_epochs": 1}, "0 allowed for a linear warm-up"),
    ({"lr_schedule": "cosine", "lr_boundaries": (), "lr_warmup_epochs": 500}, "fewer than num_epochs"),
])
def test_bad_model_and_schedule_values_name_the_key(overrides, message):
    config = tiny_config()
    config.update(overrides)
    with pytest.raises(ConfigError) as error:
        validate(config, cifar_svhn.DATASETS)
    assert message in str(error.value)


def imagenet_run(depth, p_last, epochs):
    config = {"dataset": "imagenet2012", "depth": depth, "p_last": p_last, "survival_mode": "linear",
              "num_epochs": epochs, "model": "resnet_imagenet", "drop_downsample_blocks": True}
    return report.RunRecord("w", config, [], {})


def test_published_imagenet_numbers_reach_the_report():
    assert report.references_for(imagenet_run(152, 0.5, 90)) == {"paper": 23.38}
    assert report.references_for(imagenet_run(152, 0.5, 120)) == {"paper": 21.98}
    assert report.references_for(imagenet_run(152, 1.0, 90)) == {"paper": 23.06, "torchvision": pytest.approx(100 - 78.31)}
    assert report.references_for(imagenet_run(152, 1.0, 120)) == {"paper": 21.78}
    assert report.references_for(imagenet_run(50, 1.0, 90)) == {"torchvision": pytest.approx(100 - 76.13)}
    savings = {(r["depth"], r["p_last"]): r["value"] for r in report.reference_results()["train_time_saving"]}
    assert savings == {(50, 0.8): 0.05, (101, 0.6): 0.10}
    model = report.run_model(imagenet_run(101, 0.6, 90).config)
    assert isinstance(model, ResNetImageNet) and model.survival_probabilities()[-1] == pytest.approx(0.6)


@pytest.mark.slow
def test_the_bottleneck_model_trains_through_the_training_loop(tmp_path):
    """train_and_evaluate with model="resnet_imagenet" (on the 8x8 digits until the ImageNet
    pipeline exists; one epoch keeps it short): the config's model, cosine schedule and survival
    keys reach the run, its evaluation and its summary."""
    config = tiny_config(dataset="digits", model="resnet_imagenet", depth=50, p_last=0.8, drop_downsample_blocks=False,
                         zero_init_last_bn=True, scan_blocks=True, num_epochs=1, lr_schedule="cosine",
                         lr_boundaries=(), eval_every_steps=5)
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    lines = records.read_metrics(str(tmp_path / "run"))
    grayscale_stem = 7 * 7 * 2 * 64  # the digits have one channel, the closed form counts three
    assert summary["num_params"] == closed_form_params((3, 4, 6, 3), num_classes=10) - grayscale_stem
    # The 4 projection blocks always on; the other 12 survive with 1 - i/12 * 0.2, i = 1..12.
    assert summary["expected_active_blocks"] == pytest.approx(4 + 12 - 0.2 * 78 / 12)
    steps = lines[-1]["step"]  # 1300 digits in batches of 128, the last one partial: 11
    assert [line["step"] for line in lines] == [5, 10, 11] and steps == 11
    cosine = [0.05 * (1 + math.cos(math.pi * start / steps)) for start in (0, 5, 10)]  # lr at each line's first step
    assert [line["lr"] for line in lines] == pytest.approx(cosine, rel=1e-5)  # recorded to 7 digits
    assert all(math.isfinite(line["train_loss"]) and 0 <= line["test_error"] <= 100 for line in lines)
    assert all(4 <= line["mean_active_blocks"] <= 16 for line in lines)  # the projection blocks always run
