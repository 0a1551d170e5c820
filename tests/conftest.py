import logging
import os
import sys

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


@pytest.fixture(autouse=True)
def restore_package_logger():
    """Undo what a test's `cli.show_progress()` (the notebooks call it) does to the "sd_jax" logger,
    so later tests' caplog still sees its records."""
    package_log = logging.getLogger("sd_jax")
    saved = (list(package_log.handlers), package_log.level, package_log.propagate)
    yield
    package_log.handlers[:], package_log.level, package_log.propagate = saved
