# ImageNet, ResNet-50 with constant depth: the baseline of imagenet_resnet50_composer_sd.py (its
# comments give the recipe and say that composer does not publish its own); nothing is dropped.
#   python train.py --config configs/imagenet_resnet50_composer_constant.py --workdir runs/imagenet_resnet50_composer_constant
from sd_jax.config import base_config


def get_config():
    config = base_config("imagenet_resnet50_composer_sd")
    config.p_last = 1.0
    return config
