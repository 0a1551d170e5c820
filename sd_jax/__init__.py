"""sd_jax: Deep Networks with Stochastic Depth (Huang et al., ECCV 2016) in JAX/Flax."""

__version__ = "0.1.0"  # the one place: pyproject.toml reads it
