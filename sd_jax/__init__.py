"""sd_jax: Deep Networks with Stochastic Depth (Huang et al., ECCV 2016) in JAX/Flax."""
