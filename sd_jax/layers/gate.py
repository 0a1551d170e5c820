"""A residual block's gate as one custom-VJP operation: a closed gate costs only what it must write.

Differentiating a `lax.cond` makes every value the open branch keeps for the backward pass an
output of the forward conditional, the block's input and parameters among them; XLA gives each
output a buffer of its own, so the closed branch copies the inputs and zero-fills every kept
activation, one kernel per output (docs/performance.md, issue 33). Here:
  - the branch runs under a checkpoint policy that keeps only the values named `SAVED_NAME`
    (BatchNorm tags its input, a convolution's output, and its reductions); the elementwise rest
    is recomputed inside the backward pass's fusions;
  - of those, the ones that are the block's own inputs (the input, the parameters) reach the
    backward pass from outside the conditional, not through it;
  - the small outputs (the kept reductions, the parameter gradients, the branch's new state)
    travel packed in one vector per dtype;
  - a closed branch writes only the block's output: on a GPU every other output it returns
    uninitialised (`lax.empty`; zeros elsewhere), and what the step reads is chosen outside with
    the gate, `where(gate, value, other)`, fused into the kernels that consume it: the new state
    (else the old one: a conditional that passed the old state through would copy it, and its
    outputs could not be written in place of the state a step loop carries) and, on a GPU, the
    gradients (else zeros); the kept values are read only by the backward pass's open branch;
  - a ReLU's derivative is read from whether the block's output is positive, kept as a byte per
    element: in a scan the output itself would be kept once more per block (it is the next
    block's input, which the scan keeps too).
The numbers are those of differentiating the conditional (tests/test_gate.py).
"""
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SAVED_NAME = "sd_saved"  # checkpoint name of the values a gated branch keeps for its backward pass
SAVE_POLICY = jax.checkpoint_policies.save_only_these_names(SAVED_NAME)
PACKED_MAX_SIZE = 1 << 16  # elements: an array this small travels in its dtype's packed vector


def _channels_first(array):
    """The array with its last axis first: the order of a convolution kernel (HWIO) in the layout
    XLA:GPU gives it (OHWI), so that packing and unpacking it copies bytes and transposes nothing."""
    return jnp.moveaxis(array, -1, 0) if array.ndim > 1 else array


def _channels_last(flat, shape):
    """The inverse of `_channels_first` on a flattened array."""
    return jnp.moveaxis(flat.reshape(shape[-1:] + shape[:-1]), 0, -1) if len(shape) > 1 else flat.reshape(shape)


def on_gpu(gpu: Callable, elsewhere: Callable, *args):
    """gpu(*args) on a GPU, elsewhere(*args) on other platforms: chosen when the program is lowered
    for its platform (`lax.platform_dependent`), so the compiler never sees a conditional."""
    return lax.platform_dependent(*args, cuda=gpu, rocm=gpu, default=elsewhere)


def _unwritten(shape, dtype):
    """An array no kernel writes on a GPU (`lax.empty`: uninitialised); zeros elsewhere. On a TPU an
    uninitialised output of a conditional's branch costs memory (composer's ResNet-50 on one v5e:
    8.68 GiB against 6.58 with zeros; docs/performance.md), and the CPU writes zeros for both."""
    return on_gpu(lambda: lax.empty(shape, dtype), lambda: jnp.zeros(shape, dtype))


def _zero_where_closed(gate, value):
    """`value`, or zeros where the gate is closed: a closed branch's gradients are `_unwritten`, so
    on a GPU the choice is made here (fused into the kernels that read them); elsewhere they are
    zeros already, and a select would be one more pass over them (XLA:CPU)."""
    return on_gpu(lambda v: jnp.where(gate, v, jnp.zeros_like(v)), lambda v: v, value)


