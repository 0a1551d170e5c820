"""What `pip install` of this repository ships: the notebooks (Colab) need the configs and the
reference numbers from the installed package, not from a checkout."""
import subprocess
import sys
import zipfile

import pytest

import sd_jax
from sd_jax.config import config_names
from tests.conftest import ROOT


@pytest.mark.slow
def test_wheel_ships_the_configs_and_the_reference_results(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                             "-w", str(tmp_path), ROOT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("sd_jax-*.whl")
    assert wheel.name.startswith(f"sd_jax-{sd_jax.__version__}-")  # pyproject reads the package's version
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "sd_jax/reference_results.json" in names
    assert {f"sd_jax/configs/{name}.py" for name in config_names()} <= names  # configs/ installed as sd_jax.configs
    assert "quickstart" in config_names() and len(config_names()) == 14


def test_every_module_imports():
    """Each module of the package (the quick subset's guarantee that nothing is left unimported)."""
    import importlib
    import pkgutil

    names = [m.name for m in pkgutil.walk_packages(sd_jax.__path__, "sd_jax.")]
    assert {"sd_jax.sweep", "sd_jax.runtime", "sd_jax.training.step_estimate", "sd_jax.data.tfds"} <= set(names)
    for name in names:
        importlib.import_module(name)
