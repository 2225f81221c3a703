"""The Euler step with "churn" (Karras et al. 2022's stochasticity S_churn) exactly
as diffusers' `EulerDiscreteScheduler.step(s_churn=, s_tmin=, s_tmax=, s_noise=)`
runs it."""

import math
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractSampler, EpsFn, predict
from ._coeffs import step_coeffs


_PREDICTIONS = ("epsilon", "v_prediction", "sample")


class EulerChurn(AbstractSampler[tuple]):
    """Euler in the variance-exploding σ (y = x/α, ς = σ/α) with diffusers' churn: on a
    step from ς_t whose ς_t lies in [`s_tmin`, `s_tmax`], γ = min(`s_churn`/N, √2 − 1)
    (N = `num_sigmas`), ς̂ = ς_t (1 + γ), and

        ŷ = y + Δ,   Δ = s_noise √(ς̂² − ς_t²) ξ,   y_s = ŷ + (ς_s − ς̂) d,

    with d = (ŷ − x̂₀ᴰ)/ς̂ diffusers' derivative. Unlike Karras et al.'s Algorithm 2,
    diffusers evaluates the network *before* the churn, at (y, ς_t), and reads its
    output as if it had been evaluated at ŷ, differently per `prediction`:

    - "epsilon": x̂₀ᴰ = ŷ − ς̂ ε̂, so d = ε̂;
    - "sample": x̂₀ᴰ = x̂₀, so d = (ς_t ε̂ + Δ)/ς̂;
    - "v_prediction": x̂₀ᴰ = c_out v + ŷ/(ς_t² + 1) = x̂₀ + Δ/(ς_t² + 1), so
        d = (ς_t ε̂ + Δ ς_t²/(ς_t² + 1))/ς̂,

    (ε̂, x̂₀ the model's predictions at (x_t, t), y = x̂₀ + ς_t ε̂). In `aj`'s state,
    x_s = α_s y_s = (α_s/α_t) x_t + B ε̂ + C ξ. With γ = 0 (s_churn = 0, or ς_t outside
    the window) it is `aj.DPMSolver1()` (diffusers' Euler).

    **Noise.** `noise[i]` (a standard normal like x) is used by step i only where it
    churns; diffusers draws a normal only on those steps, so its k-th draw goes to
    the k-th churning step (`churn_steps(schedule, ts)` lists them) and the others
    may be anything (zeros).

    **Reproducing diffusers.** Replace the setup's sampler:
    `setup._replace(sampler=aj.EulerChurn(s_churn, s_tmin, s_tmax, s_noise,
    prediction=config["prediction_type"]))`. N is diffusers' `len(sigmas) − 1`: the
    grid's step count (`num_sigmas=None`) except with `interpolation_type=
    "log_linear"` (pass N + 1) and where `aj.from_diffusers` dropped an identity last
    step (`final_sigmas_type="sigma_min"` on a grid ending at σ_min: pass N; that
    step, which churns in diffusers, is not reproduced).

    **When to use it:** to reproduce pipelines run with `s_churn > 0`; for a sampler
    of the reverse SDE prefer `aj.DDIM(eta)` or `aj.SDEDPMSolver1()`, whose noise
    does not depend on the step count. **Order:** 1 for γ = 0; with churn it
    converges (weakly, order 1 in the mean) to a grid-dependent SDE: the added
    variance per step, 2γς², is O(1/N). **Cost:** one evaluation per step. **State:**
    x and γ. **Gradients:** `aj.DTO()` only (exact, also ∂L/∂noise): the continuous
    adjoints are refused (`continuous_adjoint_error`), since the step's limit SDE
    depends on the grid, not on a fixed factor of the ε-terms.
    """

    s_churn: float = eqx.field(default=0.0, static=True)
    s_tmin: float = eqx.field(default=0.0, static=True)
    s_tmax: float = eqx.field(default=math.inf, static=True)
    s_noise: float = eqx.field(default=1.0, static=True)
    num_sigmas: int | None = eqx.field(default=None, static=True)
    prediction: str = eqx.field(default="epsilon", static=True)

    order: ClassVar[int] = 1
    evals_per_step: ClassVar[int] = 1
    steps_to_sigma_zero: ClassVar[bool] = True
    steps_from_alpha_zero: ClassVar[bool] = False

    def __check_init__(self):
        for field in ("s_churn", "s_tmin", "s_tmax", "s_noise"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ValueError(
                    f"`EulerChurn({field}=...)` must be a Python number >= 0; got "
                    f"{v!r}."
                )
        n = self.num_sigmas
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(
                f"`EulerChurn(num_sigmas=...)` must be None or an int >= 1; got {n!r}."
            )
        if self.prediction not in _PREDICTIONS:
            raise ValueError(
                f"`EulerChurn(prediction=...)` must be one of {_PREDICTIONS} "
                "(diffusers' "
                f"prediction_type); got {self.prediction!r}."
            )

    @property
    def is_sde(self) -> bool:
        return self.s_churn > 0

    @property
    def continuous_adjoint_error(self) -> str | None:
        if not self.is_sde:
            return None
        return (
            "its churn adds noise of variance 2γς² with γ = s_churn/N per step, whose "
            "continuous limit depends on the grid, so the continuous adjoint has no "
            "fixed factor on its ε-terms; use `adjoint=aj.DTO()` (exact, also for the "
            "noise)"
        )

    def _gamma(self, num_steps: int) -> float:
        n = num_steps if self.num_sigmas is None else self.num_sigmas
        return min(self.s_churn / n, 2**0.5 - 1)

    def churn_steps(self, schedule: AbstractSchedule, ts) -> np.ndarray:
        """The indices of the steps that churn (and draw a normal in diffusers)."""
        ts = np.asarray(ts, np.float64)
        sig = np.exp(-np.asarray(schedule.lam(jnp.asarray(ts[:-1])), np.float64))
        if self._gamma(len(ts) - 1) == 0:
            return np.zeros((0,), np.int64)
        return np.nonzero((self.s_tmin <= sig) & (sig <= self.s_tmax))[0]

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array):
        del schedule
        return (x_T, jnp.asarray(self._gamma(ts.shape[0] - 1), ts.dtype))

    # y_s = ŷ + (ς_s − ς̂) d with ŷ = y + Δ, times α_s (module docstring for d):
    #   x_s = (α_s/α_t) x + α_s (ς_s − ς̂) w ε̂ + α_s (1 + (ς_s − ς̂) k/ς̂) Δ,
    # w = 1 for "epsilon" (k = 0), else ς_t/ς̂ with k = 1 ("sample") or ς_t²/(ς_t² + 1).
    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del i
        x, gamma = state
        c = step_coeffs(schedule, t, s)
        e, _ = predict(eps, schedule, x, t, derive=False)
        sig, sig_s = c.sigma_t / c.alpha_t, c.sigma_s / c.alpha_s
        on = (self.s_tmin <= sig) & (sig <= self.s_tmax)
        g = jnp.where(on, gamma, jnp.zeros_like(gamma))
        hat = sig * (g + 1)
        # √(ς̂² − ς²) = ς √(γ (γ + 2)), its square root kept off 0 (no inf derivative).
        on = g > 0
        root = jnp.where(on, jnp.sqrt(jnp.where(on, g * (g + 2), 1.0)), 0.0)
        delta = self.s_noise * sig * root
        if self.prediction == "epsilon":
            w, k = jnp.ones_like(sig), jnp.zeros_like(sig)
        else:
            w = sig / hat
            k = (
                jnp.ones_like(sig)
                if self.prediction == "sample"
                else sig**2 / (sig**2 + 1)
            )
        a_s = c.alpha_s
        b = a_s * (sig_s - hat) * w
        churn = a_s * (1 + (sig_s - hat) * k / hat) * delta
        x_s = lincomb(
            (c.alpha_ratio, x), (b, e), (churn, noise if self.is_sde else None)
        )
        return (x_s, gamma)

    def output(self, state) -> PyTree:
        return state[0]


EulerChurn.__init__.__doc__ = """**Arguments:** as diffusers'
`EulerDiscreteScheduler.step`:

- `s_churn`: the stochasticity (γ = min(s_churn/N, √2 − 1); 0: plain Euler).
- `s_tmin`, `s_tmax`: the window of ς = σ/α (diffusers' σ) where steps churn.
- `s_noise`: the scale of the added noise.
- `num_sigmas`: N, diffusers' `len(scheduler.sigmas) − 1` (None: the grid's step
    count, which it is unless the class docstring says otherwise).
- `prediction`: the network's `prediction_type` ("epsilon", "v_prediction",
    "sample"), which changes how diffusers reads the output after the churn.
"""
