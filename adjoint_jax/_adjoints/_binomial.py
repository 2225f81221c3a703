"""Binomial ("treeverse"/revolve) checkpointing of a fixed-length loop, for
`aj.DTO(checkpoints=k)`.

The loop is state_{i+1} = body(args, state_i, i), i = 0 … n − 1, with n static. The
primal keeps nothing; the backward pass reverses the steps with at most k stored
states (one of them state_0), recomputing the others forward from the nearest
stored one. Because n is known at trace time, the whole recomputation schedule is
computed in Python (`schedule`) and executed by one `lax.scan` over its actions, so
the program is small and every buffer is made from the state itself: the stored
states keep the state's sharding (explicit mesh axes) and its varying manual axes
(`shard_map`, `pmap`), which a buffer made by `jnp.zeros` would not
(`equinox.internal.while_loop(kind="checkpointed")`, which this replaces, fails
there).

Schedule (Griewank's binomial rule). With s stored-state slots (the one holding the
segment's first state included) the fewest forward steps that reverse t steps are
F(t, s) = r·t − β(s + 1, r − 1), β(s, r) = C(s + r, s), r the smallest with
β(s, r) ≥ t (F(t, 1) = t(t − 1)/2: every step recomputed from the start). A segment
of t steps advances m steps, stores that state in a free slot, reverses the right
part (t − m steps, s − 1 slots) and then the left part (m steps, s slots, the right
part's slots free again); m minimises m + F(t − m, s − 1) + F(m, s), so the schedule
costs exactly F(n, k) recomputed steps (`tests/test_binomial.py` checks it).
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._misc import index_tree


_STORE, _REVERSE = 0, 1


def _beta(s: int, r: int) -> int:
    return math.comb(s + r, s)


def optimal_cost(t: int, s: int) -> int:
    """F(t, s): the fewest forward steps that reverse t steps with s slots."""
    if t <= 1:
        return 0
    if s <= 1:
        return t * (t - 1) // 2
    r = 0
    while _beta(s, r) < t:
        r += 1
    return r * t - _beta(s + 1, r - 1)


def schedule(n: int, k: int) -> np.ndarray:
    """The backward pass's actions for n steps and k slots, an int array of rows
    (op, slot, start, stop, store_slot): restore the state `start` from `slot`,
    advance it to step `stop`, then store it in `store_slot` (op STORE) or reverse
    step `stop` with it (op REVERSE). Slot 0 holds state_0."""
    actions = []

    def segment(lo: int, hi: int, slot: int, free: tuple[int, ...]) -> None:
        t = hi - lo
        if t == 1:
            actions.append((_REVERSE, slot, lo, lo, -1))
            return
        if not free:
            actions.extend((_REVERSE, slot, lo, i, -1)
                           for i in range(hi - 1, lo - 1, -1))
            return
        s = len(free) + 1
        m = lo + min(range(1, t), key=lambda m: (
            m + optimal_cost(t - m, s - 1) + optimal_cost(m, s), m))
        actions.append((_STORE, slot, lo, m, free[0]))
        segment(m, hi, free[0], free[1:])
        segment(lo, m, slot, free)

    segment(0, n, 0, tuple(range(1, k)))
    return np.asarray(actions, np.int32).reshape(-1, 5)


def checkpointed_loop(body, args, state0, n: int, k: int):
    """The final state of n steps of `body(args, state, i)` (`i` an int32 scalar),
    differentiable in `args` and `state0` by binomial checkpointing with k ≥ 1 stored
    states. `body` must not close over traced values (pass them in `args`)."""
    return _loop((args, state0), body, n, k)


def _advance(body, args, state, start, stop):
    return jax.lax.fori_loop(start, stop, lambda i, s: body(args, s, i), state)


def _all_steps(inputs, body, n):
    args, state0 = inputs
    return _advance(body, args, state0, jnp.int32(0), jnp.int32(n))


@eqx.filter_custom_vjp
def _loop(inputs, body, n, k):
    return _all_steps(inputs, body, n)


@_loop.def_fwd
def _loop_fwd(perturbed, inputs, body, n, k):
    # Nothing kept: the backward pass restarts from the inputs.
    del perturbed
    return _all_steps(inputs, body, n), None


def _zeros_or_none(tree):
    return jtu.tree_map(
        lambda v: jnp.zeros_like(v) if eqx.is_inexact_array(v) else None, tree
    )


def _add(a, b):
    return jtu.tree_map(lambda u, v: u if v is None else u + v, a, b,
                        is_leaf=lambda v: v is None)


@_loop.def_bwd
def _loop_bwd(residuals, ct_out, perturbed, inputs, body, n, k):
    del residuals
    args, state0 = inputs
    args_d, args_rest = eqx.partition(args, perturbed[0])
    # The stored states: slot 0 is state_0; the others are overwritten before use.
    buf = jtu.tree_map(lambda v: jnp.broadcast_to(v[None], (k,) + v.shape), state0)
    ct_state = jtu.tree_map(
        lambda v, c: (jnp.zeros_like(v) if c is None else c) if eqx.is_inexact_array(v)
        else None, state0, ct_out, is_leaf=lambda c: c is None,
    )
    ct_args = _zeros_or_none(args_d)

    def reverse(i, state, ct_state, ct_args):
        def step(a_d, s):
            return body(eqx.combine(a_d, args_rest), s, i)

        _, vjp = eqx.filter_vjp(step, args_d, state)
        g_args, g_state = vjp(ct_state)
        return _keep_none(g_state, ct_state), _add(ct_args, g_args)

    def action(carry, row):
        buf, ct_state, ct_args = carry
        op, slot, start, stop, store = row[0], row[1], row[2], row[3], row[4]
        state = _advance(body, args, index_tree(buf, slot), start, stop)
        buf = jax.lax.cond(
            op == _STORE,
            lambda b: jtu.tree_map(lambda v, x: v.at[store].set(x), b, state),
            lambda b: b, buf,
        )
        ct_state, ct_args = jax.lax.cond(
            op == _REVERSE,
            lambda c: reverse(stop, state, *c),
            lambda c: c, (ct_state, ct_args),
        )
        return (buf, ct_state, ct_args), None

    actions = jnp.asarray(schedule(n, k))
    (_, ct_state, ct_args), _ = jax.lax.scan(action, (buf, ct_state, ct_args), actions)
    return ct_args, ct_state


def _keep_none(g, like):
    """`g` with None wherever `like` has None (non-differentiable state leaves)."""
    return jtu.tree_map(lambda c, gg: None if c is None else gg, like, g,
                        is_leaf=lambda c: c is None)
