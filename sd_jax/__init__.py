"""sd_jax: Deep Networks with Stochastic Depth (Huang et al., ECCV 2016) in JAX/Flax.

The public API, what the README, the notebooks and the docs use: the stochastic-depth layer, the
two model families, configs, training, the PyTorch weight loaders and `compiler.jit`. Everything
else is reached through its module (README, "How the code is laid out").
"""

__version__ = "0.1.0"  # the one place: pyproject.toml reads it

from sd_jax.config import load_config  # noqa: E402
from sd_jax.interop import from_torch_state_dict, from_torchvision_state_dict  # noqa: E402
from sd_jax.layers.stochastic_depth import StochasticDepth  # noqa: E402
from sd_jax.models.cifar import ResNetCIFAR  # noqa: E402
from sd_jax.models.imagenet import ResNetImageNet  # noqa: E402
from sd_jax.training import compiler  # noqa: E402  (`compiler.jit`: jax.jit with the project's XLA options)
from sd_jax.training.loop import train_and_evaluate  # noqa: E402

__all__ = ["StochasticDepth", "ResNetCIFAR", "ResNetImageNet", "load_config", "train_and_evaluate",
           "from_torch_state_dict", "from_torchvision_state_dict", "compiler", "__version__"]
