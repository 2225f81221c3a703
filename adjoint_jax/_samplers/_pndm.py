"""PNDM (Liu et al. 2022): pseudo linear multistep (PLMS) and pseudo Runge–Kutta
(F-PNDM) steps over the DDIM transfer, as diffusers' `PNDMScheduler` runs them."""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractSampler, EpsFn, predict
from ._coeffs import step_coeffs


# Adams–Bashforth weights for 1–4 outputs (newest first), in the step index.
_AB = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


class PNDM(AbstractSampler[tuple]):
    """PNDM (Liu et al. 2022), the pseudo numerical method of diffusion models, as
    diffusers' `PNDMScheduler` runs it (Stable Diffusion 1.x ships it with
    `skip_prk_steps=True`: PLMS).

    **The transfer** (the "pseudo" part): every step moves x from t to s with the
    DDIM step of a noise estimate ε̃,

        x_s = (α_s/α_t) x_t − σ_s (e^h − 1) ε̃,   h = λ_s − λ_t

    (PNDM's eq. (9), `_get_prev_sample`; at σ_s = 0 it is α_s (x_t − σ_t ε̃)/α_t),
    and the numerical method only decides ε̃:

    - **PLMS** (`prk=False`): ε̃ is the Adams–Bashforth extrapolation, with the
        weights of equal steps in the step index, of the outputs e_i, e_{i−1}, … of
        the current and up to three earlier steps: e_i; (3e_i − e_{i−1})/2;
        (23e_i − 16e_{i−1} + 5e_{i−2})/12; (55e_i − 59e_{i−1} + 37e_{i−2}
        − 9e_{i−3})/24. Step 0 has no history and is Heun's step on the transfer:
        ε̃ = (e(x_t, t) + e(x̄_s, s))/2 with x̄_s the transfer of e(x_t, t) (its
        second output is not kept). N + 1 model evaluations.
    - **F-PNDM** (`prk=True`): steps 0–2 are pseudo-RK4 steps with the midpoint
        m = (t + s)/2: e₁ = e(x_t, t), e₂ = e(x_a, m), e₃ = e(x_b, m), e₄ = e(x_c, s),
        x_a, x_b, x_c the transfers of e₁ to m, e₂ to m, e₃ to s, and ε̃ = (e₁ + 2e₂ +
        2e₃ + e₄)/6; then Adams–Bashforth (4 outputs from step 3 on, e₁ of each RK
        step kept). N + 9 model evaluations.

    `combine="v"` forms these combinations on the velocity v = α ε − σ x̂_0 instead
    of ε and converts the combination at the step's start, ε̃ = α_t ṽ + σ_t x_t: this
    is what diffusers does for a `v_prediction` network (it combines the network's
    raw outputs); the conversion is the VP one (α² + σ² = 1).

    **Order:** 2. The Adams–Bashforth weights assume equal steps, while the transfer
    integrates exactly in ρ = σ/α, whose steps are unequal on every diffusers grid;
    the local error is then O(h³) (measured on the closed-form Gaussian, PLMS and
    F-PNDM alike: slopes 2.1, 2.05, 2.02 from N = 20 to 160; 1.9–2.0 on a Gaussian
    mixture). With `combine="v"` it is **first order** (slopes 0.97, 0.98, 0.99):
    v = α ε − σ x̂_0 extrapolated over earlier steps but converted with the current
    α_t, σ_t, x_t is an O(h) wrong ε̃ — diffusers' `v_prediction` PNDM has that
    error, and this option reproduces it.

    **When to use it:** to reproduce Stable Diffusion 1.x's default sampler
    (`aj.from_diffusers` with its `PNDMScheduler` config). **Cost:** one model
    evaluation per step, plus one on step 0 (PLMS; run outside `aj.sample`'s scan) or
    three more on each of steps 0–2 (F-PNDM, a `lax.cond`). **Memory:** x and the
    three previous outputs. **Gradients:** `aj.DTO()` (exact); the continuous
    adjoints (`aj.AdjointDEIS`, `aj.RecordedAdjoint`, `aj.InterpolatedAdjoint`) and
    `aj.AdjointDPM` treat it as an ODE sampler; not `aj.ReversibleAdjoint`.
    """

    prk: bool = eqx.field(default=False, static=True)
    combine: str = eqx.field(default="eps", static=True)

    is_sde: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 1
    steps_to_sigma_zero: ClassVar[bool] = True
    steps_from_alpha_zero: ClassVar[bool] = False

    def __check_init__(self):
        if not isinstance(self.prk, bool):
            raise TypeError(f"`PNDM(prk=...)` must be a bool; got {self.prk!r}.")
        if self.combine not in ("eps", "v"):
            raise ValueError(
                f"`PNDM(combine=...)` must be 'eps' or 'v'; got {self.combine!r}."
            )

    @property
    def order(self) -> int:
        """2 (1 with `combine="v"`: see the docstring)."""
        return 1 if self.combine == "v" else 2

    @property
    def startup_eval(self) -> bool:
        # PLMS's step 0 evaluates twice; F-PNDM's RK steps take a `lax.cond` instead.
        return not self.prk

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array):
        del schedule, ts
        zeros = jtu.tree_map(jnp.zeros_like, x_T)
        return (x_T, (zeros, zeros, zeros))

    # ---- the network's output, its conversion, the transfer ----------------------
    def _raw(self, eps, schedule, x, t):
        """e(x, t): ε, or v = α ε − σ x̂_0."""
        e, x0 = predict(eps, schedule, x, t, derive=self.combine == "v")
        if self.combine == "eps":
            return e
        return lincomb((schedule.alpha(t), e), (-schedule.sigma(t), x0))

    def _transfer(self, schedule, x, t, s, comb):
        """The DDIM step t → s of ε̃ (`comb` converted at (x, t))."""
        if self.combine == "v":
            comb = lincomb((schedule.alpha(t), comb), (schedule.sigma(t), x))
        c = step_coeffs(schedule, t, s)
        return lincomb((c.alpha_ratio, x), (-c.sigma_phi1, comb))

    # ---- the three kinds of step -------------------------------------------------
    def _heun(self, eps, schedule, x, t, s, e0):
        # Heun's method in the transfer: the predictor is the transfer of e0, the
        # corrector the transfer of the mean slope (trapezoidal rule in ρ).
        x_bar = self._transfer(schedule, x, t, s, e0)
        e1 = self._raw(eps, schedule, x_bar, s)
        return self._transfer(schedule, x, t, s, lincomb((0.5, e0), (0.5, e1)))

    def _runge_kutta(self, eps, schedule, x, t, s, e1):
        # Classical RK4 in ρ with every stage a transfer from (x, t): the stages'
        # slopes at t, m, m, s are combined with weights 1/6, 1/3, 1/3, 1/6.
        m = 0.5 * (t + s)
        e2 = self._raw(eps, schedule, self._transfer(schedule, x, t, m, e1), m)
        e3 = self._raw(eps, schedule, self._transfer(schedule, x, t, m, e2), m)
        e4 = self._raw(eps, schedule, self._transfer(schedule, x, t, s, e3), s)
        comb = lincomb((1 / 6, e1), (1 / 3, e2), (1 / 3, e3), (1 / 6, e4))
        return self._transfer(schedule, x, t, s, comb)

    def _adams_bashforth(self, schedule, x, t, s, e, hist, i):
        # Adams–Bashforth with q = min(i + 1, 4) outputs: the extrapolation of the
        # output polynomial through the last q steps, integrated over the next one,
        # for equal steps (weights in the step index).
        q = jnp.minimum(i, 3)
        outs = (e, *hist)
        weights = [
            jnp.select([q == k for k in range(4)],
                       [jnp.asarray(_AB[k][j] if j <= k else 0.0) for k in range(4)])
            for j in range(4)
        ]
        comb = lincomb(*zip(weights, outs))
        return self._transfer(schedule, x, t, s, comb)

    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del noise
        x, hist = state
        e = self._raw(eps, schedule, x, t)
        new_hist = (e, hist[0], hist[1])
        multistep = lambda: self._adams_bashforth(schedule, x, t, s, e, hist, i)
        if not getattr(eps, "may_be_first", True) and not self.prk:
            return (multistep(), new_hist)
        if self.prk:
            rk = lambda: self._runge_kutta(eps, schedule, x, t, s, e)
            return (jax.lax.cond(i < 3, rk, multistep), new_hist)
        heun = lambda: self._heun(eps, schedule, x, t, s, e)
        return (jax.lax.cond(i == 0, heun, multistep), new_hist)

    def output(self, state) -> PyTree:
        return state[0]


PNDM.__init__.__doc__ = """**Arguments:**

- `prk`: F-PNDM's pseudo-Runge–Kutta warm-up (three RK4 steps; diffusers'
    `skip_prk_steps=False`) instead of PLMS's Heun first step (default False).
- `combine`: `"eps"` (default) or `"v"`: the output the multistep and RK
    combinations are formed on (diffusers combines a `v_prediction` network's raw v).
"""
