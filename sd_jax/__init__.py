"""sd_jax: Deep Networks with Stochastic Depth (Huang et al., ECCV 2016) in JAX/Flax.

The public API, what the README, the notebooks and the docs use: the stochastic-depth layer, the
two model families, configs, training, the PyTorch weight loaders and `compiler.jit`. Everything
else is reached through its module (README, "How the code is laid out"). The names are loaded on
first use, so `import sd_jax.runtime` (a notebook choosing its JAX build) does not import JAX.
"""
import importlib

__version__ = "0.1.0"  # the one place: pyproject.toml reads it

_HOMES = {"load_config": "sd_jax.config", "from_torch_state_dict": "sd_jax.interop",
          "from_torchvision_state_dict": "sd_jax.interop", "StochasticDepth": "sd_jax.layers.stochastic_depth",
          "ResNetCIFAR": "sd_jax.models.cifar", "ResNetImageNet": "sd_jax.models.imagenet",
          "compiler": "sd_jax.training.compiler",  # `compiler.jit`: jax.jit with the project's XLA options
          "train_and_evaluate": "sd_jax.training.loop"}
__all__ = [*_HOMES, "__version__"]


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module 'sd_jax' has no attribute {name!r}")
    home = importlib.import_module(_HOMES[name])
    return home if _HOMES[name].endswith("." + name) else getattr(home, name)  # compiler: the module itself
