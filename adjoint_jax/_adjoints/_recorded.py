"""The continuous adjoint along the recorded forward trajectory."""

import equinox as eqx
import jax.tree_util as jtu

from .._samplers._base import AbstractSampler
from ._base import Solve, refuse_non_sde_stochastic, refuse_nonsmooth
from ._continuous import AbstractContinuousAdjoint


class RecordedAdjoint(AbstractContinuousAdjoint):
    """The AdjointDEIS-k backward solver run along the *recorded* forward trajectory:
    the states x_{t_1}, ..., x_{t_N} are cached in the forward pass (not the network's
    activations), so the backward pass has no state-reconstruction drift.

    **Memory:** O(N·|x|) (N states; activations of one model call at a time).
    **Cost:** the forward sampler, then one model VJP per step.
    **Accuracy:** the continuous adjoint discretised at order `order`, evaluated on the
    discrete forward states: converges to the continuous-time gradient at that order
    (for `order=2`, with a second-order sampler such as `aj.DPMSolver2`). Like every
    continuous adjoint it is not the gradient of the discrete sampler, and at small N
    it is much less accurate than `aj.DTO`.

    **When to use it:** the slides' "record the solution trajectory" fix for the
    instability of `AdjointDEIS`' backward reconstruction when N·|x| fits in memory
    but the network's activations for N steps do not. `aj.DTO(checkpoints="steps")`
    has the same memory and gives the exact discrete gradient for one more model
    evaluation per step; prefer it unless you need the continuous adjoint.
    Works with the SDE sampler (the recorded path already holds the noise).
    """

    order: int = eqx.field(default=1, static=True)

    def check_sampler(self, sampler: AbstractSampler) -> None:
        refuse_nonsmooth(self, sampler)
        refuse_non_sde_stochastic(self, sampler)
        del sampler

    def forward_interior(self, solve: Solve, theta, state0, cond, noise):
        return solve.forward(theta, None, cond, noise, record=True, state0=state0)

    def backward_grid(self, solve: Solve):
        return solve.ts[::-1]

    def states(self, solve: Solve, extra, x0):
        del x0
        n = solve.num_steps
        # Backward point j is t_{N−j}, recorded after forward step N − 1 − j.
        return lambda j: jtu.tree_map(lambda v: v[n - 1 - j], extra)


RecordedAdjoint.__init__.__doc__ = """**Arguments:**

- `order`: 1 or 2, the order of the AdjointDEIS solver used backward.
"""
