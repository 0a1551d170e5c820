# ImageNet, ResNet-101 with constant depth: the baseline of imagenet_resnet101_composer_sd.py (recipe
# and sources in imagenet_resnet50_composer_sd.py); nothing is dropped.
#   python train.py --config configs/imagenet_resnet101_composer_constant.py --workdir runs/imagenet_resnet101_composer_constant
from sd_jax.config import base_config


def get_config():
    config = base_config("imagenet_resnet101_composer_sd")
    config.p_last = 1.0
    return config
