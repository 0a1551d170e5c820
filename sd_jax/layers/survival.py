"""Stochastic depth's survival probabilities (Huang et al. 2016, Sec. 3) and the drop-rate warm-up."""
import jax.numpy as jnp
import numpy as np

SURVIVAL_MODES = ("linear", "uniform")


def survival_probabilities(num_blocks: int, p_last: float, mode: str = "linear") -> np.ndarray:
    """Per-block survival probabilities p_1..p_L (1-based over all L blocks).

    linear: p_l = 1 - l / L * (1 - p_L) (the paper's default); uniform: p_l = p_L.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if not 0.0 <= p_last <= 1.0:
        raise ValueError(f"p_last must lie in [0, 1], got {p_last}")
    if mode == "linear":
        l = np.arange(1, num_blocks + 1, dtype=np.float64)
        return 1.0 - l / num_blocks * (1.0 - p_last)
    if mode == "uniform":
        return np.full(num_blocks, float(p_last))
    raise ValueError(f"unknown survival mode {mode!r}: expected one of {SURVIVAL_MODES}")


def expected_active_blocks(num_blocks: int, p_last: float, mode: str = "linear") -> float:
    """Expected number of blocks that run in one training step: the sum of the p_l."""
    return float(survival_probabilities(num_blocks, p_last, mode).sum())


def drop_scale(step, total_steps: int, warmup_fraction: float):
    """Fraction of the target drop rate in force at `step` (0 -> nothing dropped, 1 -> target).

    Ramps linearly from 0 to 1 over the first `warmup_fraction` of training; 1 throughout when 0.
    `step` may be a traced JAX scalar.
    """
    if warmup_fraction <= 0:
        return jnp.float32(1.0)
    warmup_steps = max(1.0, warmup_fraction * total_steps)
    return jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)


def scaled_survival(p, scale):
    """Survival probability with the drop rate scaled: 1 - scale * (1 - p)."""
    return 1.0 - scale * (1.0 - p)
