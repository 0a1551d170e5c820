"""A CIFAR ResNet's outputs, BatchNorm updates and gradients (train mode with blocks dropped, and
eval mode), stored once so that later changes to the shared layer can be checked bit for bit:

    python -m tests.cifar_reference   # rewrites tests/data/cifar_resnet_reference.npz

Rewrite it only for a change that is meant to alter the CIFAR model's numbers.
"""
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.models.cifar import ResNetCIFAR

PATH = os.path.join(os.path.dirname(__file__), "data", "cifar_resnet_reference.npz")


def compute() -> dict:
    """Flat {name: array}: eval logits, train logits, new batch stats, gates and parameter gradients
    of ResNet-14 at p_L 0.5 for fixed weights, inputs and drop key (blocks open and closed, a
    downsampling one among the closed)."""
    model = ResNetCIFAR(14, p_last=0.5)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    labels = jnp.arange(4) % 10
    variables = model.init(jax.random.key(1), x)

    def loss(params):
        logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                      rngs={"drop": jax.random.key(2)}, mutable=["batch_stats", "gates"])
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(4), labels]), (logits, updates)

    (_, (logits, updates)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    tree = {"eval_logits": model.apply(variables, x, train=False), "train_logits": logits,
            "batch_stats": updates["batch_stats"], "gates": updates["gates"], "grads": grads}
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def cpu_features() -> str:
    """The CPU's vector instruction sets: XLA:CPU picks its kernels (and so its rounding) by them,
    so the same JAX on another CPU may differ in the last bits."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return platform.processor()
    return " ".join(sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse", "f16c"))))


def stored() -> dict:
    with np.load(PATH) as f:
        return dict(f)


if __name__ == "__main__":
    arrays = compute()
    arrays["jax_version"] = np.array(jax.__version__)
    arrays["backend"] = np.array(jax.default_backend())
    arrays["cpu"] = np.array(cpu_features())
    np.savez_compressed(PATH, **arrays)
    print("stored", len(arrays), "arrays in", PATH)
