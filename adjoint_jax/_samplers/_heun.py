"""Heun's method (the explicit trapezoidal rule) on the probability-flow ODE, in
Karras et al.'s variance-exploding coordinates or in the schedule's own time."""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractSampler, EpsFn, predict
from ._coeffs import step_coeffs
from ._dpm_solver import multistep_update
from ._x0_clip import clip_sample


_SPACES = ("ve", "t")


def velocity(eps: EpsFn, schedule: AbstractSchedule, x: PyTree, t: Array) -> PyTree:
    """dx/dt of the probability-flow ODE in the schedule's own time: with
    x = α x̂_0 + σ ε̂ (the model's predictions), dx/dt = α'(t) x̂_0 + σ'(t) ε̂ — on
    `aj.FlowMatching()` the velocity ε̂ − x̂_0 itself, finite at α = 0 when the model
    gives its own x̂_0 (`aj.as_eps`)."""
    e, x0 = predict(eps, schedule, x, t)
    one = jnp.ones_like(t)
    _, da = jax.jvp(schedule.alpha, (t,), (one,))
    _, ds = jax.jvp(schedule.sigma, (t,), (one,))
    return lincomb((da, x0), (ds, e))


class Heun(AbstractSampler[PyTree]):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn): an
    Euler predictor to the next time and the trapezoidal corrector with the slope
    there. Heun's method is not invariant under a time-dependent rescaling of the
    state, so *where* it is applied matters; `space` chooses:

    - `"ve"` (default): in the variance-exploding coordinates y = x/α against
        ς = σ/α = e^{−λ}, where the ODE is dy/dς = ε̂. With h = λ_s − λ_t the Euler
        predictor is DPM-Solver-1 and

            x_s = (α_s/α_t) x_t − σ_s (e^h − 1) (ε̂(x_t, t) + ε̂(x̃_s, s))/2.

        This is diffusers' `HeunDiscreteScheduler` (any schedule, any σ-grid).

    - `"t"`: in the schedule's own state x and time t, dx/dt = α' x̂_0 + σ' ε̂:

            x̃_s = x_t + (s − t) f(x_t, t),
            x_s = x_t + (s − t)(f(x_t, t) + f(x̃_s, s))/2.

        On `aj.FlowMatching()` (f is the velocity) this is diffusers'
        `FlowMatchHeunDiscreteScheduler`, and it may start at t = 1 (α = 0) from the
        model's own data prediction (`aj.as_eps(..., "flow")`). On a flow schedule the
        two spaces differ by O(h³) per step (the corrector's slope is weighted by
        (1 − s)/(1 − t) more in "t"); both are second order.

    A last step to σ = 0 is the Euler step alone (the data prediction in "ve"), as in
    Karras et al. and diffusers: no evaluation at σ = 0 (a `lax.cond`).

    With `clip_sample=r` ("ve" only: diffusers' `clip_sample` with
    `clip_sample_range` r) each evaluation's x̂_0 is clamped to [−r, r] and its slope
    is that of the clamped x̂_0, ε̂ = (x − α clamp(x̂_0))/σ.

    **When to use it:** the deterministic second-order sampler of k-diffusion
    pipelines; 2 model evaluations per step buy an error O(h²) (DPM-Solver++(2M) gets
    it with one). **Order:** 2. **Cost:** 2 evaluations per step (1 on a last step to
    σ = 0). **State:** x only. **Gradients:** `aj.DTO()` (exact) and the continuous
    adjoints (`aj.AdjointDEIS`, `RecordedAdjoint`, `InterpolatedAdjoint`: the
    probability-flow ODE's adjoint; refused with `clip_sample`).
    """

    space: str = eqx.field(default="ve", static=True)
    clip_sample: float | None = eqx.field(default=None, static=True)

    order: ClassVar[int] = 2
    is_sde: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 2
    steps_to_sigma_zero: ClassVar[bool] = True

    def __check_init__(self):
        if self.space not in _SPACES:
            raise ValueError(
                f"`Heun(space=...)` must be 've' or 't'; got {self.space!r}."
            )
        r = self.clip_sample
        if r is not None and (
            isinstance(r, bool) or not isinstance(r, int | float) or r <= 0
        ):
            raise ValueError(
                f"`Heun(clip_sample=...)` must be None or a number > 0; got {r!r}."
            )
        if r is not None and self.space != "ve":
            raise ValueError(
                "`Heun(clip_sample=...)` needs space='ve' (diffusers' Heun)."
            )

    @property
    def continuous_adjoint_error(self) -> str | None:
        if self.clip_sample is None:
            return None
        return (
            f"it clamps x̂_0 to [−{self.clip_sample}, {self.clip_sample}] (clip_sample) "
            "at every evaluation, which is not the smooth probability-flow ODE their "
            "adjoint equations assume"
        )

    def _eps(self, eps, schedule, x, t):
        """(ε̂, x̂_0) at (x, t); with `clip_sample`, the ε̂ of the clamped x̂_0."""
        if self.clip_sample is None:
            return predict(eps, schedule, x, t, derive=False)
        _, x0 = predict(eps, schedule, x, t)
        x0 = clip_sample(x0, self.clip_sample)
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        e = lincomb((1.0 / sigma, x), (-alpha / sigma, x0))
        return e, x0

    @property
    def steps_from_alpha_zero(self) -> bool:
        # y = x/α is infinite at α = 0; the velocity of "t" is finite there.
        return self.space == "t"

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> PyTree:
        del schedule, ts
        return x_T

    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del i, noise
        to_data = step_coeffs(schedule, t, s).sigma_zero_end
        if self.space == "ve":
            return self._ve(eps, schedule, state, t, s, to_data)
        return self._t(eps, schedule, state, t, s, to_data)

    # dy/dς = ε̂ with y = x/α, ς = e^{−λ}: α_s (ς_s − ς_t) = −σ_s (e^h − 1), so both the
    # Euler step y + (ς_s − ς_t) ε̂ and the trapezoid y + (ς_s − ς_t)(ε̂_t + ε̂_s)/2 are
    # x_s = (α_s/α_t) x − σ_s (e^h − 1) · (the slope) in x.
    def _ve(self, eps, schedule, x, t, s, to_data):
        e_t, x0 = self._eps(eps, schedule, x, t)
        x_pred = multistep_update(schedule, x, e_t, None, t, s, None, True, x0)

        def corrected():
            e_s, _ = self._eps(eps, schedule, x_pred, s)
            c = step_coeffs(schedule, t, s)
            return lincomb(
                (c.alpha_ratio, x),
                (-0.5 * c.sigma_phi1, e_t),
                (-0.5 * c.sigma_phi1, e_s),
            )

        return jax.lax.cond(to_data, lambda: x_pred, corrected)

    # The explicit trapezoidal rule on dx/dt = f(x, t): predictor x + (s − t) f_t,
    # corrector x + (s − t)(f_t + f_s)/2.
    def _t(self, eps, schedule, x, t, s, to_data):
        dt = s - t
        f_t = velocity(eps, schedule, x, t)
        x_pred = lincomb((jnp.ones_like(dt), x), (dt, f_t))

        def corrected():
            f_s = velocity(eps, schedule, x_pred, s)
            return lincomb((jnp.ones_like(dt), x), (0.5 * dt, f_t), (0.5 * dt, f_s))

        return jax.lax.cond(to_data, lambda: x_pred, corrected)

    def output(self, state: PyTree) -> PyTree:
        return state


Heun.__init__.__doc__ = """**Arguments:**

- `space`: `"ve"` (default; Karras et al.'s y = x/α against σ/α: diffusers'
    `HeunDiscreteScheduler`) or `"t"` (the schedule's own x and t: on
    `aj.FlowMatching()`, diffusers' `FlowMatchHeunDiscreteScheduler`).
- `clip_sample`: None, or r > 0 to clamp each x̂_0 to [−r, r] (diffusers' Heun
    `clip_sample=True` with `clip_sample_range=r`; "ve" only).
"""
