# CIFAR-10+, ResNet-110 with stochastic depth: p_L = 0.5, linear decay (paper Table 1: 5.25% test error).
# The authors' Torch code (default_config, convention "authors"): 45k/5k split, translate+flip, SGD
# Nesterov 0.9, wd 1e-4, batch 128 (the last, short batch of each epoch trained), 500 epochs, lr 0.1
# divided by 10 at the start of epochs 250 and 375; reported: test error at the best validation epoch.
#   python train.py --config configs/cifar10_resnet110_sd.py --workdir runs/cifar10_resnet110_sd
from sd_jax.config import default_config


def get_config():
    config = default_config()
    config.dataset = "cifar10"
    config.depth = 110
    config.p_last = 0.5
    config.survival_mode = "linear"
    return config
