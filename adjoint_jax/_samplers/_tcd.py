"""Trajectory consistency distillation's strategic stochastic sampling (TCD)."""

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractSampler, EpsFn, predict
from ._coeffs import step_coeffs


def _noise_std(c) -> Array:
    """σ_s √(1 − e^{2h}), h = λ_s − λ_u ≤ 0: the standard deviation of the forward
    transition q(x_s | x_u) = N((α_s/α_u) x_u, σ_s² − (α_s σ_u/α_u)²). At u = 0
    (σ_u = 0, where `step_coeffs` stores h = 0) it is σ_s; at u = s it is 0 (a
    double-where keeps the square root's derivative finite there)."""
    one_minus = jnp.where(c.sigma_t == 0, jnp.ones_like(c.h), -jnp.expm1(2.0 * c.h))
    positive = one_minus > 0
    root = jnp.sqrt(jnp.where(positive, one_minus, jnp.ones_like(one_minus)))
    return jnp.where(positive, c.sigma_s * root, jnp.zeros_like(root))


class TCD(AbstractSampler[PyTree]):
    """TCD's strategic stochastic sampling (Zheng et al. 2024, "Trajectory
    Consistency Distillation"), γ ∈ [0, 1]: step t → s through the earlier time
    u ≤ s (by default u = (1 − γ) s),

        x_u = α_u x̂_0 + σ_u ε̂                    (the model's jump along its trajectory)
        x_s = (α_s/α_u) x_u + √(σ_s² − (α_s σ_u/α_u)²) ξ   (forward noise u → s),

    with (ε̂, x̂_0) the model's predictions at (x_t, t) and ξ the step's standard
    normal noise.

    - **γ = 0** is deterministic and identical to DDIM (`aj.DDIM()`, u = s).
    - **γ = 1** (u = 0) is multistep consistency sampling (`aj.LCM()`).
    - `mids`: optional explicit u of every step (a tuple of N Python floats, step
        i's at `mids[i]`, each ≤ that step's s), instead of (1 − γ) s. diffusers'
        `TCDScheduler` rounds u down to an integer timestep, floor((1 − γ) ·
        prev_timestep) (in float32), and its last step goes to timestep 0 without
        noise; `aj.from_diffusers` passes those times here, on the scheduler's
        timesteps (t = (n + 1)/T) ending at t = 1/T: its last state is the
        pipeline's latents. (diffusers calls γ `eta`: the `eta` of
        `aj.from_diffusers`, whose 0.0 default is the pipelines' too.)

    **When to use it:** 2–8 steps of a TCD-distilled model (TCD LoRAs); γ trades
    detail (small γ) for smoothness. For γ > 0 it is not a discretisation of an ODE
    or SDE: the jump t → u does not shrink with the step (u stays a fraction γ of
    the way to the data), so x_0 does not converge as N grows (order 0); γ = 0 is
    DDIM, order 1. **Cost:** one model evaluation per step; state x only.
    **Noise:** step i uses `noise[i]` (γ > 0); diffusers draws none on its last
    step, so `noise[N − 1]` is unused there. **Gradients:** `aj.DTO()` (exact,
    including ∂L/∂noise); for γ > 0 the continuous adjoints are refused (no
    continuous-time limit); γ = 0 works with every strategy DDIM works with.
    """

    gamma: float = eqx.field(default=0.3, static=True)
    mids: tuple[float, ...] | None = eqx.field(default=None, static=True, repr=False)

    evals_per_step: ClassVar[int] = 1
    steps_to_sigma_zero: ClassVar[bool] = True
    steps_from_alpha_zero: ClassVar[bool] = True

    def __check_init__(self):
        g = self.gamma
        if isinstance(g, bool) or not isinstance(g, int | float) or not 0 <= g <= 1:
            raise ValueError(
                f"`TCD(gamma=...)` must be a Python number in [0, 1]; got {g!r}."
            )
        if self.mids is not None and not (
            isinstance(self.mids, tuple)
            and all(isinstance(m, float) for m in self.mids)
        ):
            raise TypeError(
                f"`TCD(mids=...)` must be a tuple of Python floats; got {self.mids!r}."
            )

    @property
    def is_sde(self) -> bool:
        return self.gamma > 0

    @property
    def order(self) -> int:
        return 1 if self.gamma == 0 else 0

    @property
    def continuous_adjoint_error(self) -> str | None:
        if self.gamma == 0:
            return None
        return (
            "TCD with gamma > 0 has no continuous-time limit (its jump to the earlier "
            "time u does not shrink with the step), so there is no adjoint equation to "
            "solve; use `aj.DTO()`"
        )

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> PyTree:
        del schedule
        if self.mids is not None and len(self.mids) != ts.shape[0] - 1:
            raise ValueError(
                f"`TCD(mids=...)` has {len(self.mids)} times for a grid of "
                f"{ts.shape[0] - 1} steps; give one per step."
            )
        return x_T

    def _mid(self, s: Array, i: Array) -> Array:
        if self.mids is None:
            return (1.0 - self.gamma) * s
        return jnp.asarray(self.mids, s.dtype)[i]

    # From (ε̂, x̂_0) at (x_t, t): the DDIM jump to u, then the exact forward
    # transition u → s, x_s = (α_s/α_u) x_u + c ξ; together
    # x_s = α_s x̂_0 + (α_s σ_u/α_u) ε̂ + c ξ. (u = s: c = 0, DDIM; u = 0: x̂_0
    # re-noised, LCM.)
    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        e, x0 = predict(eps, schedule, state, t)
        c = step_coeffs(schedule, self._mid(s, i), s)
        return lincomb(
            (c.alpha_s, x0),
            (c.alpha_ratio * c.sigma_t, e),
            (_noise_std(c), noise),  # skipped when noise is None (γ = 0)
        )

    def output(self, state: PyTree) -> PyTree:
        return state


TCD.__init__.__doc__ = """**Arguments:**

- `gamma`: γ ∈ [0, 1] (a Python number; diffusers' `eta`, 0.3 in the TCD paper).
- `mids`: optional tuple of N Python floats, the intermediate time u of each step
    (default (1 − γ) s).
"""
