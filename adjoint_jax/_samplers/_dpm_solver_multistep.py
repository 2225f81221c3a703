"""Multistep DPM-Solver in the noise prediction (Lu et al. 2022a,c), orders 1–3, and
its SDE variant, as diffusers' `DPMSolverMultistepScheduler` runs them
(`algorithm_type="dpmsolver"` / `"sde-dpmsolver"`)."""

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractSDESampler, EpsFn, predict
from ._coeffs import step_coeffs
from ._dpm_solver_pp import (
    check_multistep,
    init_history,
    multistep_orders,
    slope_weights,
    slopes,
    thresholding_error,
)
from ._x0_clip import dynamic_threshold


def _phi3(h):
    """φ₃ = (e^h − 1 − h − h²/2)/h², with its series for small h."""
    small = jnp.abs(h) < 1e-2
    hs = jnp.where(small, jnp.ones_like(h), h)
    direct = (jnp.expm1(hs) - hs - 0.5 * hs * hs) / (hs * hs)
    return jnp.where(small, h / 6 + h * h / 24 + h**3 / 120 + h**4 / 720, direct)


def _thresholded_eps(e, x, alpha, sigma, thresholding):
    """ε re-derived from the thresholded x̂_0 = (x − σ ε)/α (diffusers' noise-prediction
    thresholding): ε' = (x − α thr(x̂_0))/σ."""
    x0 = jtu.tree_map(lambda xx, ee: (xx - sigma.astype(xx.dtype) * ee)
                      / alpha.astype(xx.dtype), x, e)
    x0 = dynamic_threshold(x0, *thresholding)
    return jtu.tree_map(lambda xx, z: (xx - alpha.astype(xx.dtype) * z)
                        / sigma.astype(xx.dtype), x, x0)


