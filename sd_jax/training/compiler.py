"""XLA options the project sets on its own jitted computations, per backend, measured to help.

They go through `jax.jit(..., compiler_options=...)`, so they touch only sd_jax's computations and
never the process-wide XLA_FLAGS; an option that the user's XLA_FLAGS names is left to the user.
docs/performance.md has the measurement behind each option.
"""
import contextlib
import functools
import logging
import os

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

# XLA:CPU hands reductions (BatchNorm's sums) to YNNPACK by default; those library calls cannot
# fuse with their producers, and the training step runs faster with XLA's own fused reductions.
# Dots stay with YNNPACK.
# XLA:GPU runs each `conditional` (a stochastic-depth gate) and `while` (the multi-step loop) as a
# thunk that copies its predicate to the host and waits for the stream, unless it sits inside a
# command buffer (a CUDA graph, where CUDA >= 12.3 evaluates it on the device). With CONDITIONAL,
# WHILE and CONVOLUTION among the command-buffer types, the whole multi-step training call compiles
# to one command buffer: no host round trip per step; COLLECTIVES and DYNAMIC_SLICE_FUSION keep it
# so on several GPUs, where synchronised BatchNorm puts an all-reduce inside every gate
# (docs/performance.md, "GPU and TPU without the device").
# XLA drops CONDITIONAL and WHILE by itself when the CUDA driver or runtime is older than 12.3; the
# conditionals then run as host-synchronised thunks again (correct, slower).
GPU_COMMAND_BUFFER_TYPES = ("FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE,CONVOLUTION,"
                            "DYNAMIC_SLICE_FUSION,COLLECTIVES")
BACKEND_OPTIONS = {
    "cpu": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "gpu": {"xla_gpu_enable_command_buffer": GPU_COMMAND_BUFFER_TYPES},
}


_active = True


@contextlib.contextmanager
def without_options():
    """Compile without the project's options inside this block (for before/after measurements)."""
    global _active
    saved, _active = _active, False
    try:
        yield
    finally:
        _active = saved


def user_flags() -> str:
    """The XLA_FLAGS of this process: options named there are the user's to set."""
    return os.environ.get("XLA_FLAGS", "")


@functools.lru_cache(maxsize=None)
def _accepted(device, items: tuple) -> bool:
    """Whether the XLA compiling for `device` knows the options (names change between XLA versions)."""
    try:
        one = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))
        jax.jit(jnp.sum, compiler_options=dict(items)).lower(one).compile()
        return True
    except Exception as error:  # noqa: BLE001 - XLA reports an unknown option as a generic error
        log.warning("XLA did not accept compiler options %s (%s); compiling without them.",
                    dict(items), str(error).splitlines()[0])
        return False


def compiler_options(device=None) -> dict:
    """The BACKEND_OPTIONS for `device`'s platform (default: JAX's
    first device), minus any that the user's XLA_FLAGS set. `device` may be a compile-only device of
    another platform (sd_jax.aot)."""
    if not _active:
        return {}
    device = device or jax.devices()[0]
    flags = user_flags()
    options = {k: v for k, v in BACKEND_OPTIONS.get(device.platform, {}).items() if f"--{k}" not in flags}
    if options and not _accepted(device, tuple(sorted(options.items()))):
        return {}
    return options


def jit(fun, device=None, **kwargs):
    """`jax.jit` with the project's compiler options (BACKEND_OPTIONS) for
    `device`'s platform (default: JAX's first device; pass one of the mesh's devices when compiling
    for a target that is not attached)."""
    return jax.jit(fun, compiler_options=compiler_options(device) or None, **kwargs)


def use_compilation_cache(directory: str) -> None:
    """Keep compiled programs in JAX's persistent cache under `directory` (~ expanded), so that a
    second start of the same run loads them instead of compiling (docs/runs.md, "Start-up"). "" leaves
    the cache off; a cache directory already set (JAX_COMPILATION_CACHE_DIR) is the user's."""
    if directory and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
