"""Counting model evaluations and model VJPs, exactly, by running a computation once
with an instrumented model."""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._convs import maybe_canonical_convs


class EvalCount:
    """Counts of one run: `forward` model evaluations (every primal call, including
    those made inside a backward pass to rebuild activations) and `vjp` model
    vector-Jacobian products.

    A call under `jax.vmap` is one batched evaluation: it counts once in `forward`
    (or `vjp`), and `forward_lanes` (`vjp_lanes`) counts its lanes, i.e. how many
    unbatched calls it stands for (equal to `forward` when nothing is vmapped).
    Under nested `vmap`s a call counts once per lane of the outer ones.
    """

    def __init__(self):
        self.forward = 0
        self.vjp = 0
        self.forward_lanes = 0
        self.vjp_lanes = 0

    def __repr__(self):
        return f"EvalCount(forward={self.forward}, vjp={self.vjp})"


def _batched_once(tick: Callable) -> Callable:
    """`tick(lanes)` as a callback that runs once per model call, also under
    `jax.vmap` (whose default rule for a callback would run it once per batch
    element), with the number of lanes of that call. It takes the time `t` and a
    scalar probe of x so that it is batched whenever the model call is, and returns
    a zero shaped like `t` that the caller makes the model depend on, so that a
    transformation that re-runs the model re-runs the callback too. (A callback
    without an output is dead code to the recomputation of `jax.checkpoint`, which
    keeps only what the backward pass needs: the state-per-step checkpointing of
    `DTO(checkpoints="steps")` re-ran every model evaluation uncounted.)"""

    # A pure callback (an effectful one is refused inside `jax.checkpoint`): the
    # data dependency keeps it alive, and the probe of x among its operands keeps two
    # evaluations at the same t (two chains of a coupled sampler) from being merged.
    @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
    def zero_after_tick(lanes, t, probe):
        def host(t, probe):
            tick(lanes)
            return np.zeros(np.shape(t), np.asarray(t).dtype)

        return jax.pure_callback(
            host, jax.ShapeDtypeStruct(jnp.shape(t), jnp.result_type(t)), t, probe
        )

    # A constant zero: its tangent is zero (pure callbacks have no JVP rule, and
    # diffrax's BacksolveAdjoint differentiates through the model's VJP).
    @zero_after_tick.defjvp
    def _(lanes, primals, tangents):
        return zero_after_tick(lanes, *primals), jnp.zeros_like(primals[0])

    @jax.custom_batching.custom_vmap
    def once(t, probe):
        return zero_after_tick(1, t, probe)

    @once.def_vmap
    def _(axis_size, in_batched, t, probe):
        probe = jnp.reshape(probe, (-1,))[0] if in_batched[1] else probe
        return zero_after_tick(axis_size, t, probe), in_batched[0]

    return once


def _probe(tree) -> jax.Array:
    """A scalar that depends on (and is batched like) the first leaf of `tree`."""
    leaf = jtu.tree_leaves(tree)[0]
    return jnp.reshape(leaf, (-1,))[0]


def counting_model(model: Callable, count: EvalCount) -> Callable:
    """Wraps `model(params, x, t, cond)` so that running it increments
    `count.forward` and differentiating it increments `count.vjp`.

    The callbacks take the time `t` as an argument so that no transformation can
    hoist them out of a loop as loop-invariant (JAX's scan partial evaluation would
    otherwise run an argument-free callback once instead of once per step). The
    residuals of the wrapped VJP are the model's own, so rematerialisation (as in
    `DTO(checkpoints=...)`) re-runs, and counts, the forward evaluations it really
    re-runs.
    """
    # The model's convolutions, and those of the VJP taken below, in the layouts
    # XLA:CPU runs fast inside loops (`adjoint_jax._convs`). `aj.sample` rewrites the
    # model it is given, but not inside this custom VJP: without this, the counted
    # model's backward convolutions took the slow path (digits, N = 64: 3.6 s
    # against 0.34 s for the uncounted gradient).
    model = maybe_canonical_convs(model)

    def _fwd_tick(lanes):
        count.forward += 1
        count.forward_lanes += lanes

    def _vjp_tick(lanes):
        count.vjp += 1
        count.vjp_lanes += lanes

    fwd_tick, vjp_tick = _batched_once(_fwd_tick), _batched_once(_vjp_tick)

    @jax.custom_vjp
    def wrapped(params, x, t, cond):
        return model(params, x, t + fwd_tick(t, _probe(x)), cond)

    def fwd(params, x, t, cond):
        out, vjp = jax.vjp(model, params, x, t + fwd_tick(t, _probe(x)), cond)
        return out, (vjp, t)

    def bwd(res, g):
        vjp, t = res
        # The cotangents pass through the tick (an exact zero is added) so that a
        # re-run of this VJP re-runs it, as for the evaluations above.
        zero = jnp.sum(vjp_tick(t, _probe(g)))
        return vjp(jtu.tree_map(lambda a: a + zero.astype(a.dtype), g))

    wrapped.defvjp(fwd, bwd)
    return wrapped


def count_evals(fn: Callable, model: Callable, *args) -> EvalCount:
    """Runs `fn(counted_model, *args)` once and returns how many model evaluations
    and model VJPs it made.

    !!! Example

        ```python
        c = count_evals(lambda m, x: jax.grad(lambda x: loss(aj.sample(m, p, x, None,
                                                    **kw)))(x), model, x_T)
        c.forward, c.vjp   # e.g. 20, 20 for DTO() at N = 20
        ```
    """
    count = EvalCount()
    out = fn(counting_model(model, count), *args)
    jtu.tree_map(lambda v: v.block_until_ready() if hasattr(v, "block_until_ready") else v,
                 out)
    jax.effects_barrier()
    return count
