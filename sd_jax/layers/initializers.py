"""The models' variable initialisers, and one random draw for all of a model's parameters.

Each initialiser is a constant or a scaled standard draw (normal, normal truncated to [-2, 2], or
uniform in [0, 1)). Called by Flax as usual, it draws with its own key: the same numbers as Flax's
and JAX's own initialisers. `one_draw` initialises a whole model from one standard draw per
distribution instead, and builds the variables from it on the host: XLA:CPU compiles every random
draw and every output array as kernels of their own (about 0.1 s per draw, 5 ms per array), so an
ImageNet ResNet-152's initialisation compiled for 5.2-5.6 s; `one_draw`'s program, the draws
alone, in 0.3 s (docs/performance.md, "Start-up").
"""
import contextlib
import contextvars
import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

STANDARD_DRAWS = {
    "normal": jax.random.normal,
    "truncated_normal": lambda key, shape: jax.random.truncated_normal(key, -2.0, 2.0, shape),
    "uniform": jax.random.uniform,
}
# The standard deviation of a standard normal truncated to [-2, 2] (Flax's variance_scaling).
TRUNCATED_NORMAL_STD = 0.87962566103423978
INIT_FANS = ("fan_in", "fan_out")


@dataclasses.dataclass(frozen=True)
class Request:
    """What one initialiser call asked for: `shift + scale * z`, z standard `distribution` (None:
    the constant `shift`), of `shape` and `dtype`."""
    distribution: Optional[str]
    shape: tuple
    scale: float
    shift: float
    dtype: np.dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def value(self, z: Optional[np.ndarray]) -> np.ndarray:
        """The variable on the host from its standard numbers `z` (flat; None for a constant)."""
        if self.distribution is None:
            return np.full(self.shape, self.shift, self.dtype)
        return (z.reshape(self.shape) * np.float32(self.scale) + np.float32(self.shift)).astype(self.dtype)


_recorder = contextvars.ContextVar("sd_jax_initializer_requests", default=None)


def _initializer(distribution: Optional[str], scale_of_shape, shift: float):
    """A Flax initialiser `(key, shape, dtype) -> shift + scale_of_shape(shape) * z`; inside
    `one_draw`'s abstract pass it records its request instead, keyed by the placeholder it returns."""

    def init(key, shape, dtype=jnp.float32):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        scale = scale_of_shape(shape)
        returned = _recorder.get()
        if returned is not None:  # one_draw's abstract pass: a placeholder, the value is built on the host
            value = jnp.zeros(shape, dtype)
            returned[id(value)] = (value, Request(distribution, shape, scale, shift, np.dtype(dtype)))
            return value
        if distribution is None:
            return jnp.full(shape, shift, dtype)
        return (STANDARD_DRAWS[distribution](key, shape) * scale + shift).astype(dtype)

    return init


def constant(value: float):
    """Every element `value`; `key` is ignored (None for a non-parameter variable)."""
    return _initializer(None, lambda shape: 0.0, value)


def fan(shape, which: str) -> int:
    """A kernel's fan in or out (HWIO convolutions, (in, out) dense kernels), as Flax and PyTorch count it."""
    receptive_field = math.prod(shape[:-2])
    return receptive_field * shape[-2 if which == "fan_in" else -1]


def he_normal(init_fan: str):
    """He-normal: std sqrt(2 / fan) over `init_fan` ("fan_in": the authors' `nninit.kaiming`;
    "fan_out": torchvision's `kaiming_normal_`)."""
    if init_fan not in INIT_FANS:
        raise ValueError(f"conv_init_fan must be one of {INIT_FANS}, got {init_fan!r}")
    return _initializer("normal", lambda shape: math.sqrt(2.0 / fan(shape, init_fan)), 0.0)


def lecun_normal():
    """Flax's default kernel initialiser: normal truncated at 2 std, variance 1 / fan_in."""
    return _initializer("truncated_normal",
                        lambda shape: math.sqrt(1.0 / fan(shape, "fan_in")) / TRUNCATED_NORMAL_STD, 0.0)


def uniform(low: float, high: float):
    """Uniform in [low, high)."""
    return _initializer("uniform", lambda shape: high - low, low)


@contextlib.contextmanager
def _recording(requests: dict):
    token = _recorder.set(requests)
    try:
        yield
    finally:
        _recorder.reset(token)


def one_draw(init_fn, key, jit=jax.jit) -> dict:
    """`init_fn(key)`'s variables (a Flax `init`), built on the host (numpy): each one that an
    initialiser of this module returned from its slice of one standard draw per distribution (keys
    split from `key`; slices in the order of the variables' leaves), any other by `init_fn` itself.
    `jit` compiles the draws, and `init_fn` for the others if there are any: an initialiser inside
    `nn.jit` or `nn.scan` returns into a trace that is reused, so its variable keeps its own draw."""
    tree, requests = _record(init_fn, key)
    sizes = {}  # distribution -> the sizes of its requests, in order
    for r in requests:
        if r is not None and r.distribution is not None:
            sizes.setdefault(r.distribution, []).append(r.size)
    totals = {name: sum(each) for name, each in sizes.items()}
    slices = {name: iter(np.split(np.asarray(z), np.cumsum(sizes[name])[:-1]))
              for name, z in jit(lambda key: standard_draws(key, totals))(key).items()}
    others = iter(jit(lambda key: [leaf for leaf, r in zip(jax.tree.leaves(init_fn(key)), requests) if r is None])(key)
                  if None in requests else ())
    leaves = [next(others) if r is None else r.value(next(slices[r.distribution]) if r.distribution else None)
              for r in requests]
    return jax.tree.unflatten(tree, leaves)


def _record(init_fn, key):
    """(the tree of `init_fn(key)`'s variables, the Request behind each leaf or None), from one
    abstract trace in which this module's initialisers record and return placeholders."""
    recorded = {}

    def traced(key):
        returned = {}  # id(placeholder) -> (placeholder, Request); holding the placeholder keeps its id unique
        with _recording(returned):
            variables = init_fn(key)
        leaves, recorded["tree"] = jax.tree.flatten(variables)
        recorded["requests"] = [returned[id(leaf)][1] if id(leaf) in returned else None for leaf in leaves]
        return variables

    jax.eval_shape(traced, key)
    return recorded["tree"], recorded["requests"]


def standard_draws(key, sizes: dict) -> dict:
    """{distribution: `sizes[distribution]` standard numbers}, each drawn with its own key split from `key`."""
    keys = dict(zip(STANDARD_DRAWS, jax.random.split(key, len(STANDARD_DRAWS))))
    return {name: STANDARD_DRAWS[name](keys[name], (size,)) for name, size in sizes.items()}
