# SVHN (train + extra, no augmentation), ResNet-152 with stochastic depth, p_L = 0.5 linear
# (paper Table 1: 1.75% test error). 50 epochs, lr 0.1 divided by 10 at epochs 30 and 35.
#   python train.py --config configs/svhn_resnet152_sd.py --workdir runs/svhn_resnet152_sd
from sd_jax.config import default_config


def get_config():
    config = default_config()
    config.dataset = "svhn"
    config.depth = 152
    config.p_last = 0.5
    config.num_epochs = 50
    config.lr_boundaries = (30, 35)
    return config
