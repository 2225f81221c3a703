"""DPM-Solver-1 (DDIM η = 0) and the second-order multistep DPM-Solver-2, in the
noise prediction."""

from typing import ClassVar

import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractMultistepSampler, EpsFn, predict
from ._coeffs import step_coeffs


def multistep_update(schedule, x, e, e_prev, t, s, r, first, x0=None):
    """DPM-Solver's exponential multistep update t → s (either direction), the one
    formula behind `DPMSolver1`, `DPMSolver2`, `McCallumFoster`'s base steps and the
    continuous adjoint's state re-solve. With h = λ_s − λ_t and D = (e − e_prev)/r
    (≈ h ∂ε/∂λ, from the earlier ε at λ_t − r·h):

        x_s = (α_s/α_t) x − σ_s (e^h − 1) e − σ_s φ₂ D,   φ₂ = (e^h − 1 − h)/h

    (∫_{λ_t}^{λ_s} e^{−λ}(λ − λ_t) dλ = e^{−λ_s} h φ₂). Without `e_prev`, where
    `first` is true, or on a step to σ = 0, it is DPM-Solver-1:
    x_s = (α_s/α_t) x − σ_s (e^h − 1) e, which at σ_s = 0 is α_s x̂_0. From α_t = 0
    it is α_s x̂_0 + σ_s ε̂ with the data prediction `x0` (required there).
    """
    c = step_coeffs(schedule, t, s)
    if e_prev is None:
        eps_form = lincomb((c.alpha_ratio, x), (-c.sigma_phi1, e))
    else:
        plain = jnp.asarray(first) | c.sigma_zero_end
        r_safe = jnp.where(plain, jnp.ones_like(c.h), r)
        c2 = jnp.where(plain, jnp.zeros_like(c.h), c.sigma_phi2 / r_safe)
        eps_form = lincomb(
            (c.alpha_ratio, x), (-c.sigma_phi1 - c2, e), (c2, e_prev)
        )
    if x0 is None:
        return eps_form
    data_form = lincomb((c.alpha_s, x0), (c.sigma_s, e))
    return _where(c.alpha_zero_start, data_form, eps_form)


def _where(pred, a: PyTree, b: PyTree) -> PyTree:
    return jtu.tree_map(lambda u, v: jnp.where(pred, u, v), a, b)


class DPMSolver1(AbstractMultistepSampler[PyTree]):
    """DPM-Solver-1, the first-order exponential integrator of the probability-flow
    ODE in the log-SNR λ; identical to DDIM with η = 0 (`aj.DDIM()`).

    Step t → s with h = λ_s − λ_t > 0:

        x_s = (α_s/α_t) x_t − σ_s (e^h − 1) ε_θ(x_t, z, t)  (= α_s x̂_0 + σ_s ε̂).

    The linear part is integrated exactly; only ε is frozen over the step, so the
    scheme is first order in h and stable for any step size on the linear part. A
    last step to σ = 0 gives the data prediction α_s x̂_0; a first step from α = 0
    (t = 1 of a flow model) uses the model's data prediction, and on
    `aj.FlowMatching()` every step is the Euler step of the velocity (diffusers'
    `FlowMatchEulerDiscreteScheduler`).

    **When to use it:** the default deterministic sampler; with 20–50 log-SNR steps it
    is the standard DDIM. **Cost:** one model evaluation per step. **State:** x only.
    """

    order: ClassVar[int] = 1
    is_sde: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 1
    steps_to_sigma_zero: ClassVar[bool] = True
    steps_from_alpha_zero: ClassVar[bool] = True
    memory: ClassVar[int] = 0

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> PyTree:
        del schedule, ts
        return x_T

    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del i, noise
        e, x0 = predict(eps, schedule, state, t, derive=False)
        return self.update(schedule, state, e, None, t, s, None, True, x0)

    def update(self, schedule, x, e, e_prev, t, s, r, first, x0=None):
        del e_prev, r, first
        return multistep_update(schedule, x, e, None, t, s, None, True, x0)

    def output(self, state: PyTree) -> PyTree:
        return state


DPMSolver1.__init__.__doc__ = """**Arguments:** None."""


class DPMSolver2(AbstractMultistepSampler[tuple]):
    """DPM-Solver-2 in its multistep form (Lu et al. 2022, "DPM-Solver-2M" with the
    Taylor coefficient), in the noise prediction: second order with one model
    evaluation per step.

    Step t_i → t_{i+1}, h = λ_{i+1} − λ_i, r = (λ_i − λ_{i−1})/h,
    D = (ε_i − ε_{i−1})/r ≈ h ∂ε/∂λ:

        x_{i+1} = (α_{i+1}/α_i) x_i − σ_{i+1} (e^h − 1) ε_i − σ_{i+1} (e^h − 1 − h) D/h.

    The first step has no previous ε and is DPM-Solver-1, and so is a last step to
    σ = 0 (the data prediction). For diffusers' default multistep scheduler (data
    prediction, "midpoint" coefficient) use `aj.DPMSolverPP()`.

    **When to use it:** a good deterministic sampler at 10–50 steps.
    **Cost:** one model evaluation per step. **State:** x, the previous ε and its λ.
    """

    order: ClassVar[int] = 2
    is_sde: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 1
    steps_to_sigma_zero: ClassVar[bool] = True
    steps_from_alpha_zero: ClassVar[bool] = True
    memory: ClassVar[int] = 1

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array):
        # The previous-ε slot is a placeholder the first step multiplies by zero; its
        # λ is offset by 1 so that r stays finite (no NaN in the zero branch's VJP).
        eps_prev = lincomb((jnp.zeros((), ts.dtype), x_T))
        return (x_T, eps_prev, schedule.lam(ts[0]) - 1.0)

    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del noise
        x, eps_prev, lam_prev = state
        c = step_coeffs(schedule, t, s)
        e, x0 = predict(eps, schedule, x, t, derive=False)
        # h is 0 at an endpoint (the step is then first order and r unused). After a
        # first step from α = 0 the previous λ is −∞: r = ∞ and the correction
        # vanishes (the earlier ε carries no slope information), as in diffusers.
        h = jnp.where(c.h == 0, jnp.ones_like(c.h), c.h)
        # (The double-where: −∞ replaced before the division; see `slopes`.)
        finite = jnp.isfinite(lam_prev)
        lam_prev = jnp.where(finite, lam_prev, c.lam_t - h)
        r = jnp.where(finite, (c.lam_t - lam_prev) / h, jnp.full_like(h, jnp.inf))
        first = (i == 0) | c.alpha_zero_start
        x_next = self.update(schedule, x, e, eps_prev, t, s, r, first, x0)
        return (x_next, e, c.lam_t)

    def update(self, schedule, x, e, e_prev, t, s, r, first, x0=None):
        return multistep_update(schedule, x, e, e_prev, t, s, r, first, x0)

    def output(self, state) -> PyTree:
        return state[0]


DPMSolver2.__init__.__doc__ = """**Arguments:** None."""
