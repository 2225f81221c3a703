"""Exponential-integrator coefficients in the log-SNR λ, shared by samplers and
adjoints. Computed in the dtype of the time grid; `lincomb` casts them to the state's
dtype.

The endpoints of a grid have infinite log-SNR: σ = 0 at t = 0 (the last step of a
grid that ends on the data) and α = 0 at a schedule's `alpha_zero_time` (the first
step from pure noise). The coefficients are written so that they stay finite there,
and, where a formula has no finite value, replaced by 0 *before* the arithmetic ("the
double-where"), so that neither the values nor the gradients of the branch not taken
are NaN. Samplers read the flags `sigma_zero_end` and `alpha_zero_start` to switch to
the data-prediction form of their step.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from .._schedule import AbstractSchedule


class StepCoeffs(eqx.Module):
    """For a step t → s (either direction), with h = λ_s − λ_t:

    - `h`, `lam_t`: h and λ_t (h is 0 when either end has infinite λ);
    - `alpha_t`, `alpha_s`, `sigma_t`, `sigma_s`;
    - `alpha_ratio` = α_s/α_t (0 when α_t = 0);
    - `phi1` = e^h − 1, `phi2` = (e^h − 1 − h)/h, of the finite h;
    - `sigma_phi1` = σ_s (e^h − 1), also at σ_s = 0 (where it is α_s σ_t/α_t), and
      `sigma_phi2` = σ_s φ₂ (0 at σ_s = 0: the step to the data is first order);
    - `exp_neg_h` = e^{−h} = α_t σ_s/(σ_t α_s) and `sigma_ratio` = σ_s/σ_t, the
      data-prediction form's coefficients: exact (0) at either endpoint;
    - `sigma_zero_end` (σ_s = 0) and `alpha_zero_start` (α_t = 0).

    (∫_{λ_t}^{λ_s} e^{−λ}(λ − λ_t) dλ = e^{−λ_s} h φ₂.)
    """

    h: Array
    lam_t: Array
    alpha_t: Array
    alpha_s: Array
    sigma_t: Array
    sigma_s: Array
    alpha_ratio: Array
    phi1: Array
    phi2: Array
    sigma_phi1: Array
    sigma_phi2: Array
    exp_neg_h: Array
    sigma_ratio: Array
    sigma_zero_end: Array
    alpha_zero_start: Array


def _logs(schedule: AbstractSchedule, u: Array, other: Array):
    """(log α_u, log σ_u), each −∞ at an endpoint (σ = 0 at u = 0; α = 0 at
    `schedule.alpha_zero_time`) and computed at u elsewhere. At an endpoint the
    infinite log is evaluated at the interior time (u + other)/2 instead and then
    replaced by the constant −∞, so that no derivative (in u or in the schedule's
    parameters) is ever taken through log 0."""
    mid = 0.5 * (u + other)

    def log_at(log_fn, end):  # `end`: a Python False where no endpoint exists
        if end is False:
            return log_fn(u)
        value = log_fn(jnp.where(end, mid, u))
        return jnp.where(end, jnp.full_like(value, -jnp.inf), value)

    a_end = False if schedule.alpha_zero_time is None else u == schedule.alpha_zero_time
    return log_at(schedule.log_alpha, a_end), log_at(schedule.log_sigma, u == 0)


def step_coeffs(schedule: AbstractSchedule, t: ArrayLike, s: ArrayLike) -> StepCoeffs:
    """The coefficients of the step t → s under `schedule` (see `StepCoeffs`)."""
    t, s = jnp.asarray(t), jnp.asarray(s)
    dynamic, static = eqx.partition(schedule, eqx.is_array)
    try:
        hash(static)
    except TypeError:  # a schedule with an unhashable non-array field: not staged
        return _step_coeffs(schedule, t, s)
    return _staged_step_coeffs(dynamic, static, t, s)


# Staged through `jit(inline=True)`: a sampler's step calls this once or more, and the
# step is traced again by every transformation around it (the scan, the adjoints'
# VJPs of the step, `vmap`, `grad` of all of it); ~110 scalar operations each time.
# As a call, JAX traces it once per schedule (type and static fields), dtype and
# shape, and caches each transformation of it; `inline` puts the operations
# themselves in the traced program, as before (the test matrix's results are bitwise
# unchanged), and the suite traces ~10% faster.
@functools.partial(jax.jit, static_argnums=1, inline=True)
def _staged_step_coeffs(dynamic, static, t, s):
    return _step_coeffs(eqx.combine(dynamic, static), t, s)


def _step_coeffs(schedule: AbstractSchedule, t: Array, s: Array) -> StepCoeffs:
    la_t, ls_t = _logs(schedule, t, s)
    la_s, ls_s = _logs(schedule, s, t)
    sigma_zero_end = jnp.isneginf(ls_s)
    alpha_zero_start = jnp.isneginf(la_t)
    finite = jnp.isfinite(la_t) & jnp.isfinite(la_s) & jnp.isfinite(ls_t) & (
        jnp.isfinite(ls_s)
    )
    zero = jnp.zeros_like(la_t)
    # Safe copies: the endpoint values replaced by 0 before any arithmetic.
    la_t_ = jnp.where(jnp.isfinite(la_t), la_t, zero)
    la_s_ = jnp.where(jnp.isfinite(la_s), la_s, zero)
    ls_t_ = jnp.where(jnp.isfinite(ls_t), ls_t, zero)
    ls_s_ = jnp.where(jnp.isfinite(ls_s), ls_s, zero)
    h = jnp.where(finite, (la_s_ - ls_s_) - (la_t_ - ls_t_), zero)
    phi1 = jnp.expm1(h)
    # φ₂ = (e^h − 1 − h)/h; use its series below |h| < 1e-3 to avoid cancellation.
    small = jnp.abs(h) < 1e-3
    h_safe = jnp.where(small, 1.0, h)
    phi2 = jnp.where(small, h / 2 + h * h / 6, (phi1 - h) / h_safe)
    # exp of a log that is −∞ is an exact 0 (whose derivative, 0, is never multiplied
    # by an infinite one: the −∞ is a constant).
    alpha_s, sigma_s = jnp.exp(la_s), jnp.exp(ls_s)
    alpha_ratio = jnp.where(alpha_zero_start, zero, jnp.exp(la_s_ - la_t_))
    # σ_s (e^h − 1) = α_s σ_t/α_t − σ_s, which at σ_s = 0 is α_s σ_t/α_t.
    to_data = jnp.exp(la_s_ + ls_t_ - la_t_)
    sigma_phi1 = jnp.where(
        finite, sigma_s * phi1, jnp.where(sigma_zero_end & ~alpha_zero_start, to_data, zero)
    )
    return StepCoeffs(
        h=h,
        lam_t=la_t - ls_t,
        alpha_t=jnp.exp(la_t),
        alpha_s=alpha_s,
        sigma_t=jnp.exp(ls_t),
        sigma_s=sigma_s,
        alpha_ratio=alpha_ratio,
        phi1=phi1,
        phi2=phi2,
        sigma_phi1=sigma_phi1,
        sigma_phi2=jnp.where(finite, sigma_s * phi2, zero),
        # At an endpoint the exponent is −∞ (the constant −∞ of log α_t or log σ_s,
        # added to finite terms): e^{−h} = 0 and σ_s/σ_t = 0 exactly.
        exp_neg_h=jnp.exp(la_t + ls_s - ls_t_ - la_s_),
        sigma_ratio=jnp.exp(ls_s - ls_t_),
        sigma_zero_end=sigma_zero_end,
        alpha_zero_start=alpha_zero_start,
    )
