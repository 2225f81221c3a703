"""DPM-Solver++ SDE ("DPM++ SDE", Katherine Crowson's `sample_dpmpp_sde` with η = 1
and a midpoint in log σ), as diffusers' `DPMSolverSDEScheduler` runs it: two model
evaluations per step, the second at the log-σ midpoint, with Brownian noise."""

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractSampler, EpsFn, predict
from ._coeffs import step_coeffs


def _ancestral(c, s_noise: float):
    """(A, B, C) of the ancestral data-prediction step x_s = A x + B x̂_0 + C ξ over
    the step of coefficients `c` (h = λ_s − λ_start): in the variance-exploding
    latents y = x/α (σ̃ = e^{−λ}) it is y_s = (σ̃_d/σ̃) y + (1 − σ̃_d/σ̃) x̂_0 + σ̃_up ξ
    with σ̃_up = σ̃_s √(1 − e^{−2h}) and σ̃_d = √(σ̃_s² − σ̃_up²) = σ̃_s e^{−h}, so
    σ̃_d/σ̃ = e^{−2h}; times α_s: A = (σ_s/σ) e^{−h}, B = α_s (1 − e^{−2h}),
    C = s_noise σ_s √(1 − e^{−2h}) (DDIM η = 1 in its data-prediction form)."""
    one = jnp.ones_like(c.h)
    one_m = jnp.where(c.exp_neg_h == 0, one, -jnp.expm1(-2.0 * c.h))
    return (c.sigma_ratio * c.exp_neg_h, c.alpha_s * one_m,
            s_noise * c.sigma_s * jnp.sqrt(one_m))


def interleave(schedule: AbstractSchedule, ts: Array) -> Array:
    """The grid `DPMSolverSDE` runs for the steps of `ts`: each interval's
    log-SNR midpoint inserted (λ_u = (λ_t + λ_s)/2), except in a last step to σ = 0,
    which takes no midpoint. (`aj.from_diffusers` builds diffusers' grid itself.)"""
    ts = jnp.asarray(ts)
    t, s = ts[:-1], ts[1:]
    s_safe = jnp.where(s == 0, t, s)
    mid = schedule.t_of_lam(0.5 * (schedule.lam(t) + schedule.lam(s_safe)))
    pairs = jnp.stack([t, mid], axis=1).reshape(-1)
    if float(ts[-1]) == 0.0:
        return jnp.concatenate([pairs[:-1], ts[-1:]])
    return jnp.concatenate([pairs, ts[-1:]])


