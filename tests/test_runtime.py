"""Choosing JAX's build for the machine (`sd_jax.runtime`) on fake machines: nvidia-smi's outputs
as NVIDIA's driver prints them, TPU chip device files, none."""
import subprocess
import sys

import pytest

from sd_jax import runtime
from tests.conftest import ROOT

SMI_LIST = "GPU 0: Tesla T4 (UUID: GPU-6c0f3c9a-1b2e-4d5f-8a9b-0c1d2e3f4a5b)\n"
SMI_HEADER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {driver}             Driver Version: {driver}     CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
"""
REPO = "git+https://github.com/owner/sd_jax"


def gpu_machine(cuda: str, listing: str = SMI_LIST, visible=None):
    return runtime.find(visible, (listing, SMI_HEADER.format(driver="550.54.15", cuda=cuda)), [])


@pytest.mark.parametrize("cuda, extra", [("12.4", "cuda12"), ("12.0", "cuda12"), ("13.0", "cuda13"), ("13.1", "cuda13")])
def test_a_gpu_gets_the_cuda_build_its_driver_supports(cuda, extra):
    found = gpu_machine(cuda)
    assert (found.platform, found.ids, found.description) == ("gpu", ["0"], "1 x Tesla T4")
    assert runtime.requirement(REPO, found) == f"sd_jax[{extra}] @ {REPO}"


def test_a_driver_older_than_cuda_12_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"supports CUDA \(11, 8\).*need CUDA 12 or 13: update the NVIDIA driver"):
        runtime.requirement(REPO, gpu_machine("11.8"))


def test_visible_gpus_are_the_ones_used():
    listing = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})\n" for i in range(8))
    assert gpu_machine("13.0", listing).ids == [str(i) for i in range(8)]
    assert gpu_machine("13.0", listing, visible="2,5").ids == ["2", "5"]
    assert gpu_machine("13.0", listing, visible="").platform == "cpu"  # CUDA_VISIBLE_DEVICES="" hides them all


def test_a_tpu_gets_libtpu_and_a_cpu_the_plain_build():
    tpu = runtime.find(None, None, ["/dev/accel0", "/dev/accel1", "/dev/accel2", "/dev/accel3"])
    assert (tpu.platform, tpu.ids) == ("tpu", ["0", "1", "2", "3"])
    assert runtime.requirement(REPO, tpu) == f"sd_jax[tpu] @ {REPO}"
    cpu = runtime.find(None, None, [])  # no nvidia-smi, no chips
    assert cpu.platform == "cpu" and runtime.requirement(REPO, cpu) == f"sd_jax @ {REPO}"
    assert runtime.find(None, ("", "NVIDIA-SMI has failed"), []).platform == "cpu"  # a driver that lists no GPU


def test_jax_on_the_cpu_of_a_gpu_machine_stops_with_the_command_that_fixes_it():
    with pytest.raises(RuntimeError, match=r'has 1 x Tesla T4, but JAX .* \(cpu\).*pip install -U "jax\[cuda12\]"'):
        runtime.check_jax_uses(gpu_machine("12.4"))
    assert runtime.check_jax_uses(runtime.find(None, None, [])).endswith("(cpu)")


def test_choosing_the_build_imports_no_jax():
    code = "import sys, sd_jax.runtime; print('jax' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr[-2000:]
