"""Noise schedules x_t = α_t x_0 + σ_t ε.

Every schedule is described by `log_alpha(t)` and `log_sigma(t)`; everything else
(`alpha`, `sigma`, the log-SNR `lam = log α − log σ` and its inverse `t_of_lam`) is
derived from them. All methods accept scalars or arrays and are jit-safe.

Numerics: for the variance-preserving (VP) schedules σ_t = sqrt(1 − α_t²) is computed
as `sqrt(-expm1(2 log α_t))`, which keeps full relative precision as t → 0, and the
inverse `t_of_lam` goes through the exact identity log α = −½ softplus(−2λ), so that
`t_of_lam(lam(t)) == t` to round-off over the whole range.
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

from ._misc import cast, concrete_float


class AbstractSchedule(eqx.Module):
    """Base class of the noise schedules.

    Subclasses implement `log_alpha`, `log_sigma` and `t_of_lam`, and declare the
    range `[t_min, t_max]` of times with finite log-SNR, and `alpha_zero_time`.

    **Endpoints.** Every schedule has σ = 0 exactly at t = 0 (the data), so a time
    grid may *end* at t = 0: the last step is then the data prediction (diffusers'
    `set_alpha_to_one`, `final_sigmas_type="zero"`). A grid may *start* at
    `alpha_zero_time` when it is not `None`: a time where α = 0 exactly (pure noise:
    t = 1 of `FlowMatching`, or of a zero-terminal-SNR `VPDiscrete`). Both points
    have infinite log-SNR; samplers that cannot step to or from them say so.
    """

    t_min: eqx.AbstractVar[float]
    t_max: eqx.AbstractVar[float]
    alpha_zero_time: eqx.AbstractVar[float | None]

    @abc.abstractmethod
    def log_alpha(self, t: ArrayLike) -> Array:
        """log α_t."""

    @abc.abstractmethod
    def log_sigma(self, t: ArrayLike) -> Array:
        """log σ_t."""

    @abc.abstractmethod
    def t_of_lam(self, lam: ArrayLike) -> Array:
        """The time t at which the log-SNR `lam(t)` equals `lam` (inverse of `lam`)."""

    def alpha(self, t: ArrayLike) -> Array:
        """α_t, the signal scale."""
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t: ArrayLike) -> Array:
        """σ_t, the noise scale."""
        return jnp.exp(self.log_sigma(t))

    def lam(self, t: ArrayLike) -> Array:
        """λ_t = log(α_t / σ_t), the half log signal-to-noise ratio (decreasing in t)."""
        return self.log_alpha(t) - self.log_sigma(t)


def _vp_log_sigma(log_alpha: Array) -> Array:
    # σ² = 1 − α² = −expm1(2 log α), accurate when α → 1.
    return 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))


def _vp_log_alpha_of_lam(lam: Array) -> Array:
    # α² = 1 / (1 + e^{−2λ})  ⇒  log α = −½ softplus(−2λ).
    return -0.5 * jnp.logaddexp(0.0, -2.0 * lam)


def _float(t: ArrayLike) -> Array:
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.result_type(float))
    return t


def _check_bounds(name: str, t_min, t_max, upper: float | None = None) -> None:
    """`t_min` and `t_max` are static bounds (Python numbers), checked eagerly."""
    for field, v in (("t_min", t_min), ("t_max", t_max)):
        if (
            isinstance(v, jax.core.Tracer)
            or isinstance(v, bool)
            or not isinstance(v, int | float | np.floating | np.integer)
        ):
            raise TypeError(
                f"`{name}({field}=...)` must be a Python number (it is a static bound "
                f"of the time range, never traced); got {type(v).__name__}."
            )
    ok = 0 < t_min < t_max and (upper is None or t_max <= upper)
    if not ok:
        bound = "" if upper is None else f" <= {upper}"
        raise ValueError(
            f"`{name}` needs 0 < t_min < t_max{bound}; got t_min={t_min}, "
            f"t_max={t_max}."
        )


class VPLinear(AbstractSchedule):
    """The variance-preserving schedule with linear β(t) (Song et al., DDPM in
    continuous time): β(t) = β_min + t (β_max − β_min) on t ∈ [0, 1], so
    log α_t = −¼ t² (β_max − β_min) − ½ t β_min and σ_t² = 1 − α_t².

    `beta_min` and `beta_max` are ordinary (never static) fields: they may be traced
    and are differentiated by `aj.DTO()` (the custom-VJP strategies refuse gradients
    with respect to the schedule). `t_of_lam` is closed form.
    """

    beta_min: float | Array = 0.1
    beta_max: float | Array = 20.0
    t_min: float = eqx.field(default=1e-5, static=True)
    t_max: float = eqx.field(default=1.0, static=True)
    alpha_zero_time: None = eqx.field(default=None, static=True, repr=False)

    def __check_init__(self):
        lo, hi = concrete_float(self.beta_min), concrete_float(self.beta_max)
        if lo is not None and hi is not None and not (0 < lo <= hi):
            raise ValueError(
                "`VPLinear` needs 0 < beta_min <= beta_max; got "
                f"beta_min={lo}, beta_max={hi}."
            )
        _check_bounds("VPLinear", self.t_min, self.t_max)

    def log_alpha(self, t: ArrayLike) -> Array:
        t = _float(t)
        b0, b1 = cast(self.beta_min, t.dtype), cast(self.beta_max, t.dtype)
        return -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0

    def log_sigma(self, t: ArrayLike) -> Array:
        return _vp_log_sigma(self.log_alpha(t))

    def t_of_lam(self, lam: ArrayLike) -> Array:
        # Solve ¼ Δβ t² + ½ β_min t = L with L = −log α ≥ 0, in the cancellation-free
        # form t = 4L / (β_min + sqrt(β_min² + 4 Δβ L)).
        lam = _float(lam)
        big_l = -_vp_log_alpha_of_lam(lam)
        b0, b1 = cast(self.beta_min, lam.dtype), cast(self.beta_max, lam.dtype)
        return 4.0 * big_l / (b0 + jnp.sqrt(b0**2 + 4.0 * (b1 - b0) * big_l))


class VPCosine(AbstractSchedule):
    """The cosine variance-preserving schedule of Nichol & Dhariwal (2021):
    α_t = cos(π/2 · (t + s)/(1 + s)) / cos(π/2 · s/(1 + s)), σ_t² = 1 − α_t².

    α vanishes at t = 1, so `t_max` defaults to 0.9946 as in DPM-Solver. `s` is an
    ordinary field (traceable, differentiable with `aj.DTO()`). `t_of_lam` is closed
    form.
    """

    s: float | Array = 0.008
    t_min: float = eqx.field(default=1e-5, static=True)
    t_max: float = eqx.field(default=0.9946, static=True)
    alpha_zero_time: None = eqx.field(default=None, static=True, repr=False)

    def __check_init__(self):
        s = concrete_float(self.s)
        if s is not None and not s > 0:
            raise ValueError(f"`VPCosine` needs s > 0; got s={s}.")
        _check_bounds("VPCosine", self.t_min, self.t_max)
        if not self.t_max < 1:
            raise ValueError(
                f"`VPCosine` needs t_max < 1 (α vanishes at t = 1); got {self.t_max}."
            )

    def _log_cos0(self, dtype) -> Array:
        s = cast(self.s, dtype)
        return jnp.log(jnp.cos(0.5 * jnp.pi * s / (1.0 + s)))

    def log_alpha(self, t: ArrayLike) -> Array:
        t = _float(t)
        s = cast(self.s, t.dtype)
        return jnp.log(jnp.cos(0.5 * jnp.pi * (t + s) / (1.0 + s))) - self._log_cos0(
            t.dtype
        )

    def log_sigma(self, t: ArrayLike) -> Array:
        return _vp_log_sigma(self.log_alpha(t))

    def t_of_lam(self, lam: ArrayLike) -> Array:
        lam = _float(lam)
        s = cast(self.s, lam.dtype)
        log_alpha = _vp_log_alpha_of_lam(lam)
        c = jnp.exp(log_alpha + self._log_cos0(lam.dtype))
        return 2.0 * (1.0 + s) / jnp.pi * jnp.arccos(c) - s


class VPDiscrete(AbstractSchedule):
    """A DDPM schedule given by its discrete betas (as diffusers stores them).

    With N betas, `ᾱ_n = ∏_{m≤n} (1 − β_m)` and the discrete step n (0-based, as
    in diffusers' `timesteps`) sits at continuous time t_n = (n + 1)/N, where
    log α_{t_n} = ½ log ᾱ_n exactly, and t = 0 has ᾱ = 1 (σ = 0: diffusers'
    `set_alpha_to_one` final step). Between these knots log α is interpolated
    piecewise-linearly in t (DPM-Solver's convention), σ² = 1 − α². The model's
    discrete timestep for a continuous t is `N t − 1` (`aj.discrete_timestep_model`
    wraps a model that wants it).

    **Zero terminal SNR.** The last beta may be exactly 1 (diffusers'
    `rescale_betas_zero_snr`): then ᾱ = 0 at t = 1 (`alpha_zero_time = 1.0`, pure
    noise), and on the last segment ᾱ itself is interpolated linearly (log α would
    be −∞ over the whole segment).

    `betas` may be traced (e.g. learned; then all of them must lie in (0, 1)):
    `log_alphas` is computed with JAX and differentiated by `aj.DTO()`. Concrete betas
    are accumulated in float64 whatever `jax_enable_x64` says. `t_of_lam` inverts the
    interpolation exactly (λ ↦ log α is closed form), so the round trip is exact to
    round-off.
    """

    log_alphas: Array
    t_min: float = eqx.field(static=True)
    t_max: float = eqx.field(static=True)
    alpha_zero_time: float | None = eqx.field(static=True, repr=False)

    def __init__(self, betas: ArrayLike):
        if isinstance(betas, type):
            raise TypeError("`VPDiscrete(betas)` needs an array of betas; got a class.")
        traced = isinstance(betas, jax.core.Tracer)
        shape = jnp.shape(betas) if traced else np.shape(betas)
        if len(shape) != 1 or shape[0] < 2:
            raise ValueError(
                "`VPDiscrete(betas)` needs a 1-D array of at least 2 betas; got shape "
                f"{shape}."
            )
        msg = (
            "`VPDiscrete(betas)` needs every beta in (0, 1) (the last one may be "
            "exactly 1: zero terminal SNR)."
        )
        n = shape[0]
        if traced:
            betas = _float(betas)
            bad = jnp.any((betas <= 0) | (betas >= 1) | ~jnp.isfinite(betas))
            log_alphas = 0.5 * jnp.cumsum(jnp.log1p(-betas))
            self.log_alphas = eqx.error_if(log_alphas, bad, msg)
            self.alpha_zero_time = None
        else:
            betas = np.asarray(betas, dtype=np.float64)
            inner, last = betas[:-1], betas[-1]
            if not (np.all((inner > 0) & (inner < 1)) and 0 < last <= 1):
                raise ValueError(msg)
            with np.errstate(divide="ignore"):
                self.log_alphas = np.asarray(0.5 * np.cumsum(np.log1p(-betas)))
            self.alpha_zero_time = 1.0 if last == 1.0 else None
        self.t_min = 1.0 / n
        self.t_max = 1.0

    @property
    def num_train_timesteps(self) -> int:
        return self.log_alphas.shape[0]

    def _knots(self, dtype) -> tuple[Array, Array]:
        """Knot times 0, 1/N, ..., 1 and log α there (0 at t = 0; −∞ at t = 1 under
        zero terminal SNR)."""
        n = self.num_train_timesteps
        knots = jnp.arange(n + 1, dtype=dtype) / n
        la = jnp.concatenate([jnp.zeros((1,), dtype), cast(self.log_alphas, dtype)])
        return knots, la

    def log_alpha(self, t: ArrayLike) -> Array:
        t = _float(t)
        knots, la = self._knots(t.dtype)
        idx = jnp.clip(jnp.searchsorted(knots, t, side="right") - 1, 0, knots.shape[0] - 2)
        t0, t1 = knots[idx], knots[idx + 1]
        l0, l1 = la[idx], la[idx + 1]
        w = (t - t0) / (t1 - t0)
        # A segment ending at ᾱ = 0 interpolates ᾱ linearly: log α = l0 + ½ log(1 − w).
        to_zero = jnp.isneginf(l1)
        linear = l0 + w * (jnp.where(to_zero, l0, l1) - l0)
        w_zero = jnp.where(to_zero, w, 0.0)
        return jnp.where(to_zero, l0 + 0.5 * jnp.log1p(-w_zero), linear)

    def log_sigma(self, t: ArrayLike) -> Array:
        return _vp_log_sigma(self.log_alpha(t))

    def t_of_lam(self, lam: ArrayLike) -> Array:
        lam = _float(lam)
        target = _vp_log_alpha_of_lam(lam)
        knots, la = self._knots(lam.dtype)
        neg_la = -la  # increasing in t, from 0 (possibly to +∞)
        idx = jnp.clip(
            jnp.searchsorted(neg_la, -target, side="right") - 1, 0, knots.shape[0] - 2
        )
        t0, t1 = knots[idx], knots[idx + 1]
        l0, l1 = neg_la[idx], neg_la[idx + 1]
        to_zero = jnp.isposinf(l1)
        linear = t0 + (-target - l0) * (t1 - t0) / (jnp.where(to_zero, l0 + 1.0, l1) - l0)
        # On a segment ending at ᾱ = 0: ᾱ = (1 − w) ᾱ0, so w = 1 − exp(2 (target + l0)).
        zero = t0 - jnp.expm1(2.0 * (target + l0)) * (t1 - t0)
        return jnp.where(to_zero, zero, linear)


class FlowMatching(AbstractSchedule):
    """The rectified-flow / flow-matching interpolation α_t = 1 − t, σ_t = t
    (diffusers' σ is this t).

    Not variance preserving (α² + σ² ≠ 1). λ = log((1 − t)/t), so
    `t_of_lam(λ) = sigmoid(−λ)`. Both ends have infinite log-SNR: the finite range is
    `[t_min, t_max]` (defaults 1e-4 and 1 − 1e-4), and a grid may also start exactly
    at t = 1 (`alpha_zero_time`, pure noise, where every flow model starts) and end at
    t = 0. Use `aj.as_eps(model, schedule, prediction="flow")` for a velocity network:
    it also supplies the data prediction that a step from t = 1 needs.
    """

    t_min: float = eqx.field(default=1e-4, static=True)
    t_max: float = eqx.field(default=1.0 - 1e-4, static=True)
    alpha_zero_time: float = eqx.field(default=1.0, static=True, repr=False)

    def __check_init__(self):
        _check_bounds("FlowMatching", self.t_min, self.t_max)
        if not self.t_max < 1:
            raise ValueError(
                "`FlowMatching` needs t_max < 1 (α vanishes at t = 1, which a grid may "
                f"still start from: `ts[0] = 1.0`); got t_max={self.t_max}."
            )

    def log_alpha(self, t: ArrayLike) -> Array:
        return jnp.log1p(-_float(t))

    def log_sigma(self, t: ArrayLike) -> Array:
        return jnp.log(_float(t))

    # Directly, not as exp(log ·): exact, and with derivatives that stay finite at
    # t = 1 and t = 0 (the velocity parameterisation needs α' and σ' at t = 1).
    def alpha(self, t: ArrayLike) -> Array:
        return 1.0 - _float(t)

    def sigma(self, t: ArrayLike) -> Array:
        return _float(t)

    def t_of_lam(self, lam: ArrayLike) -> Array:
        return 1.0 / (1.0 + jnp.exp(_float(lam)))


class VarianceExploding(AbstractSchedule):
    """The variance-exploding process y_t = x_0 + t ε of Karras et al. (2022, "EDM":
    σ(t) = t, s(t) = 1, so the time *is* the noise level), in `aj`'s state x = α_t y_t:

        α_t = 1/√(1 + t²),  σ_t = t/√(1 + t²),  λ_t = −log t,  t_of_lam(λ) = e^{−λ}.

    Every sampler of `aj` runs on it unchanged (they see α, σ and λ only); its x is
    the VE sample scaled by α_t (1 at t = 0, 1/√(1 + t_max²) at the noisy end), so
    x_T = α_T y_T and the VE result is x/α. A VE denoiser D(y; σ) (EDM's
    preconditioned network) gives the data prediction x̂_0 = D(x/α_t; t) and
    ε = (x − α_t x̂_0)/σ_t. t ∈ `[t_min, t_max]` (EDM's σ_min = 0.002, σ_max = 80 by
    default; both static bounds of the grids), and a grid may end at t = 0.
    """

    t_min: float = eqx.field(default=0.002, static=True)
    t_max: float = eqx.field(default=80.0, static=True)
    alpha_zero_time: None = eqx.field(default=None, static=True, repr=False)

    def __check_init__(self):
        _check_bounds("VarianceExploding", self.t_min, self.t_max)

    def log_alpha(self, t: ArrayLike) -> Array:
        return -0.5 * jnp.log1p(jnp.square(_float(t)))

    def log_sigma(self, t: ArrayLike) -> Array:
        t = _float(t)
        return jnp.log(t) - 0.5 * jnp.log1p(jnp.square(t))

    def t_of_lam(self, lam: ArrayLike) -> Array:
        return jnp.exp(-_float(lam))
