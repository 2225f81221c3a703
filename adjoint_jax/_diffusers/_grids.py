"""The noise-level grids diffusers' `set_timesteps` builds, in float64, and their
conversion to `aj.sample` time grids.

diffusers describes a VP grid by variance-exploding noise levels σ = √((1 − ᾱ)/ᾱ)
(σ/α of `aj`'s state, e^{−λ}), a flow-matching grid by the flow σ (= t of
`aj.FlowMatching()`). Every function here takes and returns NumPy float64 arrays
(whatever the model's dtype: a bfloat16 network must not round the grid) and
follows diffusers' formulas, including their quirks (which end a Karras ramp is
clipped to, which σ a grid starts from); each says which diffusers method it
mirrors.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from .._schedule import AbstractSchedule, VPDiscrete


def karras(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al.'s ρ-ramp from σ_max to σ_min in n points (`_convert_to_karras`)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential(sigma_max: float, sigma_min: float, n: int) -> np.ndarray:
    """Log-uniform σ from σ_max to σ_min (`_convert_to_exponential`)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta(sigma_max: float, sigma_min: float, n: int, a: float = 0.6, b: float = 0.6):
    """σ_min + (σ_max − σ_min) F⁻¹(1 − u), F the Beta(a, b) CDF, u uniform on [0, 1]
    (`_convert_to_beta`, "Beta sampling is all you need")."""
    import scipy.stats

    u = 1 - np.linspace(0, 1, n)
    ppf = np.array([scipy.stats.beta.ppf(v, a, b) for v in u])
    return sigma_min + ppf * (sigma_max - sigma_min)


def lu_lambdas(log_sigma_max: float, log_sigma_min: float, n: int) -> np.ndarray:
    """Lu et al.'s grid uniform in λ (`_convert_to_lu`): σ_k = e^{−λ_k} with λ
    uniform from −log σ_max to −log σ_min."""
    ramp = np.linspace(0, 1, n)
    return np.exp(log_sigma_max + ramp * (log_sigma_min - log_sigma_max))


def sigma_to_index(sigma, train_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' `_sigma_to_t`: the fractional training timestep whose σ, log σ
    interpolated linearly between the integer timesteps, is `sigma` (clamped to the
    table's range)."""
    log_s = np.log(np.maximum(np.asarray(sigma, np.float64), 1e-10))
    return np.interp(log_s, np.log(train_sigmas), np.arange(len(train_sigmas)))


def vp_times(schedule: AbstractSchedule, sigmas: np.ndarray) -> np.ndarray:
    """The times of `aj` schedule `schedule` (a VP schedule) at variance-exploding
    noise levels `sigmas` (λ = −log σ; σ = 0 is t = 0; σ = ∞ is the schedule's
    `alpha_zero_time`), in float64 whatever `jax_enable_x64` says: NumPy for
    `aj.VPDiscrete` (its `t_of_lam`, log α linear in t between the knots k/T, ᾱ
    linear on a last segment ending at ᾱ = 0), JAX in 64-bit mode otherwise."""
    sigmas = np.asarray(sigmas, np.float64)
    out = np.zeros_like(sigmas)
    pos = (sigmas > 0) & np.isfinite(sigmas)
    if np.any(pos):
        out[pos] = _t_of_sigma(schedule, sigmas[pos])
    if np.any(np.isinf(sigmas)):
        if schedule.alpha_zero_time is None:
            raise ValueError("an infinite σ needs a schedule with α = 0 at its end.")
        out[np.isinf(sigmas)] = schedule.alpha_zero_time
    return out


def _t_of_sigma(schedule: AbstractSchedule, sigmas: np.ndarray) -> np.ndarray:
    if isinstance(schedule, VPDiscrete):
        la = np.asarray(schedule.log_alphas, np.float64)
        T = len(la)
        knots = np.arange(T + 1) / T
        neg = -np.concatenate([[0.0], la])  # −log α at the knots, increasing
        target = 0.5 * np.log1p(sigmas**2)  # −log α at σ
        idx = np.clip(np.searchsorted(neg, target, side="right") - 1, 0, T - 1)
        l0, l1 = neg[idx], neg[idx + 1]
        t0, t1 = knots[idx], knots[idx + 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            linear = t0 + (target - l0) * (t1 - t0) / (l1 - l0)
        # On a segment ending at ᾱ = 0: ᾱ = (1 − w) ᾱ0, so w = 1 − exp(2 (l0 − target)).
        zero = t0 - np.expm1(2.0 * (l0 - target)) * (t1 - t0)
        return np.where(np.isposinf(l1), zero, linear)
    with jax.enable_x64(True):
        lam = jnp.asarray(-np.log(sigmas), jnp.float64)
        return np.asarray(schedule.t_of_lam(lam), np.float64)


def flow_shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The static flow shift σ ↦ s σ / (1 + (s − 1) σ) (SD3's `shift`)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(sigmas: np.ndarray, mu: float, kind: str = "exponential") -> np.ndarray:
    """FLUX's resolution-dependent shift (`time_shift(mu, 1.0, σ)`):
    e^μ / (e^μ + 1/σ − 1) ("exponential"), or μ / (μ + 1/σ − 1) ("linear")."""
    with np.errstate(divide="ignore"):
        inv = 1 / sigmas - 1
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + inv)
    if kind == "linear":
        return mu / (mu + inv)
    raise ValueError(
        f"`config['time_shift_type']` must be 'exponential' or 'linear'; got {kind!r}."
    )


def shift_terminal(sigmas: np.ndarray, terminal: float) -> np.ndarray:
    """LTX-Video's `stretch_shift_to_terminal`: rescale 1 − σ so the last σ is
    `terminal`."""
    one_minus = 1 - sigmas
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))
