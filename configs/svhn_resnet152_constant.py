# SVHN (train + extra, no augmentation), ResNet-152 with constant depth (paper Table 1: 1.80%).
# The recipe of svhn_resnet152_sd.py (the authors' code: evaluation every 200 iterations).
#   python train.py --config configs/svhn_resnet152_constant.py --workdir runs/svhn_resnet152_constant
from sd_jax.config import default_config


def get_config():
    config = default_config()
    config.dataset = "svhn"
    config.depth = 152
    config.p_last = 1.0
    config.num_epochs = 50
    config.lr_boundaries = (30, 35)
    config.eval_every_steps = 200
    return config
