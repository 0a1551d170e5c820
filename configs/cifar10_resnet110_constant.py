# CIFAR-10+, ResNet-110 with constant depth (p_L = 1.0): the paper's baseline (Table 1: 6.41% test error).
# Same code path and recipe as cifar10_resnet110_sd.py; nothing is ever dropped.
#   python train.py --config configs/cifar10_resnet110_constant.py --workdir runs/cifar10_resnet110_constant
from sd_jax.config import default_config


def get_config():
    config = default_config()
    config.dataset = "cifar10"
    config.depth = 110
    config.p_last = 1.0
    return config
