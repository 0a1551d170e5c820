"""Accelerators to compile for without one attached (deviceless ahead-of-time compilation).

A GPU target is a description of the chip that XLA:GPU compiles for (a GpuTargetConfigProto, made
here from the facts below); a TPU target is a libtpu topology. Each names where its numbers come
from. The compilers are optional extras: `pip install "sd_jax[aot-gpu]"` (the CUDA plugin and its
NVIDIA libraries) and `"sd_jax[aot-tpu]"` (libtpu).
"""
import dataclasses
import os
from typing import Dict, Tuple

import jax

# The CUDA toolkit and driver a GPU target is described with. XLA:GPU runs conditionals and loops
# on the device (inside CUDA graphs) only where both are at least 12.3; a description without a
# driver version counts as old (XLA's command_buffer_conversion_pass).
CUDA_VERSION = "12.8.0"
CUDNN_VERSION = (9, 10, 0)
GIB = 2**30


class TargetError(RuntimeError):
    """A target that cannot be compiled for here; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """One NVIDIA GPU as XLA:GPU's cost model and code generator need it."""

    device_name: str  # as the driver reports it (nvidia-smi, jax.devices()[0].device_kind)
    compute_capability: Tuple[int, int]
    cores: int  # streaming multiprocessors
    fpus_per_core: int  # FP32 lanes per SM
    threads_per_core: int
    shared_memory_per_core: int  # bytes
    shared_memory_per_block_optin: int  # bytes
    l2_cache: int  # bytes
    memory_bandwidth: int  # bytes/s
    clock_ghz: float
    memory: int  # bytes, as the driver reports them
    source: str
    platform: str = "gpu"

    def target_config(self, cuda_version: str = CUDA_VERSION) -> str:
        """The chip as GpuTargetConfigProto text (what `*.gpu_target_config.pbtxt` dumps hold)."""
        major, minor = self.compute_capability
        fields = {
            "threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 49152,
            "shared_memory_per_core": self.shared_memory_per_core, "threads_per_core_limit": self.threads_per_core,
            "core_count": self.cores, "fpus_per_core": self.fpus_per_core, "block_dim_limit_x": 2**31 - 1,
            "block_dim_limit_y": 65535, "block_dim_limit_z": 65535, "memory_bandwidth": self.memory_bandwidth,
            "l2_cache_size": self.l2_cache, "clock_rate_ghz": self.clock_ghz, "device_memory_size": self.memory,
            "shared_memory_per_block_optin": self.shared_memory_per_block_optin,
            "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
        }
        lines = [f"  {key}: {value}" for key, value in fields.items()]
        lines.append(f"  cuda_compute_capability {{ major: {major} minor: {minor} }}")
        if cuda_version:
            lines += [f'  {key}: "{cuda_version}"' for key in
                      ("driver_version", "runtime_version", "compile_time_toolkit_version")]
        dnn = " ".join(f"{k}: {v}" for k, v in zip(("major", "minor", "patch"), CUDNN_VERSION))
        return ("gpu_device_info {\n" + "\n".join(lines) + "\n}\n" + 'platform_name: "CUDA"\n'
                + f"dnn_version_info {{ {dnn} }}\n" + f'device_description_str: "{self.device_name}"\n')

    def devices(self, count: int, cuda_version: str = CUDA_VERSION) -> list:
        """`count` compile-only devices of this GPU on one host."""
        from jax.experimental import topologies

        try:
            topology = topologies.get_topology_desc(self.device_name, "cuda", topology=f"1x1x{count}",
                                                    target_config=self.target_config(cuda_version))
        except NotImplementedError:
            raise TargetError('the GPU compiler is not installed: pip install "sd_jax[aot-gpu]" (JAX\'s CUDA '
                              f"plugin at this jaxlib's version, {jax.__version__})") from None
        return list(topology.devices)


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    """A TPU generation and the slice shapes (chips -> libtpu topology) offered for it."""

    generation: str  # libtpu's name: v4, v5e, v6e
    memory: int  # HBM per chip, bytes
    shapes: Dict[int, str]  # chips -> topology shape, "2x2" or "2x2x1"
    source: str
    chips_per_host: int = 8
    chip_config: str = "default"  # v4: "megacore" (one JAX device per chip, both TensorCores)
    platform: str = "tpu"

    def devices(self, count: int) -> list:
        from jax.experimental import topologies

        # Compiling needs no TPU: libtpu may load beside another process (a second compilation).
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        if count not in self.shapes:
            raise TargetError(f"TPU {self.generation} slices here have {sorted(self.shapes)} chips, not {count}")
        shape = self.shapes[count]
        dims = tuple(int(d) for d in shape.split("x")) + (1,) * (2 - shape.count("x"))
        host = dims if count <= self.chips_per_host else (2, self.chips_per_host // 2, 1)
        try:
            topology = topologies.get_topology_desc(platform="tpu", topology_name=f"{self.generation}:{shape}",
                                                    chips_per_host_bounds=host, chip_config_name=self.chip_config)
        except RuntimeError as error:
            if "TPU support not installed" in str(error):
                raise TargetError('the TPU compiler is not installed: pip install "sd_jax[aot-tpu]" (libtpu)') from None
            raise
        return list(topology.devices)


XLA_SPECS = "openxla/xla xla/backends/gpu/target_config/specs/"
TARGETS = {
    "h100": GpuTarget("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 2048, 233472, 232448, 52428800, 3352320000000,
                      1.98, 84942979072, XLA_SPECS + "h100_sxm.txtpb"),
    "h200": GpuTarget("NVIDIA H200 141GB HBM3e", (9, 0), 132, 128, 2048, 233472, 232448, 52428800, 4800000000000,
                      1.98, 151397597184, XLA_SPECS + "h200.txtpb"),
    "a100-40": GpuTarget("NVIDIA A100-SXM4-40GB", (8, 0), 108, 64, 2048, 167936, 166912, 41943040, 1555200000000,
                         1.41, 42331013120, XLA_SPECS + "a100_sxm_40.txtpb"),
    "a100-80": GpuTarget("NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 2048, 167936, 166912, 41943040, 2039040000000,
                         1.41, 85100068864, XLA_SPECS + "a100_sxm_80.txtpb"),
    # Colab's GPUs. NVIDIA's datasheets (L4: 58 SMs, 24 GB GDDR6 at 300 GB/s, 48 MB L2, 2.04 GHz boost;
    # T4: 40 SMs, 16 GB GDDR6 at 320 GB/s, 4 MB L2, 1.59 GHz boost), the CUDA C++ Programming Guide's
    # table of compute capabilities 8.9 and 7.5 (threads, shared memory per SM), memory as nvidia-smi
    # lists it (23034 MiB, 15360 MiB).
    "l4": GpuTarget("NVIDIA L4", (8, 9), 58, 128, 1536, 102400, 101376, 50331648, 300000000000, 2.04,
                    23034 * 2**20, "NVIDIA L4 datasheet; CUDA C++ Programming Guide, compute capability 8.9"),
    "t4": GpuTarget("Tesla T4", (7, 5), 40, 64, 1024, 65536, 65536, 4194304, 320000000000, 1.59,
                    15360 * 2**20, "NVIDIA T4 datasheet; CUDA C++ Programming Guide, compute capability 7.5"),
    # Cloud TPU system architecture pages: HBM per chip v4 32 GiB, v5e 16 GiB, v6e 32 GiB.
    "v4": TpuTarget("v4", 32 * GIB, {1: "1x1x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4"},
                    "Cloud TPU v4 documentation (32 GiB HBM2 per chip)", chips_per_host=4, chip_config="megacore"),
    "v5e": TpuTarget("v5e", 16 * GIB, {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8"},
                     "Cloud TPU v5e documentation (16 GiB HBM2 per chip)"),
    "v6e": TpuTarget("v6e", 32 * GIB, {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8"},
                     "Cloud TPU v6e documentation (32 GiB HBM per chip)"),
}


# Peak dense FLOP/s per chip for the dtypes the models compute in, and the TPUs' memory bandwidth
# (the GPUs' is in their description above), for the step-time lower bound (sd_jax.training.
# step_estimate). "f32" is the rate a float32 convolution gets at JAX's default precision: TF32
# tensor cores on NVIDIA since Ampere, one bfloat16 pass of the MXU on TPU, the FP32 units on a T4.
# NVIDIA's datasheets give tensor rates with 2:4 sparsity: the dense rate is half.
PEAKS = {
    "h100": ({"f32": 494.5e12, "bf16": 989.5e12}, None, "NVIDIA H100 datasheet (SXM): TF32 989, BF16 1,979 TFLOPS sparse"),
    "h200": ({"f32": 494.5e12, "bf16": 989.5e12}, None, "NVIDIA H200 datasheet (SXM): TF32 989, BF16 1,979 TFLOPS sparse"),
    "a100-40": ({"f32": 156e12, "bf16": 312e12}, None, "NVIDIA A100 datasheet: TF32 156, BF16 312 TFLOPS dense"),
    "a100-80": ({"f32": 156e12, "bf16": 312e12}, None, "NVIDIA A100 datasheet: TF32 156, BF16 312 TFLOPS dense"),
    "l4": ({"f32": 60e12, "bf16": 121e12}, None, "NVIDIA L4 datasheet: TF32 120, BF16 242 TFLOPS sparse"),
    "t4": ({"f32": 8.1e12, "bf16": 8.1e12}, None,
           "NVIDIA T4 datasheet: FP32 8.1 TFLOPS (no TF32 or BF16 tensor cores: XLA computes bfloat16 in float32)"),
    "v4": ({"f32": 275e12, "bf16": 275e12}, 1200e9, "Cloud TPU v4 documentation: 275 TFLOPS bf16, 1,200 GB/s HBM"),
    "v5e": ({"f32": 197e12, "bf16": 197e12}, 819e9, "Cloud TPU v5e documentation: 197 TFLOPS bf16, 819 GB/s HBM"),
    "v6e": ({"f32": 918e12, "bf16": 918e12}, 1640e9, "Cloud TPU v6e documentation: 918 TFLOPS bf16, 1,640 GB/s HBM"),
}
# Seconds per kernel inside a CUDA graph: NVIDIA's "Getting Started with CUDA Graphs" (2019) measured
# 3.4 us per 2.9 us kernel launched from a graph, 0.5 us between kernels. A TPU program's fused ops
# follow each other with no published per-op cost: none is counted (the bound stays a lower bound).
LAUNCH_S = {"gpu": 0.5e-6, "tpu": 0.0}
LAUNCH_SOURCE = {"gpu": "NVIDIA Technical Blog, Getting Started with CUDA Graphs (2019): 0.5 us per kernel",
                 "tpu": "not modelled (no published per-op cost)"}


def chip(name: str):
    """The target as the step-time lower bound needs it (`step_estimate.Chip`)."""
    from sd_jax.training.step_estimate import Chip

    spec = target(name)
    flops, bandwidth, _ = PEAKS[name]
    return Chip(flops, bandwidth or spec.memory_bandwidth, LAUNCH_S[spec.platform])


def target(name: str):
    if name not in TARGETS:
        raise TargetError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
