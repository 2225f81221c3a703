"""Exponential-integrator coefficients in the log-SNR λ, shared by samplers and
adjoints. Computed in the dtype of the time grid; `lincomb` casts them to the state's
dtype."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array

from .._schedule import AbstractSchedule


class StepCoeffs(eqx.Module):
    """For a step t → s: λ_t, h = λ_s − λ_t, α_s/α_t, σ_s, φ₁ = e^h − 1 and
    φ₂ = (e^h − 1 − h)/h (so that ∫_{λ_t}^{λ_s} e^{−λ}(λ − λ_t) dλ = e^{−λ_s} h φ₂)."""

    h: Array
    lam_t: Array
    alpha_ratio: Array
    alpha_t: Array
    alpha_s: Array
    sigma_s: Array
    phi1: Array
    phi2: Array


def step_coeffs(schedule: AbstractSchedule, t: Array, s: Array) -> StepCoeffs:
    lam_t, lam_s = schedule.lam(t), schedule.lam(s)
    h = lam_s - lam_t
    la_t, la_s = schedule.log_alpha(t), schedule.log_alpha(s)
    phi1 = jnp.expm1(h)
    # φ₂ = (e^h − 1 − h)/h; use its series below |h| < 1e-3 to avoid cancellation.
    small = jnp.abs(h) < 1e-3
    h_safe = jnp.where(small, 1.0, h)
    phi2 = jnp.where(small, h / 2 + h * h / 6, (phi1 - h) / h_safe)
    return StepCoeffs(
        h=h,
        lam_t=lam_t,
        alpha_ratio=jnp.exp(la_s - la_t),
        alpha_t=jnp.exp(la_t),
        alpha_s=jnp.exp(la_s),
        sigma_s=schedule.sigma(s),
        phi1=phi1,
        phi2=phi2,
    )
