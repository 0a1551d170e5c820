# ImageNet, ResNet-101 with MosaicML composer's stochastic depth (block): drop_rate 0.4, linear over
# the 33 bottleneck blocks (p_last = 0.6); composer's method card reports 10% less wall-clock time at
# the same accuracy for this setting. The recipe of imagenet_resnet50_composer_sd.py (composer does
# not publish its baseline recipe; that file's comments give this one's sources).
# Data: data_source "tfds" (the two official tars in <data_dir>/downloads/manual), "files" (an
# ImageFolder in data_dir) or "synthetic" (docs/imagenet.md, "ImageNet data").
#   python train.py --config configs/imagenet_resnet101_composer_sd.py --workdir runs/imagenet_resnet101_composer_sd
from sd_jax.config import base_config


def get_config():
    config = base_config("imagenet_resnet50_composer_sd")
    config.depth = 101
    config.p_last = 0.6
    return config
