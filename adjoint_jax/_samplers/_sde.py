"""The first-order exponential-integrator discretisation of the reverse diffusion
SDE."""

from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractSDESampler, EpsFn
from ._coeffs import step_coeffs


class SDEDPMSolver1(AbstractSDESampler[PyTree]):
    """SDE-DPM-Solver-1 (Lu et al. 2022b): the first-order exponential integrator of
    the reverse diffusion SDE dx = [f x + (g²/σ) ε_θ] dt + g dw̄, step t → s,
    h = λ_s − λ_t > 0:

        x_s = (α_s/α_t) x_t − 2 σ_s (e^h − 1) ε_θ(x_t, z, t) + σ_s √(e^{2h} − 1) ξ_i,

    with ξ_i ~ N(0, I), the step's noise (`noise[i]` of `aj.sample(..., noise=...)`, or
    drawn from `jax.random.fold_in(key, i)`): the linear part and the noise's variance
    are exact, ε is frozen over the step. Every pass (recomputation, backward state
    reconstruction) replays the same ξ_i. This is diffusers' `sde-dpmsolver` of order
    1; for the DDPM posterior use `aj.DDIM(eta=1.0)`.

    **When to use it:** stochastic sampling (more diverse, more forgiving of model
    error); needs more steps than the ODE samplers (pre-asymptotic below N ≈ 80 on
    VP-linear to t_end = 1e-3). It cannot step to σ = 0 (its noise would not vanish
    there; diffusers refuses this too): end the grid at t_end > 0, or use
    `aj.DDIM(eta=1.0)`, whose last step is the posterior mean. **Cost:** one model
    evaluation per step. **Gradients:** with `DTO` (exact, for this noise, also
    ∂L/∂noise), `RecordedAdjoint` and `AdjointDEIS` (the adjoint of the diffusion
    SDE is an ODE with a factor 2 on the ε-term, Theorem 2 of the AdjointDEIS paper).
    """

    order: ClassVar[int] = 1
    is_sde: ClassVar[bool] = True
    evals_per_step: ClassVar[int] = 1
    steps_to_sigma_zero: ClassVar[bool] = False
    steps_from_alpha_zero: ClassVar[bool] = False
    adjoint_factor: ClassVar[float] = 2.0

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> PyTree:
        del schedule, ts
        return x_T

    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del i
        c = step_coeffs(schedule, t, s)
        return lincomb(
            (c.alpha_ratio, state),
            (-2.0 * c.sigma_phi1, eps(state, t)),
            (self.noise_scale(schedule, t, s), noise),
        )

    def noise_scale(self, schedule, t, s):
        c = step_coeffs(schedule, t, s)
        return c.sigma_s * jnp.sqrt(jnp.expm1(2.0 * c.h))

    # The inverse of the step s → t (h' = λ_t − λ_s > 0):
    #     x_t = (α_t/α_s) x_s − 2σ_t (e^{h'} − 1) ε(x_s, s) + σ_t √(e^{2h'} − 1) ξ_i
    # solved for x_s with ε(x_s, s) replaced by ε(x_t, t), i.e. with h = λ_s − λ_t < 0:
    #     x_s = (α_s/α_t) x_t − 2σ_s (e^h − 1) ε(x_t, t) − σ_s √(1 − e^{2h}) ξ_i
    # (σ_s √(1 − e^{2h}) = (α_s/α_t) σ_t √(e^{2h'} − 1)).
    def invert_step(self, schedule, x, e, t, s, noise):
        c = step_coeffs(schedule, t, s)
        return lincomb(
            (c.alpha_ratio, x),
            (-2.0 * c.sigma_phi1, e),
            (-c.sigma_s * jnp.sqrt(-jnp.expm1(2.0 * c.h)), noise),
        )

    def output(self, state: PyTree) -> PyTree:
        return state


SDEDPMSolver1.__init__.__doc__ = """**Arguments:** None."""
