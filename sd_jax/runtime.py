"""Which accelerator this machine has, and which JAX build uses it, found without starting JAX
(a TPU chip opens in one process only; a GPU would lose the memory JAX reserves; and a notebook
must choose the build before it imports JAX). Imports nothing outside the standard library.

    python -m sd_jax.runtime git+https://github.com/OWNER/sd_jax   # prints the pip requirement

The notebooks install `requirement(REPO)` (sd_jax[cuda13] or [cuda12] by the driver's CUDA
version, sd_jax[tpu], or plain sd_jax on a CPU runtime), then `check_jax_uses(found)`.
"""
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
from typing import List, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class Accelerators:
    """The machine's accelerators: platform "gpu", "tpu" or "cpu", their ids, what they are."""

    platform: str
    ids: List[str]
    description: str = ""
    cuda_version: Optional[Tuple[int, int]] = None  # the highest CUDA the GPU driver supports


def parse_nvidia_smi(listing: str, query: str):
    """(GPU names from `nvidia-smi -L`, the driver's CUDA version from `nvidia-smi`'s header)."""
    names = [line.split(":", 1)[1].split("(UUID")[0].strip() for line in listing.splitlines() if line.startswith("GPU ")]
    version = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", query)
    return names, (int(version.group(1)), int(version.group(2))) if version else None


def find(visible_gpus: Optional[str], nvidia_smi: Optional[Tuple[str, str]], tpu_chips: List[str]) -> Accelerators:
    """The accelerators from what the machine shows: CUDA_VISIBLE_DEVICES, nvidia-smi's two outputs
    (None where it is not installed), the TPU chips' device files."""
    names, cuda = parse_nvidia_smi(*nvidia_smi) if nvidia_smi else ([], None)
    ids = [str(i) for i in range(len(names))] if visible_gpus is None else \
        [d.strip() for d in visible_gpus.split(",") if d.strip()]  # set but empty: no GPU for this process
    if names and ids:
        return Accelerators("gpu", ids, f"{len(ids)} x {names[0]}", cuda)
    if tpu_chips:
        return Accelerators("tpu", [str(i) for i in range(len(tpu_chips))], f"{len(tpu_chips)} TPU chips")
    return Accelerators("cpu", ["0"], "no GPU or TPU")


def local_accelerators() -> Accelerators:
    """This machine's accelerators (`find` on what it shows)."""
    smi = None
    if shutil.which("nvidia-smi"):
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        query = subprocess.run(["nvidia-smi"], capture_output=True, text=True)
        smi = (listing.stdout, query.stdout) if listing.returncode == 0 else None
    chips = sorted(glob.glob("/dev/accel[0-9]*")) or sorted(glob.glob("/dev/vfio/[0-9]*"))
    return find(os.environ.get("CUDA_VISIBLE_DEVICES"), smi, chips)


def jax_extra(found: Accelerators) -> str:
    """The sd_jax extra that installs JAX's build for `found`: "cuda13" (driver for CUDA 13 or
    newer), "cuda12", "tpu", or "" (the plain CPU build). A driver older than CUDA 12 raises."""
    if found.platform == "tpu":
        return "tpu"
    if found.platform != "gpu":
        return ""
    if found.cuda_version is None or found.cuda_version < (12, 0):
        raise RuntimeError(f"{found.description}: its driver supports CUDA {found.cuda_version or 'unknown'}, and JAX's "
                           "GPU builds need CUDA 12 or 13: update the NVIDIA driver (or pick another runtime)")
    return "cuda13" if found.cuda_version >= (13, 0) else "cuda12"


def requirement(repo: str, found: Optional[Accelerators] = None) -> str:
    """What `pip install` should get: this package from `repo` with the JAX build for the machine."""
    extra = jax_extra(found or local_accelerators())
    return f"sd_jax[{extra}] @ {repo}" if extra else f"sd_jax @ {repo}"


def check_jax_uses(found: Accelerators) -> str:
    """Raise RuntimeError unless JAX runs on the accelerator `found` says the machine has; returns
    what JAX runs on. Call it after installing (it imports JAX)."""
    import jax

    platform = jax.default_backend()
    running = f"JAX {jax.__version__} on {len(jax.devices())} x {jax.devices()[0].device_kind} ({platform})"
    if found.platform != "cpu" and platform != found.platform:
        extra = jax_extra(found)
        raise RuntimeError(f"this machine has {found.description}, but {running}: a long run would train on the "
                           f"wrong device. Install JAX's build for it: pip install -U \"jax[{extra}]\" (then restart "
                           "the runtime or Python)")
    return running


if __name__ == "__main__":
    print(requirement(sys.argv[1]))
