# SVHN (train + extra, no augmentation), ResNet-152 with stochastic depth, p_L = 0.5 linear
# (paper Table 1: 1.75% test error). As the authors' command for this result (`-dataset svhn -N 25
# -maxEpochs 50 -deathRate 0.5`): 50 epochs, lr 0.1 divided by 10 at the start of epochs 30 and 35
# (main.lua: 0.6 and 0.7 of maxEpochs), validation and test error every 200 iterations.
#   python train.py --config configs/svhn_resnet152_sd.py --workdir runs/svhn_resnet152_sd
from sd_jax.config import default_config


def get_config():
    config = default_config()
    config.dataset = "svhn"
    config.depth = 152
    config.p_last = 0.5
    config.num_epochs = 50
    config.lr_boundaries = (30, 35)
    config.eval_every_steps = 200
    return config
