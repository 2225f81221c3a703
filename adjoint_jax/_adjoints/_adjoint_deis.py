"""AdjointDEIS: the continuous adjoint with states re-solved backward, O(1) memory."""

import equinox as eqx
import jax.numpy as jnp

from .._samplers._base import AbstractSampler
from ._base import Solve, refuse_non_sde_stochastic, refuse_nonsmooth
from ._continuous import AbstractContinuousAdjoint


class AdjointDEIS(AbstractContinuousAdjoint):
    """AdjointDEIS-k (Blasingame & Liu, NeurIPS 2024): the continuous adjoint equations
    of the probability-flow ODE (or, with `aj.SDEDPMSolver1`, of the diffusion SDE,
    which by Theorem 2 is an ODE with the ε-terms doubled) solved backward by bespoke
    exponential integrators in the log-SNR λ, with the states x_t re-solved backward
    alongside the adjoint. `order=2` is the multistep AdjointDEIS-2.

    **Memory:** O(1) in the number of steps: the forward pass keeps only x_0.
    **Cost:** the forward sampler, then one model VJP per backward step (which also
    gives the ε that re-solves the state): about 3 model evaluations per step in all.

    **Accuracy:** this is *not* the gradient of the discrete sampler. It converges to
    the continuous-time gradient at order k in the step size, but only asymptotically:
    on VP-linear to t_end = 1e-3 with exact ε it is far from asymptotic at the step
    counts people run (AdjointDEIS-1 at N = 20 can be ~100% off where `DTO` through
    the same sampler is ~10% off; first order shows from N ≈ 80), and AdjointDEIS-2
    and the SDE variant can blow up at N = 10. The backward state reconstruction
    (x_t re-solved by a backward DDIM step, eq. 24 of the slides) does not retrace
    the forward trajectory exactly and drifts. For the SDE it replays each step's
    noise, but the drift of the inverted step is evaluated at the wrong end of the
    step (ε(x_t) for ε(x_s), an O(√h) mismatch on a Brownian path) and the backward
    SDE flow amplifies it: on a random-weight MLP the gradient w.r.t. θ stays 68%,
    82%, 38%, 32% away from `DTO`'s at N = 20, 80, 320, 640, where
    `aj.RecordedAdjoint` (the same solver on the recorded path) gives 50%, 17%, 3.2%,
    1.7%. (The AdjointDEIS reference code itself caches the trajectory for this
    reason.) On Gaussian data, where ∂ε/∂x does not depend on x, the drift is
    harmless and the SDE adjoint converges at first order.

    **When to use it:** when memory is the binding constraint and approximate
    gradients are acceptable (guided generation with many steps). Prefer `aj.DTO`
    (exact) and, when memory runs out, `aj.DTO(checkpoints=k)` or a reversible sampler
    with `aj.ReversibleAdjoint` (exact, O(1) memory); `aj.RecordedAdjoint` removes the
    reconstruction drift for O(N) states.

    `num_steps=M` runs the backward pass on its own log-SNR-uniform grid of M steps
    (the forward keeps its N). A scheduled conditioning value z_i is used on the
    backward steps whose λ-midpoint falls in forward step i, and its gradient sums
    them. Not available with SDE samplers (the noise is tied to the forward steps).
    Use it on grids that are uniform in time rather than in log-SNR (diffusers'
    flow-matching and `"linspace"` grids): their last steps stay O(1) in λ until
    N ≫ `num_train_timesteps`, so a backward pass on the forward grid stalls (on
    flow matching with shift 3, ≈ 0.2 relative to DTO from N = 24 to 384), while
    `num_steps=M` converges at the adjoint's order (`tests/test_samplers.py`).

    ??? cite "References"

        ```bibtex
        @inproceedings{blasingame2024adjointdeis,
            title={AdjointDEIS: Efficient Gradients for Diffusion Models},
            author={Blasingame, Zander W. and Liu, Chen},
            booktitle={NeurIPS},
            year={2024}
        }
        ```
    """

    order: int = eqx.field(default=1, static=True)
    num_steps: int | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        m = self.num_steps
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(
                f"`AdjointDEIS(num_steps=...)` must be None or an int >= 1; got {m!r}."
            )

    def check_sampler(self, sampler: AbstractSampler) -> None:
        refuse_nonsmooth(self, sampler)
        refuse_non_sde_stochastic(self, sampler)
        if sampler.is_sde and self.num_steps is not None:
            raise ValueError(
                f"`adjoint={self!r}` with `sampler={sampler!r}`: a separate backward "
                "grid (num_steps) cannot replay the SDE's per-step noise; use "
                f"`adjoint=aj.AdjointDEIS(order={self.order})` (the forward grid)."
            )

    def forward_interior(self, solve: Solve, theta, state0, cond, noise):
        state, _ = solve.forward(theta, None, cond, noise, state0=state0)
        return state, None

    def backward_grid(self, solve: Solve):
        if self.num_steps is None:
            return solve.ts[::-1]
        lam = solve.schedule.lam
        lams = jnp.linspace(lam(solve.ts[-1]), lam(solve.ts[0]), self.num_steps + 1)
        taus = solve.schedule.t_of_lam(lams)
        return taus.at[0].set(solve.ts[-1]).at[-1].set(solve.ts[0])

    def states(self, solve, extra, x0):
        del solve, extra, x0
        return None


AdjointDEIS.__init__.__doc__ = """**Arguments:**

- `order`: 1 (AdjointDEIS-1) or 2 (AdjointDEIS-2, multistep; first backward step
    first order).
- `num_steps`: `None` to run the backward pass on the forward grid, or M ≥ 1 for a
    log-SNR-uniform backward grid of M steps.
"""
