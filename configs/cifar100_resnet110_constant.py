# CIFAR-100+, ResNet-110 with constant depth (p_L = 1.0): the paper's baseline (Table 1: 27.22%).
#   python train.py --config configs/cifar100_resnet110_constant.py --workdir runs/cifar100_resnet110_constant
from sd_jax.config import default_config


def get_config():
    config = default_config()
    config.dataset = "cifar100"
    config.depth = 110
    config.p_last = 1.0
    return config