@jax.tree_util.register_static
class _Packing:
    """How a list of arrays travels through a conditional: the small ones flattened (channels first)
    into one vector per dtype, so that a branch writes them with one kernel; the large ones as they
    are."""

    def __init__(self, structs):
        self.structs = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in structs]
        self.small = [int(np.prod(s.shape)) <= PACKED_MAX_SIZE for s in self.structs]
        self.dtypes = sorted({str(s.dtype) for s, small in zip(self.structs, self.small) if small})

    def pack(self, leaves):
        vectors = [jnp.concatenate([jnp.ravel(_channels_first(leaf)) for leaf, s, small in zip(leaves, self.structs, self.small)
                                    if small and str(s.dtype) == dtype]) for dtype in self.dtypes]
        return vectors, [leaf for leaf, small in zip(leaves, self.small) if not small]

    def empty(self):
        """What `pack` returns, never to be read: what a closed branch returns (`_unwritten`)."""
        sizes = {dtype: sum(int(np.prod(s.shape)) for s, small in zip(self.structs, self.small)
                            if small and str(s.dtype) == dtype) for dtype in self.dtypes}
        return ([_unwritten((sizes[dtype],), dtype) for dtype in self.dtypes],
                [_unwritten(s.shape, s.dtype) for s, small in zip(self.structs, self.small) if not small])

    def unpack(self, packed):
        vectors, large = packed
        offsets, large = {dtype: 0 for dtype in self.dtypes}, iter(large)
        leaves = []
        for s, small in zip(self.structs, self.small):
            if not small:
                leaves.append(next(large))
                continue
            vector, size = vectors[self.dtypes.index(str(s.dtype))], int(np.prod(s.shape))
            start = offsets[str(s.dtype)]
            leaves.append(_channels_last(vector[start:start + size], s.shape))
            offsets[str(s.dtype)] = start + size
        return leaves


@jax.tree_util.register_static
class _Plan:
    """What a trace of the open branch found: the structure of its pullback, which of the
    pullback's residuals are the block's inputs (their indices), how the others (the first
    `kept_count` leaves) and the new state travel through the conditional, and the activation's
    residuals' structure."""

    def __init__(self, pullback_tree, forwarded, packing, kept_count, activation_tree):
        self.pullback_tree, self.forwarded = pullback_tree, forwarded
        self.packing, self.kept_count, self.activation_tree = packing, kept_count, activation_tree


def gated_residual(branch: Callable, activation: Optional[Callable], gate, params, x, shortcut, state, context=None):
    """(activation(shortcut + y), new_state) where (y, new_state) = branch(params, state, x, context)
    when `gate`, else (activation(shortcut), state). `branch` is pure; `state` (BatchNorm statistics)
    and `context` (say, the mask of a batch's real examples) get no gradient."""
    return _gated(branch, activation, gate, params, x, shortcut, (state, context))


def _reads_output(activation) -> bool:
    """A ReLU's derivative is known from its output's sign: no VJP residuals to keep."""
    return activation is None or activation is jax.nn.relu


def _activate(activation, pre):
    """activation(pre) and the residuals of its VJP (none where `_reads_output`)."""
    if _reads_output(activation):
        return (pre if activation is None else activation(pre)), [], None
    out, vjp = jax.vjp(activation, pre)
    leaves, tree = jax.tree.flatten(vjp)
    return out, leaves, tree


def _open(branch, activation, params, x, shortcut, inputs):
    state, context = inputs
    run = lambda p, x: _cast_output(branch(p, state, x, context), shortcut.dtype)
    # prevent_cse=False: the forward and backward passes run in separate conditionals, so there is
    # no common subexpression to keep apart, and the barrier would keep the unpacking as kernels.
    y, pullback, new_state = jax.vjp(jax.checkpoint(run, policy=SAVE_POLICY, prevent_cse=False), params, x, has_aux=True)
    out, activation_leaves, activation_tree = _activate(activation, shortcut + y)
    return out, new_state, activation_leaves, activation_tree, pullback


def _cast_output(y_and_state, dtype):
    y, state = y_and_state
    return y.astype(dtype), state


def _forwarded(leaves, inputs):
    """For each residual, the index of the input it is (by identity), or None."""
    index = {id(leaf): i for i, leaf in enumerate(inputs)}
    return tuple(index.get(id(leaf)) for leaf in leaves)


