"""Counting model evaluations and model VJPs, exactly, by running a computation once
with an instrumented model."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.tree_util as jtu


class EvalCount:
    """Counts of one run: `forward` model evaluations (every primal call, including
    those made inside a backward pass to rebuild activations) and `vjp` model
    vector-Jacobian products. A call under `jax.vmap` is one batched evaluation and
    counts once (the network runs once, on the stacked inputs)."""

    def __init__(self):
        self.forward = 0
        self.vjp = 0

    def __repr__(self):
        return f"EvalCount(forward={self.forward}, vjp={self.vjp})"


def _batched_once(tick: Callable) -> Callable:
    """`tick(t)` as a debug callback that runs once per call, also under `jax.vmap`
    (whose default rule for a callback would run it once per batch element): a
    vmapped model call is one batched evaluation."""

    @jax.custom_batching.custom_vmap
    def once(t):
        jax.debug.callback(tick, t)
        return t

    @once.def_vmap
    def _(axis_size, in_batched, t):
        del axis_size
        jax.debug.callback(tick, jnp.reshape(t, (-1,))[0])
        return t, in_batched[0]

    return once


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

    def _fwd_tick(_):
        count.forward += 1

    def _vjp_tick(_):
        count.vjp += 1

    fwd_tick, vjp_tick = _batched_once(_fwd_tick), _batched_once(_vjp_tick)

    @jax.custom_vjp
    def wrapped(params, x, t, cond):
        fwd_tick(t)
        return model(params, x, t, cond)

    def fwd(params, x, t, cond):
        fwd_tick(t)
        out, vjp = jax.vjp(model, params, x, t, cond)
        return out, (vjp, t)

    def bwd(res, g):
        vjp, t = res
        vjp_tick(t)
        return vjp(g)

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
