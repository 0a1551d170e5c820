import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax import targets

from sd_jax.training import compiler
from tests import test_aot

CPU_ONLY = pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the XLA:CPU options")


@pytest.fixture
def no_user_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")


def batch_norm_sums(x):
    return jnp.sum(x, axis=(0, 1, 2)), jnp.sum(x * x, axis=(0, 1, 2))


def assert_sums_match_float64(sums, squares, x, rtol):
    np.testing.assert_allclose(sums, x.astype(np.float64).sum((0, 1, 2)), rtol=rtol)
    np.testing.assert_allclose(squares, (x.astype(np.float64) ** 2).sum((0, 1, 2)), rtol=rtol)


@CPU_ONLY
def test_cpu_reductions_are_compiled_by_xla_not_ynnpack(no_user_flags):
    assert compiler.compiler_options() == compiler.BACKEND_OPTIONS["cpu"]
    x = np.random.default_rng(0).normal(size=(8, 6, 6, 4)).astype(np.float32)
    fn = compiler.jit(batch_norm_sums)
    assert "__ynn_fusion" not in fn.lower(x).compile().as_text()
    assert_sums_match_float64(*fn(x), x, rtol=1e-5)


@CPU_ONLY
def test_batch_norm_statistics_of_a_stage_one_activation_stay_accurate(no_user_flags):
    """XLA's reduction accumulates less precisely than YNNPACK's (about 4e-6 against 1e-7 relative
    here); BatchNorm needs far less, but the bound would catch a real precision regression."""
    x = (np.random.default_rng(1).normal(size=(128, 32, 32, 16)) * 2 + 3).astype(np.float32)
    assert_sums_match_float64(*compiler.jit(batch_norm_sums)(x), x, rtol=2e-5)


@CPU_ONLY
def test_an_option_named_in_xla_flags_is_left_to_the_user(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE")
    assert compiler.compiler_options() == {}


@CPU_ONLY
def test_an_option_this_xla_does_not_know_is_dropped_with_a_warning(no_user_flags, monkeypatch, caplog):
    monkeypatch.setitem(compiler.BACKEND_OPTIONS, "cpu", {"xla_cpu_no_such_option_sd_jax": "1"})
    assert compiler.compiler_options() == {}
    assert "did not accept" in caplog.text
    assert float(compiler.jit(jnp.sum)(jnp.arange(4.0))) == 6.0


def test_backends_without_options_get_none(no_user_flags):
    tpu = types.SimpleNamespace(platform="tpu")  # the options are chosen by the device's platform
    assert compiler.compiler_options(tpu) == {}


@pytest.mark.skipif(not test_aot.GPU_COMPILER, reason='JAX\'s CUDA plugin is not installed: pip install ".[aot-gpu]"')
def test_a_gpu_device_gets_the_gpu_options_from_a_cpu_process(no_user_flags, compile_only_targets):
    """The options follow the device compiled for, not JAX's default backend: sd_jax.aot compiles
    for a GPU that is not attached with the options a GPU run gets."""
    h100 = targets.TARGETS["h100"].devices(1)[0]
    assert compiler.compiler_options(h100) == compiler.BACKEND_OPTIONS["gpu"]
    assert "CONDITIONAL" in compiler.BACKEND_OPTIONS["gpu"]["xla_gpu_enable_command_buffer"].split(",")
