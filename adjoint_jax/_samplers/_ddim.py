"""DDIM with its stochasticity η (Song et al. 2021): η = 0 is DPM-Solver-1, η = 1 the
DDPM posterior (ancestral sampling); with diffusers' options on the data prediction
(`clip_sample`, `thresholding`, `use_clipped_model_output`) and DDPM's variances."""

from typing import ClassVar, NamedTuple

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractMultistepSampler, AbstractSDESampler, EpsFn, predict
from ._coeffs import StepCoeffs, step_coeffs
from ._dpm_solver import multistep_update
from ._x0_clip import clip_sample, dynamic_threshold


_VARIANCES = ("eta", "fixed_small", "fixed_large")
# diffusers' DDPMScheduler clamps its posterior variance to at least this ("we always
# take the log of variance"): the only place it shows is a last step to ᾱ = 1 from a
# timestep > 0, whose variance 0 becomes a standard deviation of 1e-10.
_DDPM_MIN_VARIANCE = 1e-20


class _Coeffs(NamedTuple):
    c: StepCoeffs
    a: Array  # x_s = a x + b ε + scale ξ (noise-prediction form)
    b: Array
    direct: Array  # x_s = α_s x̂_0 + direct ε + scale ξ (data form)
    scale: Array
    x0_coeff: Array  # x_s = x0_coeff x̂_0 + x_coeff x + scale ξ (ε from x̂_0)
    x_coeff: Array


def _ddim_coeffs(schedule, t, s, sampler: "DDIM") -> _Coeffs:
    """The coefficients of the step t → s (s < t) in its three forms.

    With h = λ_s − λ_t and u = η² (1 − e^{−2h}) (η = 1 for DDPM's variances), the
    mean's direction to ε̂ is D = σ_s √(1 − u) (diffusers' `√(1 − ᾱ_prev − std²)`,
    with std = η σ_s √(1 − e^{−2h}) = η √variance, variance = (σ_s²/σ_t²)(1 − α_t²/
    α_s²) for a VP schedule), and since x̂_0 = (x − σ_t ε)/α_t, A = α_s/α_t and
    B = −(α_s σ_t/α_t − D) = −[σ_s (e^h − 1) + σ_s u/(1 + √(1 − u))]. With ε taken
    from x̂_0 instead, ε = (x − α_t x̂_0)/σ_t, the mean α_s x̂_0 + D ε is
    α_s (1 − e^{−h} √(1 − u)) x̂_0 + (σ_s/σ_t) √(1 − u) x, and
    1 − e^{−h} √(1 − u) = (1 − e^{−h}) + e^{−h} u/(1 + √(1 − u)) without cancellation.
    The noise's standard deviation is η σ_s √(1 − e^{−2h}) for η (DDIM), DDPM's
    posterior √(max(variance, 1e-20)) ("fixed_small") or √(1 − α_t²/α_s²), the
    forward β between the two times ("fixed_large"); on a step to σ_s = 0 it is 0
    unless `final_noise`. Every term stays finite at σ_s = 0 and from α_t = 0.
    """
    c = step_coeffs(schedule, t, s)
    eta = sampler.eta if sampler.variance == "eta" else 1.0
    # 1 − e^{−2h}: 1 at an endpoint (e^{−h} = 0 there, h itself is stored as 0).
    one_minus = jnp.where(c.exp_neg_h == 0, 1.0, -jnp.expm1(-2.0 * c.h))
    u = eta**2 * one_minus
    root = jnp.sqrt(1.0 - u)
    tail = u / (1.0 + root)
    one_minus_e = jnp.where(c.exp_neg_h == 0, 1.0, -jnp.expm1(-c.h))  # 1 − e^{−h}
    if sampler.variance == "eta":
        scale = sampler.eta * c.sigma_s * jnp.sqrt(one_minus)
    else:
        if sampler.variance == "fixed_small":
            var = jnp.maximum(c.sigma_s**2 * one_minus, _DDPM_MIN_VARIANCE)
        else:
            var = 1.0 - (c.alpha_t / c.alpha_s) ** 2
        scale = jnp.sqrt(var)
        if not sampler.final_noise:
            scale = jnp.where(c.sigma_zero_end, jnp.zeros_like(scale), scale)
    return _Coeffs(
        c=c,
        a=c.alpha_ratio,
        b=-(c.sigma_phi1 + c.sigma_s * tail),
        direct=c.sigma_s * root,
        scale=scale,
        x0_coeff=c.alpha_s * (one_minus_e + c.exp_neg_h * tail),
        x_coeff=c.sigma_ratio * root,
    )


def _number(value, what: str, lo: float, hi: float = float("inf")) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not lo < value <= hi:
        raise ValueError(f"`DDIM({what}=...)` must be a Python number in ({lo}, {hi}]; "
                         f"got {value!r}.")