def _trace_plan(branch, activation, params, x, shortcut, inputs) -> _Plan:
    """The plan, from one abstract trace of the open branch before the conditional is built: the
    closed branch must return the same structure, and a conditional's branches are traced in an
    order JAX does not promise."""
    found = {}

    def probe(params, x, shortcut, inputs):
        _, new_state, _, activation_tree, pullback = _open(branch, activation, params, x, shortcut, inputs)
        leaves, tree = jax.tree.flatten(pullback)
        forwarded = _forwarded(leaves, jax.tree.leaves((params, x, inputs)))
        found.update(tree=tree, forwarded=forwarded, activation_tree=activation_tree)
        return [leaf for leaf, f in zip(leaves, forwarded) if f is None], jax.tree.leaves(new_state)

    kept, state = jax.eval_shape(probe, params, x, shortcut, inputs)
    if len(state) != len(jax.tree.leaves(inputs[0])):
        raise ValueError(f"a gated branch must return a new value for each of the {len(jax.tree.leaves(inputs[0]))} "
                         f"arrays of state it is given; it returned {len(state)}")
    return _Plan(found["tree"], found["forwarded"], _Packing(kept + state), len(kept), found["activation_tree"])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _gated(branch, activation, gate, params, x, shortcut, inputs):
    def open_(params, x, shortcut, inputs):
        return _cast_output(branch(params, inputs[0], x, inputs[1]), shortcut.dtype)

    def closed(params, x, shortcut, inputs):
        return jnp.zeros_like(shortcut), inputs[0]

    y, new_state = lax.cond(gate, open_, closed, params, x, shortcut, inputs)
    return _activate(activation, shortcut + y)[0], new_state


def _gated_fwd(branch, activation, gate, params, x, shortcut, inputs):
    plan = _trace_plan(branch, activation, params, x, shortcut, inputs)

    def open_(params, x, shortcut, inputs):
        out, new_state, activation_leaves, _, pullback = _open(branch, activation, params, x, shortcut, inputs)
        kept = [leaf for leaf, f in zip(jax.tree.leaves(pullback), plan.forwarded) if f is None]
        return out, activation_leaves, plan.packing.pack(kept + jax.tree.leaves(new_state))

    def closed(params, x, shortcut, inputs):
        out, activation_leaves, _ = _activate(activation, shortcut)
        return out, activation_leaves, plan.packing.empty()

    out, activation_leaves, packed = lax.cond(gate, open_, closed, params, x, shortcut, inputs)
    state = inputs[0]
    computed = plan.packing.unpack(packed)[plan.kept_count:]
    new_state = jax.tree.unflatten(jax.tree.structure(state), [
        jnp.where(gate, new, old) for new, old in zip(computed, jax.tree.leaves(state))])
    positive = out > 0 if activation is jax.nn.relu else None  # a byte per element, where out has 2 or 4
    return (out, new_state), (gate, params, x, inputs, positive, activation_leaves, packed, plan)


def _gated_bwd(branch, activation, residuals, cotangents):
    gate, params, x, inputs, positive, activation_leaves, packed, plan = residuals
    g_out, _ = cotangents
    if plan.activation_tree is not None:
        g_pre = jax.tree.unflatten(plan.activation_tree, activation_leaves)(g_out)[0]
    else:
        g_pre = g_out if positive is None else jnp.where(positive, g_out, jnp.zeros_like(g_out))
    known = jax.tree.leaves((params, x, inputs))
    grads_packing = _Packing(jax.tree.leaves(params) + [x])

    def open_(g_pre, packed):
        kept = iter(plan.packing.unpack(packed)[:plan.kept_count])
        leaves = [next(kept) if f is None else known[f] for f in plan.forwarded]
        g_params, g_x = jax.tree.unflatten(plan.pullback_tree, leaves)(g_pre)
        return grads_packing.pack(jax.tree.leaves(g_params) + [g_x])

    def closed(g_pre, packed):
        return grads_packing.empty()

    grads = [_zero_where_closed(gate, g) for g in grads_packing.unpack(lax.cond(gate, open_, closed, g_pre, packed))]
    return None, jax.tree.unflatten(jax.tree.structure(params), grads[:-1]), grads[-1], g_pre, None


_gated.defvjp(_gated_fwd, _gated_bwd)
