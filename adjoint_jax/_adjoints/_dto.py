"""Discretise-then-optimise: plain reverse-mode autodiff through the sampler."""

import functools

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp

from .._misc import index_tree
from .._samplers._base import AbstractSampler
from ._base import FORWARD_MODE_HINT, AbstractAdjoint, Solve
from ._binomial import checkpointed_loop


class DTO(AbstractAdjoint):
    """Discretise-then-optimise: the exact gradient of the discrete sampler, by
    reverse-mode autodiff through the sampling loop.

    **When to use it:** first. It is the only strategy whose gradient is exact for
    every sampler (the SDE sampler included, for the replayed noise), and it is the
    fastest. Switch to checkpointing when memory runs out, and to a reversible sampler
    with `aj.ReversibleAdjoint` (also exact) or to a continuous adjoint only when even
    that is too much.

    **Memory and time** in the number of steps N, for a model whose VJP stores
    activations of size A per evaluation and a sampler state of size S:

    | `checkpoints` | stored | recomputation |
    | --- | --- | --- |
    | `None` | every activation: O(N·A) | none |
    | `"steps"` | the sampler state at every step: O(N·S) + one step's A | one forward step per step |
    | `k` (int) | k states (binomial "treeverse" checkpointing): O(k·S) + A | O(N log N) steps |

    `checkpoints=k` is what diffrax's `RecursiveCheckpointAdjoint` does for general
    ODEs. Here N is known when tracing, so the recomputation schedule is Griewank's
    optimal one, computed once in Python (`_binomial.py`): exactly
    F(N, k) = r·N − C(k + r, k + 1) recomputed steps (r the smallest with
    C(k + r, k) ≥ N), and the stored states keep the state's sharding under
    `jax.sharding`, `shard_map` and `pmap`.

    **Accuracy:** exact (round-off only) for the discrete sampler; relative to the
    continuous-time gradient its error is that of the sampler, O(h^order).
    """

    checkpoints: None | str | int = eqx.field(default=None, static=True)

    def __check_init__(self):
        c = self.checkpoints
        if c is None or c == "steps":
            return
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(
                "`DTO(checkpoints=...)` must be None, 'steps' or a positive int; got "
                f"{c!r}."
            )

    def check_sampler(self, sampler: AbstractSampler) -> None:
        del sampler  # every sampler can be differentiated through

    def forward_mode_error(self) -> str | None:
        if self.checkpoints is None or self.checkpoints == "steps":
            return None  # plain autodiff (with `jax.checkpoint`): jvp works
        return (
            f"`adjoint={self!r}` uses binomial checkpointing, whose custom reverse "
            "pass has no forward-mode (jvp) rule and cannot itself be differentiated "
            "(no grad-of-grad)." + FORWARD_MODE_HINT
        )

    def loop(self, solve: Solve, theta, x_T, cond, noise):
        if isinstance(self.checkpoints, int):
            # The model's closed-over arrays become inputs of the custom VJP.
            solve, theta = solve.closure_converted(theta, x_T, cond)
        x0 = solve.sampler.output(self.run(solve, theta, x_T, cond, noise))
        return refuse_second_order(self.forward_mode_error(), x0)

    def run(self, solve: Solve, theta, x_T, cond, noise, state0=None, step=None):
        """The final sampler state of `solve`, differentiable by JAX's autodiff with
        this strategy's checkpointing, starting from the sampler state `state0`
        (default `sampler.init(x_T, ...)`); `step` replaces `solve.step` (same
        signature; `aj.Truncated` gates the steps with it)."""
        if self.checkpoints is None or self.checkpoints == "steps":
            state, _ = solve.forward(
                theta, x_T, cond, noise, remat=self.checkpoints == "steps",
                state0=state0, step=step,
            )
            return state
        # Binomial checkpointing (`_binomial.py`): a custom VJP, so every array the
        # steps read must be an argument (`loop` closure-converts the model; `step`
        # is `solve.step` or an `eqx.Module`, never a closure over traced values).
        step = solve.step if step is None else step
        if state0 is None:
            state0 = solve.sampler.init(x_T, solve.schedule, ts=solve.ts)
        args = (step, solve, theta, cond, noise)
        return checkpointed_loop(_body, args, state0, solve.num_steps,
                                 min(self.checkpoints, solve.num_steps))


def _body(args, state, i):
    """Step i of the sampler (`step` is `solve.step` or a strategy's gated step)."""
    step, solve, theta, cond, noise = args
    z = solve.cond_at(cond, i) if solve.scheduled else None
    xi = None if noise is None else index_tree(noise, i)
    index = jnp.array(solve.first_index, jnp.int32) + i
    xs = (solve.ts[i], solve.ts[i + 1], index, z, xi)
    return step(theta, cond, state, xs)


# Identity whose backward pass refuses to be differentiated: binomial checkpointing's
# reverse pass cannot be differentiated again (grad-of-grad, jvp-of-grad), and JAX's
# own error for that ("Reverse-mode differentiation does not work for lax.while_loop
# ...") names neither the strategy nor the fix.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _no_second_order(msg, x):
    return x


def _no_second_order_fwd(msg, x):
    return x, None


def _no_second_order_bwd(msg, _, ct):
    return (eqxi.nondifferentiable(ct, msg=msg),)


_no_second_order.defvjp(_no_second_order_fwd, _no_second_order_bwd)


def refuse_second_order(msg: str | None, x0):
    """x0, whose backward pass refuses differentiation with `msg` (a strategy's
    `forward_mode_error()`); x0 itself when `msg` is None."""
    return x0 if msg is None else _no_second_order(msg, x0)


DTO.__init__.__doc__ = """**Arguments:**

- `checkpoints`: `None` (store everything; fastest), `"steps"` (store the state at
    each step, recompute inside it) or an int k ≥ 1 (binomial checkpointing with k
    stored states).
"""
