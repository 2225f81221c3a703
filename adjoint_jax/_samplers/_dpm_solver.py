"""DPM-Solver-1 (DDIM) and the second-order multistep DPM-Solver-2."""

from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractMultistepSampler, EpsFn
from ._coeffs import step_coeffs


def multistep_update(schedule, x, e, e_prev, t, s, r, first):
    """DPM-Solver's exponential multistep update t → s (either direction), the one
    formula behind `DPMSolver1`, `DPMSolver2`, `McCallumFoster`'s base steps and the
    continuous adjoint's state re-solve. With h = λ_s − λ_t and D = (e − e_prev)/r
    (≈ h ∂ε/∂λ, from the earlier ε at λ_t − r·h):

        x_s = (α_s/α_t) x − σ_s (e^h − 1) e − σ_s φ₂ D,   φ₂ = (e^h − 1 − h)/h

    (∫_{λ_t}^{λ_s} e^{−λ}(λ − λ_t) dλ = e^{−λ_s} h φ₂). Without `e_prev`, or where
    `first` is true, it is DPM-Solver-1: x_s = (α_s/α_t) x − σ_s (e^h − 1) e.
    """
    c = step_coeffs(schedule, t, s)
    if e_prev is None:
        return lincomb((c.alpha_ratio, x), (-c.sigma_s * c.phi1, e))
    c2 = jnp.where(first, jnp.zeros_like(c.h), c.sigma_s * c.phi2 / r)
    return lincomb((c.alpha_ratio, x), (-c.sigma_s * c.phi1 - c2, e), (c2, e_prev))


class DPMSolver1(AbstractMultistepSampler[PyTree]):
    """DPM-Solver-1, the first-order exponential integrator of the probability-flow
    ODE in the log-SNR λ; identical to DDIM (η = 0). `aj.DDIM` is an alias.

    Step t → s with h = λ_s − λ_t > 0:

        x_s = (α_s/α_t) x_t − σ_s (e^h − 1) ε_θ(x_t, z, t).

    The linear part is integrated exactly; only ε is frozen over the step, so the
    scheme is first order in h and stable for any step size on the linear part.

    **When to use it:** the default deterministic sampler; with 20–50 log-SNR steps it
    is the standard DDIM. **Cost:** one model evaluation per step. **State:** x only.
    """

    order: ClassVar[int] = 1
    is_sde: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 1
    memory: ClassVar[int] = 0

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> PyTree:
        del schedule, ts
        return x_T

    def step(self, eps: EpsFn, schedule, state, t, s, i, key):
        del i, key
        return self.update(schedule, state, eps(state, t), None, t, s, None, True)

    def update(self, schedule, x, e, e_prev, t, s, r, first):
        del e_prev, r, first
        return multistep_update(schedule, x, e, None, t, s, None, True)

    def output(self, state: PyTree) -> PyTree:
        return state


DPMSolver1.__init__.__doc__ = """**Arguments:** None."""

DDIM = DPMSolver1


class DPMSolver2(AbstractMultistepSampler[tuple]):
    """DPM-Solver-2 in its multistep form (Lu et al. 2022, "DPM-Solver-2M" with the
    Taylor coefficient): second order with one model evaluation per step.

    Step t_i → t_{i+1}, h = λ_{i+1} − λ_i, r = (λ_i − λ_{i−1})/h,
    D = (ε_i − ε_{i−1})/r ≈ h ∂ε/∂λ:

        x_{i+1} = (α_{i+1}/α_i) x_i − σ_{i+1} (e^h − 1) ε_i − σ_{i+1} (e^h − 1 − h) D/h.

    The first step has no previous ε and is DPM-Solver-1.

    **When to use it:** the best deterministic sampler here at 10–50 steps.
    **Cost:** one model evaluation per step. **State:** x, the previous ε and its λ.
    """

    order: ClassVar[int] = 2
    is_sde: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 1
    memory: ClassVar[int] = 1

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array):
        # The previous-ε slot is a placeholder the first step multiplies by zero; its
        # λ is offset by 1 so that r stays finite (no NaN in the zero branch's VJP).
        eps_prev = lincomb((jnp.zeros((), ts.dtype), x_T))
        return (x_T, eps_prev, schedule.lam(ts[0]) - 1.0)

    def step(self, eps: EpsFn, schedule, state, t, s, i, key):
        del key
        x, eps_prev, lam_prev = state
        lam_t, lam_s = schedule.lam(t), schedule.lam(s)
        e = eps(x, t)
        r = (lam_t - lam_prev) / (lam_s - lam_t)
        return (self.update(schedule, x, e, eps_prev, t, s, r, i == 0), e, lam_t)

    def update(self, schedule, x, e, e_prev, t, s, r, first):
        return multistep_update(schedule, x, e, e_prev, t, s, r, first)

    def output(self, state) -> PyTree:
        return state[0]


DPMSolver2.__init__.__doc__ = """**Arguments:** None."""
