"""What a run or benchmark ran on: the devices, the software versions, the code's commit and the
compiler options, so that numbers can be compared like with like (summary.json, bench output)."""
import importlib.metadata
import os
import platform
import subprocess

import jax

import sd_jax
from sd_jax.training import compiler

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")
# Signs of an accelerator on the machine, whatever JAX sees: device files and the variables that
# TPU VMs and Colab set; with the install line that lets JAX use it (README, "GPUs and TPUs").
ACCELERATOR_SIGNS = (
    ("an NVIDIA GPU", ("/dev/nvidia0", "/dev/nvidiactl"), (), 'pip install -U "jax[cuda13]" (CUDA 13 driver; '
     '"jax[cuda12]" for a CUDA 12 driver)'),
    ("a TPU", ("/dev/accel0", "/dev/vfio/0"), ("TPU_ACCELERATOR_TYPE", "COLAB_TPU_ADDR"), 'pip install -U "jax[tpu]"'),
)
HARDWARE_KEYS = ("backend", "device_kind", "device_count", "process_count")
SOFTWARE_KEYS = ("python", "versions", "compiler_options")


def package_version(name: str):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit():
    """The commit of the checkout sd_jax runs from ("-dirty" with uncommitted changes to tracked
    files); None when it is not run from a git checkout (an installed package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(sd_jax.__file__)))  # the checkout holding sd_jax/

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or os.path.realpath(top.stdout.strip()) != os.path.realpath(root):
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return git("rev-parse", "HEAD").stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "python": platform.python_version(),
        "versions": {**{name: package_version(name) for name in PACKAGES}, "sd_jax": sd_jax.__version__},
        "git_commit": git_commit(),
        "compiler_options": compiler.compiler_options(),
        "host": platform.node(),
    }


def idle_accelerator():
    """(what, install line) when the machine has a GPU or TPU but JAX runs on the CPU (a CPU-only
    jaxlib, the usual result of `pip install jax`), else None."""
    if jax.default_backend() != "cpu":
        return None
    for what, paths, variables, install in ACCELERATOR_SIGNS:
        if any(os.path.exists(p) for p in paths) or any(os.environ.get(v) for v in variables):
            return what, install
    return None


def hardware(record: dict) -> str:
    """"2 x NVIDIA H100 (gpu)"; "unknown" for a record without provenance (older runs)."""
    if not record:
        return "unknown"
    processes = f", {record['process_count']} processes" if record["process_count"] > 1 else ""
    return f"{record['device_count']} x {record['device_kind']} ({record['backend']}{processes})"


def differences(records: list) -> list:
    """The hardware and software keys on which the records disagree, as "key: a vs b" lines."""
    known = [r for r in records if r]
    lines = []
    for key in HARDWARE_KEYS + SOFTWARE_KEYS:
        values = []
        for record in known:
            if record.get(key) not in values:
                values.append(record.get(key))
        if len(values) > 1:
            lines.append(f"{key}: " + " vs ".join(str(v) for v in values))
    if len(known) < len(records) and known:
        lines.append("some runs record no provenance (older runs)")
    return lines