class DDIM(AbstractSDESampler[PyTree], AbstractMultistepSampler[PyTree]):
    """DDIM (Song et al. 2021) with stochasticity η ∈ [0, 1]: step t → s,

        x_s = α_s x̂_0 + √(σ_s² − c²) ε̂ + c ξ,   c = η σ_s √(1 − e^{−2(λ_s − λ_t)}),

    with x̂_0 = (x_t − σ_t ε̂)/α_t (or the model's own data prediction), ε̂ the model's
    noise prediction and ξ the step's standard normal noise.

    - **η = 0** is deterministic and identical to `aj.DPMSolver1()`.
    - **η = 1** is the DDPM posterior q(x_s | x_t, x̂_0) (ancestral sampling, diffusers'
        `DDPMScheduler`): the "memoryless" sampler of noise optimisation and Adjoint
        Matching.
    - In between it interpolates; as the steps shrink it converges to the reverse SDE
        dx = [f x + ((1 + η²)/2)(g²/σ) ε] dt + η g dw̄, whose continuous adjoint is the
        probability-flow one with the ε-terms multiplied by 1 + η²
        (`adjoint_factor`), which `aj.AdjointDEIS` and `aj.RecordedAdjoint` use.

    A last step to σ = 0 is the data prediction (no noise: diffusers'
    `set_alpha_to_one=True`), and a first step from α = 0 (zero terminal SNR, a flow
    model at t = 1) uses the model's data prediction. With η > 0 it needs
    `aj.sample(..., key=...)` or `noise=...` (step i uses noise i, one standard
    normal like x per step). It matches diffusers' `DDIMScheduler.step(..., eta=η,
    variance_noise=noise[i])` and `DDPMScheduler.step` (with their `clip_sample`,
    `thresholding`, `variance_type` through the options below) on the grid of
    `aj.diffusers_timesteps`; `aj.from_diffusers` sets the options from a config.

    **Options on x̂_0 (diffusers').** `clip_sample=r` clamps x̂_0 to [−r, r] and
    `thresholding=(ratio, max_value)` applies Imagen's dynamic thresholding (per
    batch element, the leading axis of each leaf: s = the `ratio`-quantile of |x̂_0|
    clamped to [1, max_value]; x̂_0 ↦ clamp(x̂_0, −s, s)/s) before the step. ε̂ stays
    the model's unless `clipped_eps=True` (diffusers' `use_clipped_model_output`;
    `DDPMScheduler` always), which re-derives it from the transformed x̂_0 as
    (x_t − α_t x̂_0)/σ_t. Both are piecewise linear: the sampler is differentiable
    almost everywhere, with the derivative torch's autograd gives diffusers (the
    bound of a clamp included), which `aj.DTO()` and `aj.Truncated` return. The
    continuous adjoints and `aj.ReversibleAdjoint` refuse it (their derivation
    assumes the smooth ODE/SDE the unclipped sampler discretises).

    **DDPM's variances.** `variance="fixed_small"` (DDPM's posterior variance, = η = 1
    but clamped to ≥ 1e-20 as diffusers does) or `"fixed_large"` (the forward
    β = 1 − α_t²/α_s² of the step, Ho et al.'s upper bound) keeps the η = 1 posterior
    mean (`eta` must be 1) and changes only the noise; `final_noise=True` adds it on
    a step to σ = 0 too, as `DDPMScheduler` does when its last timestep is not 0
    (std 1e-10 for "fixed_small", σ_t for "fixed_large").

    **Targets.** `targets=(s_0, ..., s_{N−1})` sends step i to s_i instead of
    `ts[i + 1]` (its result then stands for the state at `ts[i + 1]`): diffusers'
    DDIM steps from timestep n to n − T // N, which misses the next 'trailing'
    timestep by one when N does not divide T.

    **Order:** 1 (strong order 1/2 in the noise for η > 0). With `clip_sample`
    active it still converges at order 1, to the limit of its own (Lipschitz,
    piecewise smooth) dynamics (slope 0.97 for N = 10–40 on Gaussian data,
    tests/test_diffusers_ddim.py). Dynamic thresholding with s > 1 has no such
    limit: s > 1 on about every other step (a chattering rescale of all of x̂_0) and
    x_0 stops settling as N grows (successive differences 0.22, 0.12, 0.065, 0.040,
    0.021, 0.018, 0.025 for N = 10, 20, …, 1280 on the same data): use it at the
    step count it is meant for. **Cost:** one model evaluation per step; no memory
    beyond x (thresholding sorts each batch element's |x̂_0|).
    **Gradients:** `aj.DTO()` (exact, also ∂L/∂noise) and `aj.Truncated` always;
    without options on x̂_0 or `targets`, `aj.RecordedAdjoint`, `aj.AdjointDEIS` (continuous
    adjoints, factor 1 + η², 2 for DDPM's variances) and, for η = 0, `aj.AdjointDPM`,
    `aj.InterpolatedAdjoint` and `aj.McCallumFoster(aj.DDIM())`.
    """

    eta: float = eqx.field(default=0.0, static=True)
    clip_sample: float | None = eqx.field(default=None, static=True)
    thresholding: tuple[float, float] | None = eqx.field(default=None, static=True)
    clipped_eps: bool = eqx.field(default=False, static=True)
    variance: str = eqx.field(default="eta", static=True)
    final_noise: bool = eqx.field(default=False, static=True)
    targets: tuple[float, ...] | None = eqx.field(default=None, static=True)

    order: ClassVar[int] = 1
    evals_per_step: ClassVar[int] = 1
    steps_to_sigma_zero: ClassVar[bool] = True
    steps_from_alpha_zero: ClassVar[bool] = True
    memory: ClassVar[int] = 0

    def __check_init__(self):
        if isinstance(self.eta, bool) or not isinstance(self.eta, int | float):
            raise TypeError(
                f"`DDIM(eta=...)` must be a Python number in [0, 1]; got {self.eta!r}."
            )
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"`DDIM(eta=...)` must lie in [0, 1]; got {self.eta!r}.")
        if self.clip_sample is not None:
            _number(self.clip_sample, "clip_sample", 0.0)
        if self.thresholding is not None:
            if not isinstance(self.thresholding, tuple) or len(self.thresholding) != 2:
                raise ValueError(
                    "`DDIM(thresholding=...)` must be a tuple (ratio, max_value); got "
                    f"{self.thresholding!r}."
                )
            _number(self.thresholding[0], "thresholding[0] (the ratio)", 0.0, 1.0)
            _number(self.thresholding[1], "thresholding[1] (sample_max_value)", 0.0)
            if self.clip_sample is not None:
                raise ValueError(
                    "`DDIM(clip_sample=..., thresholding=...)`: pass one of them "
                    "(diffusers ignores clip_sample when thresholding is on)."
                )
        if self.variance not in _VARIANCES:
            raise ValueError(
                f"`DDIM(variance=...)` must be one of {_VARIANCES}; got "
                f"{self.variance!r}."
            )
        if self.variance != "eta" and self.eta != 1.0:
            raise ValueError(
                f"`DDIM(variance={self.variance!r})` is DDPM's step, whose mean is the "
                f"η = 1 posterior mean: pass eta=1.0 (got eta={self.eta!r})."
            )
        if self.targets is not None and (
            not isinstance(self.targets, tuple)
            or not all(isinstance(v, float) for v in self.targets)
        ):
            raise ValueError(
                "`DDIM(targets=...)` must be a tuple of Python floats (one time per "
                f"step); got {self.targets!r}."
            )
        if self.final_noise and self.variance == "eta":
            raise ValueError(
                "`DDIM(final_noise=True)` needs DDPM's `variance='fixed_small'` or "
                "'fixed_large' (DDIM's noise vanishes on a step to σ = 0)."
            )

    @property
    def is_sde(self) -> bool:
        return self.eta > 0 or self.variance != "eta"

    @property
    def adjoint_factor(self) -> float:
        # DDPM's variances converge to the η = 1 posterior's as the steps shrink.
        return 1.0 + (1.0 if self.variance != "eta" else self.eta**2)

    @property
    def continuous_adjoint_error(self) -> str | None:
        """Why the continuous adjoints and `aj.ReversibleAdjoint` cannot
        differentiate this sampler (None: they can)."""
        if self.targets is not None:
            return (
                "its steps go to `targets`, not to the grid's next time, so it "
                "discretises no ODE/SDE on the grid; its gradient is aj.DTO()'s or "
                "aj.Truncated's"
            )
        if self.clip_sample is not None:
            r = self.clip_sample
            what = f"clamps x̂_0 to [−{r}, {r}] (clip_sample)"
        elif self.thresholding is not None:
            what = "applies dynamic thresholding to x̂_0 (thresholding)"
        else:
            return None
        return (
            f"it {what} at every step, which is not the smooth probability-flow "
            "ODE/SDE their adjoint equations (or inverse steps) assume"
        )

    def _transform(self, x0: PyTree) -> PyTree:
        if self.thresholding is not None:
            return dynamic_threshold(x0, *self.thresholding)
        if self.clip_sample is not None:
            return clip_sample(x0, self.clip_sample)
        return x0

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> PyTree:
        del schedule
        if self.targets is not None and len(self.targets) != ts.shape[0] - 1:
            raise ValueError(
                f"`DDIM(targets=...)` has {len(self.targets)} times but the grid has "
                f"{ts.shape[0] - 1} steps; pass one target per step."
            )
        return x_T

    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        if self.targets is not None:
            # Step i goes to its own target; the result is the state at ts[i + 1].
            s = jnp.asarray(self.targets, jnp.result_type(t))[i]
        if self.clip_sample is None and self.thresholding is None:
            return self._plain_step(eps, schedule, state, t, s, noise)
        e, x0 = predict(eps, schedule, state, t)
        x0 = self._transform(x0)
        k = _ddim_coeffs(schedule, t, s, self)
        if self.clipped_eps:
            # ε re-derived from the transformed x̂_0: ε = (x − α_t x̂_0)/σ_t in the
            # mean α_s x̂_0 + D ε (see `_ddim_coeffs`); DDPM's posterior mean
            # (√ᾱ_s β/(1 − ᾱ_t)) x̂_0 + (√α (1 − ᾱ_s)/(1 − ᾱ_t)) x_t is this at η = 1.
            return lincomb((k.x0_coeff, x0), (k.x_coeff, state), (k.scale, noise))
        # diffusers' DDIM: the transformed x̂_0 with the model's own ε.
        return lincomb((k.c.alpha_s, x0), (k.direct, e), (k.scale, noise))

    def _plain_step(self, eps, schedule, state, t, s, noise):
        e, x0 = predict(eps, schedule, state, t, derive=False)
        if not self.is_sde:
            return multistep_update(schedule, state, e, None, t, s, None, True, x0)
        k = _ddim_coeffs(schedule, t, s, self)
        # x̂_0 = (x − σ_t ε)/α_t in the data form gives the noise-prediction form
        # A x + B ε + C ξ (see `_ddim_coeffs`); from α_t = 0 the data form itself.
        eps_form = lincomb((k.a, state), (k.b, e), (k.scale, noise))
        if x0 is None:  # an ε-model (refused at α = 0)
            return eps_form
        data_form = lincomb((k.c.alpha_s, x0), (k.direct, e), (k.scale, noise))
        return jtu.tree_map(
            lambda u, v: jnp.where(k.c.alpha_zero_start, u, v), data_form, eps_form
        )

    def update(self, schedule, x, e, e_prev, t, s, r, first, x0=None):
        # The deterministic update (McCallumFoster's base; only with η = 0).
        del e_prev, r, first
        if self.continuous_adjoint_error is not None:
            raise ValueError(
                f"`{self!r}` has no update in (x, ε) alone for `aj.McCallumFoster`: "
                f"{self.continuous_adjoint_error}."
            )
        return multistep_update(schedule, x, e, None, t, s, None, True, x0)

    # The forward step s → t is x_t = A x_s + B ε(x_s, s) + C ξ; its inverse with
    # ε(x_s, s) replaced by ε(x_t, t) is x_s = (x_t − B ε − C ξ)/A.
    def invert_step(self, schedule, x, e, t, s, noise):
        k = _ddim_coeffs(schedule, s, t, self)
        return lincomb((1.0 / k.a, x), (-k.b / k.a, e), (-k.scale / k.a, noise))

    def noise_scale(self, schedule, t, s):
        return _ddim_coeffs(schedule, t, s, self).scale

    def output(self, state: PyTree) -> PyTree:
        return state


