"""DDIM with its stochasticity η (Song et al. 2021): η = 0 is DPM-Solver-1, η = 1 the
DDPM posterior (ancestral sampling)."""

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractMultistepSampler, AbstractSDESampler, EpsFn, predict
from ._coeffs import step_coeffs
from ._dpm_solver import multistep_update


def _ddim_coeffs(schedule, t, s, eta: float):
    """For the step t → s (s < t): the coefficients of x_s = A x + B ε + C ξ in the
    noise-prediction form, of x_s = α_s x̂_0 + D ε + C ξ in the data form, and the
    step's coefficients.

    With h = λ_s − λ_t and u = η² (1 − e^{−2h}), the noise's standard deviation is
    C = η σ_s √(1 − e^{−2h}) (diffusers' `std_dev_t = η √variance`, variance
    = (σ_s²/σ_t²)(1 − α_t²/α_s²) for a VP schedule), the direction to ε̂ gets
    D = √(σ_s² − C²) = σ_s √(1 − u), and since x̂_0 = (x − σ_t ε)/α_t,
    A = α_s/α_t and B = −(α_s σ_t/α_t − D) = −[σ_s (e^h − 1) + σ_s u/(1 + √(1 − u))].
    Every term stays finite at σ_s = 0 (C = D = 0: the data prediction).
    """
    c = step_coeffs(schedule, t, s)
    # 1 − e^{−2h}: 1 at an endpoint (e^{−h} = 0 there, h itself is stored as 0).
    one_minus = jnp.where(c.exp_neg_h == 0, 1.0, -jnp.expm1(-2.0 * c.h))
    u = eta**2 * one_minus
    root = jnp.sqrt(1.0 - u)
    noise = eta * c.sigma_s * jnp.sqrt(one_minus)
    direct = c.sigma_s * root
    b = -(c.sigma_phi1 + c.sigma_s * u / (1.0 + root))
    return c, c.alpha_ratio, b, direct, noise


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
    `aj.sample(..., key=...)` or `noise=...` (step i uses noise i). It matches
    diffusers' `DDIMScheduler.step(..., eta=η, variance_noise=noise[i])` (with
    `clip_sample=False`) on the grid of `aj.diffusers_timesteps`.

    **Order:** 1 (strong order 1/2 in the noise for η > 0). **Cost:** one model
    evaluation per step. **Gradients:** `aj.DTO()` (exact, also ∂L/∂noise),
    `aj.RecordedAdjoint`, `aj.AdjointDEIS` (continuous adjoints, factor 1 + η²).
    """

    eta: float = eqx.field(default=0.0, static=True)

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

    @property
    def is_sde(self) -> bool:
        return self.eta > 0

    @property
    def adjoint_factor(self) -> float:
        return 1.0 + self.eta**2

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> PyTree:
        del schedule, ts
        return x_T

    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del i
        e, x0 = predict(eps, schedule, state, t, derive=False)
        if self.eta == 0:
            return multistep_update(schedule, state, e, None, t, s, None, True, x0)
        c, a, b, direct, scale = _ddim_coeffs(schedule, t, s, self.eta)
        eps_form = lincomb((a, state), (b, e), (scale, noise))
        if x0 is None:  # an ε-model (refused at α = 0)
            return eps_form
        data_form = lincomb((c.alpha_s, x0), (direct, e), (scale, noise))
        return jtu.tree_map(
            lambda u, v: jnp.where(c.alpha_zero_start, u, v), data_form, eps_form
        )

    def update(self, schedule, x, e, e_prev, t, s, r, first, x0=None):
        # The deterministic update (McCallumFoster's base; only with η = 0).
        del e_prev, r, first
        return multistep_update(schedule, x, e, None, t, s, None, True, x0)

    # The forward step s → t is x_t = A x_s + B ε(x_s, s) + C ξ; its inverse with
    # ε(x_s, s) replaced by ε(x_t, t) is x_s = (x_t − B ε − C ξ)/A.
    def invert_step(self, schedule, x, e, t, s, noise):
        _, a, b, _, scale = _ddim_coeffs(schedule, s, t, self.eta)
        return lincomb((1.0 / a, x), (-b / a, e), (-scale / a, noise))

    def noise_scale(self, schedule, t, s):
        return _ddim_coeffs(schedule, t, s, self.eta)[4]

    def output(self, state: PyTree) -> PyTree:
        return state


DDIM.__init__.__doc__ = """**Arguments:**

- `eta`: η ∈ [0, 1] (a Python number): 0 deterministic (= `aj.DPMSolver1()`), 1 the
    DDPM posterior.
"""
