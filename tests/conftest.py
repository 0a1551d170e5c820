import logging
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The suite runs on the CPU (CI has no accelerator). With the GPU compiler installed for the
# deviceless tests (tests/test_aot.py), JAX would otherwise try to start a CUDA device it does not
# have, and the failed start unregisters the compile-only GPU target too. JAX_PLATFORMS=cuda (or
# tpu) runs the suite on an accelerator.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The ImageNet pipeline tests load TensorFlow into this process, the parity tests PyTorch; PyTorch's
# triton (loaded by torch._dynamo) segfaults when it comes after TensorFlow, whatever order the
# tests are selected in. Loading it first, when PyTorch is installed, makes every order safe.
try:
    import torch._dynamo  # noqa: F401
except ImportError:
    pass


def forced_host_devices_env(devices: int) -> dict:
    """This process's environment with XLA_FLAGS forcing `devices` CPU devices, for a process a test
    starts. Every one-device start sets it too: the compilation cache's key includes the flags, so
    processes with the same flags share their compiled programs."""
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


@pytest.fixture(autouse=True)
def restore_package_logger():
    """Undo what a test's `cli.show_progress()` (the notebooks call it) does to the "sd_jax" logger,
    so later tests' caplog still sees its records."""
    package_log = logging.getLogger("sd_jax")
    saved = (list(package_log.handlers), package_log.level, package_log.propagate)
    yield
    package_log.handlers[:], package_log.level, package_log.propagate = saved


def pytest_configure(config):
    """One persistent compilation cache for the whole session, fresh each time: the pytest workers and
    every train.py or worker process the tests start share their compiled programs (a resumed run
    loads what the interrupted one compiled), small ones included, and nothing is written into the
    user's ~/.cache. The xdist workers inherit the directory the controller made (before any test
    module imports JAX); a script that imports this file outside pytest makes none."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sd_jax_tests_jax_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_sessionfinish(session):
    """The controller (or a run without xdist) removes the session's compilation cache."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture
def compile_only_targets():
    """For tests that compile in this process for a GPU or TPU that is not attached (sd_jax.aot's own
    child process keeps out of the cache): a compile-only client cannot load a cached program back
    (JAX warns, then compiles), and the small ones (the compiler-option probe) are compiled more than
    once, so these tests keep JAX's default threshold of 1 s."""
    import jax

    saved = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved)