class DPMSolverSDE(AbstractSampler[tuple]):
    """DPM-Solver++ SDE ("DPM++ SDE"), as diffusers' `DPMSolverSDEScheduler`: each
    step t → s is two ancestral (η = 1) data-prediction steps, the first to the
    log-SNR midpoint u and the second from t again, with the data prediction taken
    at u.

    **Grid and state.** Like diffusers' `timesteps`, the grid interleaves the
    midpoints: ts = (t₀, u₀, t₁, u₁, …, t_{M−1}, 0) (`interleave(schedule, ts)`), and
    the sampler's steps alternate. Even step i (t → u): evaluate x̂₀(x_t, t) and take
    the ancestral step to u with the step's noise ξ_i; the state keeps x_t, t and ξ_i.
    Odd step i (u → s): evaluate x̂₀(x_u, u) and take the ancestral step from the kept
    x_t to s with that x̂₀ and the noise

        ξ = (√Δ₁ ξ_{i−1} + √Δ₂ ξ_i)/√(Δ₁ + Δ₂),   Δ₁ = σ̃_t − σ̃_u, Δ₂ = σ̃_u − σ̃_s

    (σ̃ = σ/α = e^{−λ}): diffusers draws the noise of a step as the increment of one
    Brownian motion in σ̃ over it, normalised, so the second stage's noise is the sum
    of the two half-intervals' increments. Hence **`noise[i]` is the normalised
    Brownian increment over grid interval i**,
    `(W(σ̃_{i+1}) − W(σ̃_i))/√(σ̃_i − σ̃_{i+1})`
    (diffusers' `BrownianTreeNoiseSampler(σ̃_i, σ̃_{i+1})`): one standard normal per
    step, independent across steps. A step to σ = 0 is the data prediction at its
    start (diffusers' last step, an Euler step to σ = 0; its noise is unused), and a
    grid with an odd number of steps not ending at 0 ends on a first stage.

    The ancestral step t → s (h = λ_s − λ_t) is x_s = (σ_s/σ_t) e^{−h} x_t
    + α_s (1 − e^{−2h}) x̂₀ + s_noise · σ_s √(1 − e^{−2h}) ξ.

    **Order:** on Gaussian data its mean map is exact (the midpoint's x̂₀ averages to
    x_t's, as for `aj.DDIM(eta=1)`), and its conditional variance of x_0 converges at
    order 2 (`order`; measured in `tests/test_diffusers_singlestep.py`); the ODE
    limit `s_noise=0` is DPM-Solver++(2S) with r = ½, second order.
    **Cost:** one model evaluation per grid step (two per macro step).
    **Memory:** x, the macro step's start x_t and its noise. **Gradients:**
    `aj.DTO()` (exact, also ∂L/∂noise). Its state is not x alone, so the continuous
    adjoints (which re-solve x backward with `AbstractSDESampler.invert_step`) do not
    apply.
    """

    s_noise: float = eqx.field(default=1.0, static=True)

    order: ClassVar[int] = 2
    is_sde: ClassVar[bool] = True
    evals_per_step: ClassVar[int] = 1
    steps_to_sigma_zero: ClassVar[bool] = True
    steps_from_alpha_zero: ClassVar[bool] = False

    def __check_init__(self):
        if isinstance(self.s_noise, bool) or not isinstance(self.s_noise, int | float):
            raise TypeError(
                f"`DPMSolverSDE(s_noise=...)` must be a Python number; got {self.s_noise!r}."
            )

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array):
        del schedule
        zeros = lincomb((jnp.zeros((), ts.dtype), x_T))
        return (x_T, x_T, ts[0], zeros)

    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        x, base, t_b, xi1 = state
        c = step_coeffs(schedule, t, s)
        _, x0 = predict(eps, schedule, x, t)
        second = (i % 2 == 1) & ~c.sigma_zero_end
        # First stage (or a step to σ = 0): from x_t, with this step's noise.
        a1, b1, n1 = _ancestral(c, self.s_noise)
        first = lincomb((a1, x), (b1, x0), (n1, noise))
        # Second stage: from the macro step's start t_b, with the Brownian increment
        # over [σ̃_s, σ̃_t_b] built from the two half-intervals' normals.
        cb = step_coeffs(schedule, t_b, s)
        a2, b2, n2 = _ancestral(cb, self.s_noise)
        vt_b, vt_u, vt_s = jnp.exp(-cb.lam_t), jnp.exp(-c.lam_t), c.sigma_s / c.alpha_s
        one = jnp.ones_like(vt_u)
        # (Off the second stage the lengths are replaced by 1 before the square roots:
        # a first step has Δ₁ = 0, whose square root has no derivative.)
        d1 = jnp.where(second, vt_b - vt_u, one)
        d2 = jnp.where(second, vt_u - vt_s, one)
        w1 = jnp.where(second, jnp.sqrt(d1 / (d1 + d2)), 0.0 * one)
        w2 = jnp.where(second, jnp.sqrt(d2 / (d1 + d2)), 0.0 * one)
        xi2 = lincomb((w1, xi1), (w2, noise))
        later = lincomb((a2, base), (b2, x0), (n2, xi2))
        x_s = jtu.tree_map(lambda u, v: jnp.where(second, u, v), later, first)
        keep = ~second
        base = jtu.tree_map(lambda u, v: jnp.where(keep, u, v), x, base)
        xi1 = jtu.tree_map(lambda u, v: jnp.where(keep, u, v), noise, xi1)
        t_b = jnp.where(keep, t, t_b)
        return (x_s, base, t_b, xi1)

    def output(self, state) -> PyTree:
        return state[0]


DPMSolverSDE.__init__.__doc__ = """**Arguments:**

- `s_noise`: the factor of the noise (diffusers' `step(..., s_noise=)`, default 1).
"""
