"""SDE-DPM-Solver++ (Lu et al. 2022c): the multistep exponential integrator of the
reverse diffusion SDE in the data prediction, orders 1–3, as diffusers'
`DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")` runs it."""

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractSDESampler, EpsFn
from ._coeffs import step_coeffs
from ._dpm_solver_pp import (
    _phi,
    check_multistep,
    data_prediction,
    init_history,
    multistep_orders,
    slope_weights,
    slopes,
    thresholding_error,
)


def _sde_coeffs(c):
    """(A, B, C) of the first-order step x_s = A x + B x̂_0 + C ξ: A = (σ_s/σ_t) e^{−h},
    B = α_s (1 − e^{−2h}), C = σ_s √(1 − e^{−2h}) (1 − e^{−2h} is 1 at an endpoint,
    where e^{−h} = 0)."""
    one = jnp.ones_like(c.h)
    one_m = jnp.where(c.exp_neg_h == 0, one, -jnp.expm1(-2.0 * c.h))
    return c.sigma_ratio * c.exp_neg_h, c.alpha_s * one_m, c.sigma_s * jnp.sqrt(one_m)


class SDEDPMSolverPP(AbstractSDESampler[tuple]):
    """SDE-DPM-Solver++ (Lu et al. 2022c) in its multistep form: the exponential
    integrator of the reverse diffusion SDE dx = [f x + (g²/σ) ε] dt + g dw̄ in the
    data prediction x̂_0, orders 1–3, with ξ_i the step's standard normal noise. It
    is diffusers' `DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")`
    (and `EDMDPMSolverMultistepScheduler`'s), "DPM++ 2M SDE" at order 2.

    Step t → s, h = λ_s − λ_t > 0, m₀ = x̂_0(x_t, t), D₁, D₂ from the earlier data
    predictions as in `aj.DPMSolverPP`:

        order 1:  x_s = (σ_s/σ_t) e^{−h} x_t + α_s (1 − e^{−2h}) m₀
                        + σ_s √(1 − e^{−2h}) ξ
        order 2:  … + ½ α_s (1 − e^{−2h}) D₁ ("midpoint") or α_s ψ₁(2h) D₁ ("heun"),
        order 3:  … + α_s ψ₁(2h) D₁ + α_s ((1 − e^{−2h} − 2h)/(4h²) − ½) D₂,

    with ψ₁(u) = (e^{−u} − 1)/u + 1, ψ₂(u) = (e^{−u} − 1 + u)/u² − ½ (the D₂
    coefficient is −α_s (ψ₂(2h) + 1)). Order 1 is `aj.DDIM(eta=1.0)` (the DDPM
    posterior) exactly.

    **Order 3 as diffusers writes it is first order.** With x̂_0(λ_t + τ) = m₀ + m′τ
    + m″τ²/2, the exact integral of the SDE's data term against 2e^{−2(λ_s − λ)}
    gives the m″ term h² (−ψ₂(2h)) m″, while diffusers' coefficient −(ψ₂(2h) + 1)
    times D₂ ≈ h² m″/2 leaves an extra −α_s h² m″/2 per step: a local error O(h²),
    global O(h). `third_order="diffusers"` (the default) reproduces it;
    `third_order="taylor"` uses −2 α_s ψ₂(2h) D₂ (the Taylor coefficient).

    **Measured orders** (Gaussian data, VP-linear to t = 1e-3; the sampled mean is
    exact there, the error is the weak error of the variance,
    `tests/test_diffusers_dpm_samplers.py`): order 1: 0.92 (N = 40–160); order 2:
    1.87 (midpoint), 2.08 (heun) (N = 20–80); order 3: 1.10 as diffusers writes it,
    2.04 with `third_order="taylor"` (N = 80–320).

    The order schedule, `euler_at_final`, `orders` and `thresholding` are those of
    `aj.DPMSolverPP`. A last step to σ = 0 is the data prediction (no noise: C = 0);
    a first step from α = 0 is α_s x̂_0 + σ_s ξ.

    **When to use it:** stochastic sampling at 20–50 steps (diffusers' SDE variant).
    **Cost:** one model evaluation per step. **State:** x, the two previous data
    predictions and their λ. **Noise:** one standard normal like x per step (`noise[i]`
    of `aj.sample(..., noise=...)`, diffusers' `variance_noise`). **Gradients:**
    `aj.DTO()` (exact, also ∂L/∂noise); the continuous adjoints (`aj.AdjointDEIS`,
    `aj.RecordedAdjoint`) use the reverse SDE's adjoint (factor 2, as for
    `aj.DDIM(eta=1.0)`) and re-solve states with the first-order inverse step; with
    `thresholding` only `aj.DTO()` and `aj.Truncated`.
    """

    order: int = eqx.field(default=2, static=True)
    solver_type: str = eqx.field(default="midpoint", static=True)
    lower_order_final: bool = eqx.field(default=True, static=True)
    third_order: str = eqx.field(default="diffusers", static=True)
    euler_at_final: bool = eqx.field(default=False, static=True)
    orders: tuple[int, ...] | None = eqx.field(default=None, static=True)
    thresholding: tuple[float, float] | None = eqx.field(default=None, static=True)

    is_sde: ClassVar[bool] = True
    evals_per_step: ClassVar[int] = 1
    steps_to_sigma_zero: ClassVar[bool] = True
    steps_from_alpha_zero: ClassVar[bool] = True
    adjoint_factor: ClassVar[float] = 2.0

    def __check_init__(self):
        check_multistep(self, "SDEDPMSolverPP")
        if self.third_order not in ("diffusers", "taylor"):
            raise ValueError(
                "`SDEDPMSolverPP(third_order=...)` must be 'diffusers' or 'taylor'; "
                "got "
                f"{self.third_order!r}."
            )

    @property
    def continuous_adjoint_error(self) -> str | None:
        return thresholding_error(self)

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array):
        orders = multistep_orders(self.order, ts.shape[0] - 1, self.lower_order_final,
                                  self.euler_at_final, self.orders, "SDEDPMSolverPP")
        return init_history(x_T, ts, orders)

    # The SDE in the data prediction: d(x/σ) = 2 e^{λ} x̂_0 dλ + (noise), whose linear
    # part integrates to x_s = (σ_s/σ_t) e^{−h} x_t + 2 α_s ∫_0^h e^{−2(h − τ)} x̂_0 dτ
    # + σ_s √(1 − e^{−2h}) ξ; x̂_0 = m₀ + τ m′ integrates to α_s (1 − e^{−2h}) m₀
    # + α_s ψ₁(2h) h m′ (the "heun" coefficient of D₁ ≈ h m′; "midpoint" halves the
    # first-order one), and τ² m″/2 to −α_s ψ₂(2h) h² m″.
    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        x, m1, m2, lam1, lam2, orders = state
        c = step_coeffs(schedule, t, s)
        m0 = data_prediction(eps, schedule, x, t, self.thresholding)
        order = jnp.where(c.sigma_zero_end, 1, orders[i])
        d10, d11, r0, inv = slopes(c, order, lam1, lam2, m0, m1, m2)
        a, b, scale = _sde_coeffs(c)
        psi1, psi2 = c.alpha_s * _phi(2.0 * c.h, 1), c.alpha_s * _phi(2.0 * c.h, 2)
        b3 = -2.0 * psi2 if self.third_order == "taylor" else -psi2 - c.alpha_s
        a2 = 0.5 * b if self.solver_type == "midpoint" else psi1
        k_d10, k_d11 = slope_weights(order, a2, psi1, b3, r0, inv)
        x_s = lincomb((a, x), (b, m0), (k_d10, d10), (k_d11, d11), (scale, noise))
        return (x_s, m0, m1, c.lam_t, lam1, orders)

    def noise_scale(self, schedule, t, s):
        return _sde_coeffs(step_coeffs(schedule, t, s))[2]

    # The first-order step s → t (s noisier) with x̂_0 = (x_s − σ_s ε)/α_s is
    #     x_t = (α_t/α_s) x_s − (α_t/α_s) σ_s (1 − e^{−2h}) ε + σ_t √(1 − e^{−2h}) ξ
    # ((σ_t/σ_s) e^{−h} + α_t (1 − e^{−2h})/α_s = α_t/α_s); solved for x_s with
    # ε(x_s, s) replaced by ε(x_t, t).
    def invert_step(self, schedule, x, e, t, s, noise):
        c = step_coeffs(schedule, s, t)  # the forward step s → t
        _, _, scale = _sde_coeffs(c)
        one = jnp.ones_like(c.h)
        one_m = jnp.where(c.exp_neg_h == 0, one, -jnp.expm1(-2.0 * c.h))
        inv_a = 1.0 / c.alpha_ratio
        return lincomb((inv_a, x), (c.sigma_t * one_m, e), (-scale * inv_a, noise))

    def output(self, state) -> PyTree:
        return state[0]


SDEDPMSolverPP.__init__.__doc__ = """**Arguments:**

- `order`: 1, 2 (default) or 3.
- `solver_type`: the second-order coefficient, `"midpoint"` (default) or `"heun"`.
- `lower_order_final`: drop the order of the last steps when there are fewer than
    15 (default True, as diffusers).
- `third_order`: `"diffusers"` (default; diffusers' D₂ coefficient, first-order
    convergent) or `"taylor"`.
- `euler_at_final`: make the last step first order (diffusers' `euler_at_final`).
- `orders`: optionally, the order of each step, instead of the rule above.
- `thresholding`: None (default), or `(ratio, max_value)`: dynamic thresholding of
    every x̂_0, as in `aj.DPMSolverPP`.
"""