class DPMSolver(AbstractSDESampler[tuple]):
    """Multistep DPM-Solver (Lu et al. 2022a, multistep form of Lu et al. 2022c) in
    the *noise* prediction ε, orders 1–3, and with `sde=True` the SDE-DPM-Solver of
    the reverse diffusion SDE, orders 1–2: diffusers' `DPMSolverMultistepScheduler`
    with `algorithm_type="dpmsolver"` / `"sde-dpmsolver"` (for the data prediction,
    diffusers' default, use `aj.DPMSolverPP` / `aj.SDEDPMSolverPP`).

    Step t → s, h = λ_s − λ_t > 0, e₀ = ε(x_t, t) and the slopes D₁, D₂ of the earlier
    ε's as in `aj.DPMSolverPP` (D₁ = (e₀ − e₁)/r₀ at order 2):

        ODE, order 1:  x_s = (α_s/α_t) x_t − σ_s (e^h − 1) e₀
             order 2:  … − ½ σ_s (e^h − 1) D₁ ("midpoint") or − σ_s φ₂(h) D₁ ("heun")
             order 3:  … − σ_s φ₂(h) D₁ − σ_s φ₃(h) D₂
        SDE, order 1:  x_s = (α_s/α_t) x_t − 2 σ_s (e^h − 1) e₀ + σ_s √(e^{2h} − 1) ξ
             order 2:  … − σ_s (e^h − 1) D₁ ("midpoint") or − 2 σ_s φ₂(h) D₁ ("heun")

    with φ₂ = (e^h − 1 − h)/h = (e^h − 1)/h − 1 and φ₃ = (e^h − 1 − h − h²/2)/h².
    `DPMSolver(1)` is `aj.DPMSolver1()`, `DPMSolver(2, "heun")` is `aj.DPMSolver2()`,
    `DPMSolver(1, sde=True)` is `aj.SDEDPMSolver1()`. Order 3 is second-order
    convergent, like diffusers' (see `aj.DPMSolverPP`: D₂ is half the Taylor second
    difference); diffusers has no third-order SDE variant. Measured on Gaussian
    data (VP-linear to t = 1e-3, N = 20–80, `tests/test_diffusers_dpm_samplers.py`):
    ODE order 2: 1.97, order 3: 2.13 (strong); SDE order 2: 1.88 (weak, in the
    variance; the mean is exact there).

    The order schedule, `euler_at_final`, `orders` and `thresholding` (x̂_0 = (x − σ ε)/α
    thresholded and ε re-derived from it) are those of `aj.DPMSolverPP`. A last step
    to σ = 0 is the data prediction α_s x̂_0 (first order; diffusers itself refuses
    this grid for these algorithms, see `aj.from_diffusers`). The SDE variant cannot
    end at σ = 0: its noise σ_s √(e^{2h} − 1) tends to α_s σ_t/α_t there, not to 0.
    Neither starts from α = 0 (use the data-prediction samplers).

    **When to use it:** to reproduce a pipeline configured with these (deprecated in
    diffusers) algorithms; the data-prediction samplers are preferable otherwise.
    **Cost:** one model evaluation per step. **State:** x, the two previous ε and their
    λ. **Gradients:** `aj.DTO()` (exact, also ∂L/∂noise); the continuous adjoints
    (ODE: its probability-flow adjoint; SDE: the reverse SDE's, factor 2, states
    re-solved with the first-order inverse step); with `thresholding` only
    `aj.DTO()` and `aj.Truncated`.
    """

    order: int = eqx.field(default=2, static=True)
    solver_type: str = eqx.field(default="midpoint", static=True)
    lower_order_final: bool = eqx.field(default=True, static=True)
    euler_at_final: bool = eqx.field(default=False, static=True)
    sde: bool = eqx.field(default=False, static=True)
    orders: tuple[int, ...] | None = eqx.field(default=None, static=True)
    thresholding: tuple[float, float] | None = eqx.field(default=None, static=True)

    evals_per_step: ClassVar[int] = 1
    steps_from_alpha_zero: ClassVar[bool] = False
    adjoint_factor: ClassVar[float] = 2.0

    def __check_init__(self):
        if not isinstance(self.sde, bool):
            raise TypeError(f"`DPMSolver(sde=...)` must be a bool; got {self.sde!r}.")
        check_multistep(self, "DPMSolver", max_order=2 if self.sde else 3)

    @property
    def is_sde(self) -> bool:
        return self.sde

    @property
    def steps_to_sigma_zero(self) -> bool:
        return not self.sde

    @property
    def continuous_adjoint_error(self) -> str | None:
        return thresholding_error(self)

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array):
        orders = multistep_orders(self.order, ts.shape[0] - 1, self.lower_order_final,
                                  self.euler_at_final, self.orders, "DPMSolver")
        return init_history(x_T, ts, orders)

    # Noise-prediction exponential integrator (Lu et al. 2022a, eq. 3.4): the
    # probability-flow ODE gives d(x/α)/dλ = −e^{−λ} ε, so
    #     x_s = (α_s/α_t) x_t − α_s ∫_{λ_t}^{λ_s} e^{−λ} ε(λ) dλ,
    # and ε = e₀ + τ ε′ + τ² ε″/2 integrates to σ_s (e^h − 1) e₀ + σ_s φ₂ h ε′
    # + σ_s φ₃ h² ε″ (D₁ ≈ h ε′, D₂ ≈ h² ε″/2 as diffusers forms them). The reverse
    # SDE doubles the ε-integral and adds noise of variance σ_s² (e^{2h} − 1).
    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        x, e1, e2, lam1, lam2, orders = state
        c = step_coeffs(schedule, t, s)
        e0, _ = predict(eps, schedule, x, t, derive=False)
        if self.thresholding is not None:
            e0 = _thresholded_eps(e0, x, c.alpha_t, c.sigma_t, self.thresholding)
        order = jnp.where(c.sigma_zero_end, 1, orders[i])
        d10, d11, r0, inv = slopes(c, order, lam1, lam2, e0, e1, e2)
        k = 2.0 if self.sde else 1.0
        midpoint = self.solver_type == "midpoint"
        a2 = -0.5 * k * c.sigma_phi1 if midpoint else -k * c.sigma_phi2
        b3 = -c.sigma_s * _phi3(c.h)
        k_d10, k_d11 = slope_weights(order, a2, -c.sigma_phi2, b3, r0, inv)
        scale = c.sigma_s * jnp.sqrt(jnp.expm1(2.0 * c.h)) if self.sde else None
        x_s = lincomb((c.alpha_ratio, x), (-k * c.sigma_phi1, e0), (k_d10, d10),
                      (k_d11, d11), (scale, noise if self.sde else None))
        return (x_s, e0, e1, c.lam_t, lam1, orders)

    def noise_scale(self, schedule, t, s):
        c = step_coeffs(schedule, t, s)
        return c.sigma_s * jnp.sqrt(jnp.expm1(2.0 * c.h))

    # The first-order SDE step s → t solved for x_s with ε(x_s, s) replaced by
    # ε(x_t, t), i.e. with h = λ_s − λ_t < 0 (as `aj.SDEDPMSolver1`):
    #     x_s = (α_s/α_t) x_t − 2σ_s (e^h − 1) ε − σ_s √(1 − e^{2h}) ξ.
    def invert_step(self, schedule, x, e, t, s, noise):
        c = step_coeffs(schedule, t, s)
        return lincomb(
            (c.alpha_ratio, x),
            (-2.0 * c.sigma_phi1, e),
            (-c.sigma_s * jnp.sqrt(-jnp.expm1(2.0 * c.h)), noise),
        )

    def output(self, state) -> PyTree:
        return state[0]


DPMSolver.__init__.__doc__ = """**Arguments:**

- `order`: 1, 2 (default) or 3 (1 or 2 with `sde=True`).
- `solver_type`: the second-order coefficient, `"midpoint"` (default) or `"heun"`.
- `lower_order_final`: drop the order of the last steps when there are fewer than
    15 (default True, as diffusers).
- `euler_at_final`: make the last step first order (diffusers' `euler_at_final`).
- `sde`: the SDE variant (`"sde-dpmsolver"`; one standard normal like x per step).
- `orders`: optionally, the order of each step, instead of the rule above.
- `thresholding`: None (default), or `(ratio, max_value)`: dynamic thresholding of
    x̂_0 = (x − σ ε)/α, ε re-derived from it (diffusers' order of operations).
"""
