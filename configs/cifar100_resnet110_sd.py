# CIFAR-100+, ResNet-110 with stochastic depth, p_L = 0.5 linear (paper Table 1: 24.98% test error).
# Recipe as CIFAR-10: 45k/5k split, translate+flip, 500 epochs, lr 0.1 /10 at 250 and 375.
#   python train.py --config configs/cifar100_resnet110_sd.py --workdir runs/cifar100_resnet110_sd
from sd_jax.config import default_config


def get_config():
    config = default_config()
    config.dataset = "cifar100"
    config.depth = 110
    config.p_last = 0.5
    return config
