"""The first-order exponential-integrator discretisation of the reverse diffusion
SDE."""

from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._misc import lincomb, step_noise
from .._schedule import AbstractSchedule
from ._base import AbstractSDESampler, EpsFn
from ._coeffs import step_coeffs


class SDEDPMSolver1(AbstractSDESampler[PyTree]):
    """SDE-DPM-Solver-1 (Lu et al. 2022b): the first-order exponential integrator of
    the reverse diffusion SDE dx = [f x + (g²/σ) ε_θ] dt + g dw̄, step t → s,
    h = λ_s − λ_t > 0:

        x_s = (α_s/α_t) x_t − 2 σ_s (e^h − 1) ε_θ(x_t, z, t) + σ_s √(e^{2h} − 1) ξ_i,

    with ξ_i ~ N(0, I) drawn from `jax.random.fold_in(key, i)`: the linear part and
    the noise's variance are exact, ε is frozen over the step. Every pass
    (recomputation, backward state reconstruction) replays the same ξ_i.

    **When to use it:** stochastic sampling (more diverse, more forgiving of model
    error); needs more steps than the ODE samplers (pre-asymptotic below N ≈ 80 on
    VP-linear to t_end = 1e-3). **Cost:** one model evaluation per step.
    **Gradients:** with `DTO` (exact, for this noise), `RecordedAdjoint` and
    `AdjointDEIS` (the adjoint of the diffusion SDE is an ODE with a factor 2 on the
    ε-term, Theorem 2 of the AdjointDEIS paper).
    """

    order: ClassVar[int] = 1
    evals_per_step: ClassVar[int] = 1

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> PyTree:
        del schedule, ts
        return x_T

    def step(self, eps: EpsFn, schedule, state, t, s, i, key):
        c = step_coeffs(schedule, t, s)
        noise = step_noise(key, i, state, t.dtype)
        return lincomb(
            (c.alpha_ratio, state),
            (-2.0 * c.sigma_s * c.phi1, eps(state, t)),
            (c.sigma_s * jnp.sqrt(jnp.expm1(2.0 * c.h)), noise),
        )

    # The inverse of the step s → t (h' = λ_t − λ_s > 0):
    #     x_t = (α_t/α_s) x_s − 2σ_t (e^{h'} − 1) ε(x_s, s) + σ_t √(e^{2h'} − 1) ξ_i
    # solved for x_s with ε(x_s, s) replaced by ε(x_t, t), i.e. with h = λ_s − λ_t < 0:
    #     x_s = (α_s/α_t) x_t − 2σ_s (e^h − 1) ε(x_t, t) − σ_s √(1 − e^{2h}) ξ_i
    # (σ_s √(1 − e^{2h}) = (α_s/α_t) σ_t √(e^{2h'} − 1)).
    def invert_step(self, schedule, x, e, t, s, i, key):
        c = step_coeffs(schedule, t, s)
        noise = step_noise(key, i, x, t.dtype)
        return lincomb(
            (c.alpha_ratio, x),
            (-2.0 * c.sigma_s * c.phi1, e),
            (-c.sigma_s * jnp.sqrt(-jnp.expm1(2.0 * c.h)), noise),
        )

    def output(self, state: PyTree) -> PyTree:
        return state


SDEDPMSolver1.__init__.__doc__ = """**Arguments:** None."""