DDIM.__init__.__doc__ = """**Arguments:**

- `eta`: η ∈ [0, 1] (a Python number): 0 deterministic (= `aj.DPMSolver1()`), 1 the
    DDPM posterior.
- `clip_sample`: None (default), or r > 0: x̂_0 clamped to [−r, r] at every step
    (diffusers' `clip_sample=True` with `clip_sample_range=r`).
- `thresholding`: None (default), or `(ratio, max_value)`: dynamic thresholding of
    x̂_0 (diffusers' `dynamic_thresholding_ratio`, `sample_max_value`); each leaf of x
    needs a leading batch axis and at least one more.
- `clipped_eps`: re-derive ε from the transformed x̂_0 (diffusers'
    `use_clipped_model_output=True`; DDPM's step). Default False.
- `variance`: "eta" (default, DDIM's), or DDPM's "fixed_small" / "fixed_large"
    (with eta=1).
- `final_noise`: with DDPM's variances, add noise on a step to σ = 0 as well
    (diffusers' `DDPMScheduler` whose last timestep is not 0). Default False.
- `targets`: None (default), or one time per step (Python floats): step i goes
    from `ts[i]` to `targets[i]`, and its result is taken as the state at
    `ts[i + 1]` (diffusers' `DDIMScheduler`, which steps from timestep n to
    n − T // N, with 'trailing' timesteps T/N apart up to rounding).
"""
