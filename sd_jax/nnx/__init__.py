"""Stochastic depth for Flax NNX: the layer (`StochasticDepth`, a gate that skips a dropped
block's compute under `nnx.jit`) and the paper's models, computing what the Linen ones compute
(docs/api.md, "Flax NNX")."""
from sd_jax.nnx.layers import BatchNorm, Conv3x3, Gates, StochasticDepth, active_blocks
from sd_jax.nnx.models import (BasicBranch, BottleneckBranch, Projection, ResNetCIFAR, ResNetImageNet,
                               linen_variables, load_linen_variables)

__all__ = ["BasicBranch", "BatchNorm", "BottleneckBranch", "Conv3x3", "Gates", "Projection", "ResNetCIFAR",
           "ResNetImageNet", "StochasticDepth", "active_blocks", "linen_variables", "load_linen_variables"]
