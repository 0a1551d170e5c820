# ResNet-20 with stochastic depth (p_L = 0.5, linear) on scikit-learn's 8x8 digits: no download,
# about 50 s on a 2-core CPU (compile included).
#   python train.py --config configs/quickstart.py --workdir runs/quickstart
from sd_jax.config import default_config


def get_config():
    config = default_config()
    config.dataset = "digits"
    config.depth = 20
    config.num_epochs = 30
    config.lr_boundaries = (15, 23)
    config.steps_per_call = 10
    return config
