import logging
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def restore_package_logger():
    """Undo what a test's `cli.show_progress()` (the notebooks call it) does to the "sd_jax" logger,
    so later tests' caplog still sees its records."""
    package_log = logging.getLogger("sd_jax")
    saved = (list(package_log.handlers), package_log.level, package_log.propagate)
    yield
    package_log.handlers[:], package_log.level, package_log.propagate = saved
