import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.layers.survival import drop_scale, expected_active_blocks, scaled_survival, survival_probabilities


def test_linear_decay_matches_closed_form():
    num_blocks, p_last = 54, 0.5
    p = survival_probabilities(num_blocks, p_last, "linear")
    assert p.shape == (54,)
    for l in (1, 18, 19, 54):  # 1-based, transition blocks (19, 37) included
        assert p[l - 1] == pytest.approx(1 - l / num_blocks * (1 - p_last))
    assert p[-1] == pytest.approx(p_last)
    assert np.all(np.diff(p) < 0)


def test_expected_active_blocks_resnet110():
    # sum_{l=1}^{L} (1 - l/L (1 - p_L)) = L - (1 - p_L)(L + 1)/2 = 54 - 0.5 * 55 / 2 = 40.25
    assert expected_active_blocks(54, 0.5, "linear") == pytest.approx(40.25)
    assert expected_active_blocks(54, 0.5, "uniform") == pytest.approx(27.0)
    assert expected_active_blocks(54, 1.0, "linear") == pytest.approx(54.0)


def test_uniform_and_constant():
    np.testing.assert_allclose(survival_probabilities(9, 0.8, "uniform"), np.full(9, 0.8))
    np.testing.assert_allclose(survival_probabilities(9, 1.0, "linear"), np.ones(9))


@pytest.mark.parametrize("args", [(0, 0.5, "linear"), (9, 1.5, "linear"), (9, 0.5, "cosine")])
def test_bad_arguments(args):
    with pytest.raises(ValueError):
        survival_probabilities(*args)


def test_drop_rate_warmup_ramps_from_zero_to_target():
    total = 1000
    assert float(drop_scale(0, total, 0.1)) == 0.0
    assert float(drop_scale(50, total, 0.1)) == pytest.approx(0.5)
    assert float(drop_scale(100, total, 0.1)) == 1.0
    assert float(drop_scale(900, total, 0.1)) == 1.0
    assert float(drop_scale(0, total, 0.0)) == 1.0
    assert float(scaled_survival(0.5, drop_scale(50, total, 0.1))) == pytest.approx(0.75)
    assert float(scaled_survival(jnp.float32(0.2), 0.0)) == 1.0
