"""Old name of sd_jax.survival, kept so that existing imports keep working."""
from sd_jax.survival import (SURVIVAL_MODES, drop_scale, expected_active_blocks,  # noqa: F401
                             scaled_survival, survival_probabilities)
