"""KDPM2 (Katherine Crowson's k-diffusion `sample_dpm_2`): DPM-Solver-2 with its
intermediate point at the log-SNR midpoint, and its ancestral variant."""

from typing import ClassVar

import jax
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractSampler, AbstractSDESampler, EpsFn, predict
from ._coeffs import step_coeffs
from ._ddim import DDIM
from ._dpm_solver import multistep_update


class KDPM2(AbstractSampler[PyTree]):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1 with r₁ = ½) in the noise prediction,
    as k-diffusion's `sample_dpm_2` and diffusers' `KDPM2DiscreteScheduler` run it:
    a DPM-Solver-1 half step to the log-SNR midpoint u (σ_u/α_u = √(σ_t σ_s/(α_t α_s)),
    the geometric mean of the variance-exploding σ), then the full step with the ε
    found there. With h = λ_s − λ_t:

        x_u = (α_u/α_t) x_t − σ_u (e^{h/2} − 1) ε̂(x_t, t),
        x_s = (α_s/α_t) x_t − σ_s (e^h − 1) ε̂(x_u, u).

    A last step to σ = 0 is DPM-Solver-1 alone (the data prediction; no evaluation at
    σ = 0, a `lax.cond`), as in diffusers.

    **When to use it:** a second-order singlestep sampler; like `aj.Heun` it spends
    two evaluations per step. **Order:** 2. **Cost:** 2 evaluations per step (1 on a
    last step to σ = 0). **State:** x only. **Gradients:** `aj.DTO()` (exact) and the
    continuous adjoints (the probability-flow ODE's adjoint).
    """

    order: ClassVar[int] = 2
    is_sde: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 2
    steps_to_sigma_zero: ClassVar[bool] = True
    steps_from_alpha_zero: ClassVar[bool] = False

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> PyTree:
        del schedule, ts
        return x_T

    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del i, noise
        c = step_coeffs(schedule, t, s)
        e_t, _ = predict(eps, schedule, state, t, derive=False)

        def midpoint():
            # ε̂ at the midpoint in λ (h is 0 at σ_s = 0, where this branch is unused).
            u = schedule.t_of_lam(c.lam_t + 0.5 * c.h)
            x_u = multistep_update(schedule, state, e_t, None, t, u, None, True)
            return lincomb((c.alpha_ratio, state), (-c.sigma_phi1, eps(x_u, u)))

        to_data = lambda: multistep_update(schedule, state, e_t, None, t, s, None, True)
        return jax.lax.cond(c.sigma_zero_end, to_data, midpoint)

    def output(self, state: PyTree) -> PyTree:
        return state


KDPM2.__init__.__doc__ = """**Arguments:** None."""


class KDPM2Ancestral(AbstractSDESampler[PyTree]):
    """The ancestral KDPM2 (k-diffusion's `sample_dpm_2_ancestral`, diffusers'
    `KDPM2AncestralDiscreteScheduler`): a KDPM2 step to the ancestral σ_down, then
    fresh noise σ_up (in variance-exploding σ: σ_down = σ_s²/σ_t,
    σ_up = σ_s √(1 − σ_s²/σ_t²)). The log-SNR midpoint of σ_t and σ_down is s itself,
    so with x̃_s = DPM-Solver-1(x_t, t → s):

        x_s = (α_s/α_t) x_t + B ε̂(x̃_s, s) + C ξ,

    `aj.DDIM(eta=1)`'s step with ε̂ taken at (x̃_s, s) (B, C its coefficients; ξ the
    step's standard normal). A last step to σ = 0 is the data prediction (no noise,
    no second evaluation), as in diffusers.

    As the steps shrink, ε̂(x̃_s, s) → ε̂(x_t, t): it converges to DDIM(η = 1)'s reverse
    SDE, whose continuous adjoint has the ε-terms doubled (`adjoint_factor` 2); the
    continuous adjoint re-solves states with DDIM's approximate inverse step.

    **Order:** 1 (strong order ½ in the noise). **Cost:** 2 evaluations per step (1
    on a last step to σ = 0). **State:** x only. **Gradients:** `aj.DTO()` (exact,
    also ∂L/∂noise), `aj.RecordedAdjoint`, `aj.AdjointDEIS` (the SDE's continuous
    adjoint). Needs `aj.sample(..., key=...)` or `noise=...` (step i uses noise i:
    diffusers draws one normal per step, on its second evaluation).
    """

    order: ClassVar[int] = 1
    is_sde: ClassVar[bool] = True
    evals_per_step: ClassVar[int] = 2
    steps_to_sigma_zero: ClassVar[bool] = True
    steps_from_alpha_zero: ClassVar[bool] = False
    adjoint_factor: ClassVar[float] = 2.0

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> PyTree:
        del schedule, ts
        return x_T

    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del i
        c = step_coeffs(schedule, t, s)
        e_t, _ = predict(eps, schedule, state, t, derive=False)
        x_pred = multistep_update(schedule, state, e_t, None, t, s, None, True)

        def ancestral():
            e_s = eps(x_pred, s)
            return DDIM(eta=1.0).step(
                lambda x, tt: e_s, schedule, state, t, s, 0, noise
            )

        return jax.lax.cond(c.sigma_zero_end, lambda: x_pred, ancestral)

    def invert_step(self, schedule, x, e, t, s, noise):
        return DDIM(eta=1.0).invert_step(schedule, x, e, t, s, noise)

    def noise_scale(self, schedule, t, s):
        return DDIM(eta=1.0).noise_scale(schedule, t, s)

    def output(self, state: PyTree) -> PyTree:
        return state


KDPM2Ancestral.__init__.__doc__ = """**Arguments:** None."""
