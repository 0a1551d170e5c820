# ImageNet, ResNet-152 with constant depth (p_L = 1.0): the paper's ImageNet baseline (Table 1: 23.06%
# top-1 validation error after 90 epochs, 21.78% after 120). The recipe of imagenet_resnet152_paper_sd.py
# (fb.resnet.torch's; its comments list what the paper leaves open); nothing is ever dropped.
#   python train.py --config configs/imagenet_resnet152_paper_constant.py --workdir runs/imagenet_resnet152_paper_constant
from sd_jax.config import base_config


def get_config():
    config = base_config("imagenet_resnet152_paper_sd")
    config.p_last = 1.0
    return config
