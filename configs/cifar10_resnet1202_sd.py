# CIFAR-10+, ResNet-1202 with stochastic depth, p_L = 0.5 linear (paper: 4.91% test error; constant
# depth 6.67%). 300 epochs; as He et al. for this depth, lr 0.01 for the first epoch to warm up, then
# 0.1, divided by 10 at epochs 150 and 225. nn.scan over blocks keeps the compile time flat.
#   python train.py --config configs/cifar10_resnet1202_sd.py --workdir runs/cifar10_resnet1202_sd
from sd_jax.config import default_config


def get_config():
    config = default_config()
    config.dataset = "cifar10"
    config.depth = 1202
    config.p_last = 0.5
    config.num_epochs = 300
    config.lr_boundaries = (150, 225)
    config.lr_warmup_epochs = 1
    config.lr_warmup_value = 0.01
    config.scan_blocks = True
    return config
