"""DEIS (Zhang & Chen 2023) in its multistep "ρAB" form with log-ρ interpolation,
orders 1–3, as diffusers' `DEISMultistepScheduler` runs it."""

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractSampler, EpsFn, predict
from ._coeffs import step_coeffs
from ._dpm_singlestep import THRESHOLD_ERROR, check_thresholding, phi3
from ._x0_clip import dynamic_threshold


def deis_orders(order: int, n: int, lower_order_final: bool) -> np.ndarray:
    """The order of each of n steps: at most i + 1 at step i (the warm-up); with
    `lower_order_final` and fewer than 15 steps, the last step first order and the one
    before at most second order (diffusers' rule)."""
    orders = np.minimum(order, np.arange(1, n + 1))
    if lower_order_final and n < 15:
        orders[-1] = 1
        if n >= 2:
            orders[-2] = min(orders[-2], 2)
    return orders.astype(np.int32)


class DEIS(AbstractSampler[tuple]):
    """DEIS (Zhang & Chen 2023), the multistep exponential integrator of the
    probability-flow ODE with the noise prediction interpolated by a polynomial in
    log ρ (ρ = σ/α = e^{−λ}, "logrho"), orders 1–3: diffusers'
    `DEISMultistepScheduler` (`algorithm_type="deis"`, `solver_type="logrho"`).

    In ρ the ODE is d(x/α)/dρ = ε, so the step t → s integrates ε exactly over
    [ρ_t, ρ_s] once ε is replaced by its Lagrange interpolant in u = log ρ through the
    current and the k − 1 previous evaluations (order k). With h = λ_s − λ_t > 0 and
    the earlier points at δ₁ = λ_t − λ₁, δ₂ = λ_t − λ₂ (Newton form in d = u − u_t):

        x_s = (α_s/α_t) x_t − σ_s (e^h − 1) ε₀ + σ_s h φ₂(h) [ε₀, ε₁]
              + (−2σ_s h² φ₃(h) − δ₁ σ_s h φ₂(h)) [ε₀, ε₁, ε₂],

    [ε₀, ε₁] = (ε₁ − ε₀)/δ₁, [ε₀, ε₁, ε₂] = ((ε₂ − ε₀)/δ₂ − [ε₀, ε₁])/(δ₂ − δ₁),
    φ₂ = (e^h − 1 − h)/h, φ₃ = (e^h − 1 − h − h²/2)/h² (the moments
    ∫ e^u d^k du over the step). This is diffusers' `ind_fn` antiderivative written
    without its cancellation; the two agree to round-off.

    **Order schedule** (diffusers'): step i uses at most order i + 1; with
    `lower_order_final` and fewer than 15 steps, the last step is first order and the
    one before at most second. A last step to σ = 0 (which diffusers' DEIS never
    takes) is first order: the data prediction.

    **Order:** 1 and 2 as `order` (measured 0.97 and 1.93 on the closed-form Gaussian
    at N = 16–64). Order 3 is third order in its interior steps (3.7 on Gaussian data
    at N = 16–128, 2.8 on a Gaussian mixture at N = 20–80), but diffusers' warm-up
    makes the first step first order, and its O(h²) local error bounds the global
    error: the asymptotic order is 2 (measured 2.0 at N = 1024–4096; the same holds
    for `aj.DPMSolverPP(3, third_order="taylor")`, 1.95 there).
    **Cost:** one model evaluation per step. **Memory:** x, the two previous ε and
    their λ. **Gradients:** `aj.DTO()` (exact) and the continuous adjoints of the
    probability-flow ODE (`aj.AdjointDEIS`, `aj.RecordedAdjoint`,
    `aj.InterpolatedAdjoint`). It cannot start at α = 0 (ε alone does not determine
    the step there).
    """

    order: int = eqx.field(default=2, static=True)
    lower_order_final: bool = eqx.field(default=True, static=True)
    orders: tuple[int, ...] | None = eqx.field(default=None, static=True)
    thresholding: tuple[float, float] | None = eqx.field(default=None, static=True)

    is_sde: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 1
    steps_to_sigma_zero: ClassVar[bool] = True
    steps_from_alpha_zero: ClassVar[bool] = False

    def __check_init__(self):
        if isinstance(self.order, bool) or self.order not in (1, 2, 3):
            raise ValueError(f"`DEIS(order=...)` must be 1, 2 or 3; got {self.order!r}.")
        if not isinstance(self.lower_order_final, bool):
            raise TypeError(
                f"`DEIS(lower_order_final=...)` must be a bool; got {self.lower_order_final!r}."
            )
        if self.orders is not None and (
            not isinstance(self.orders, tuple)
            or not all(isinstance(k, int) and 1 <= k <= self.order for k in self.orders)
            or any(k > i + 1 for i, k in enumerate(self.orders))
        ):
            raise ValueError(
                "`DEIS(orders=...)` must be None or a tuple of ints, the i-th in "
                f"[1, min(order, i + 1)]; got {self.orders!r}."
            )
        check_thresholding(self.thresholding, "DEIS")

    @property
    def continuous_adjoint_error(self) -> str | None:
        """Why the continuous adjoints cannot differentiate this sampler (None: they
        can)."""
        return None if self.thresholding is None else THRESHOLD_ERROR

    def _eps(self, eps, schedule, x, t):
        """ε at (x, t); with thresholding, re-derived from the thresholded x̂_0 as
        diffusers does: ε = (x − α_t x̂_0)/σ_t."""
        if self.thresholding is None:
            return predict(eps, schedule, x, t, derive=False)[0]
        _, x0 = predict(eps, schedule, x, t)
        x0 = dynamic_threshold(x0, *self.thresholding)
        a, s = schedule.alpha(t), schedule.sigma(t)
        return lincomb((1.0 / s, x), (-a / s, x0))

    def _orders(self, n: int) -> np.ndarray:
        if self.orders is None:
            return deis_orders(self.order, n, self.lower_order_final)
        if len(self.orders) != n:
            raise ValueError(
                f"`DEIS(orders=...)` gives {len(self.orders)} step orders for a grid of "
                f"{n} steps."
            )
        return np.asarray(self.orders, np.int32)

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array):
        zeros = lincomb((jnp.zeros((), ts.dtype), x_T))
        # Placeholder λ below the first point (finite: never read with weight).
        lam0 = schedule.lam(ts[0])
        orders = jnp.asarray(self._orders(ts.shape[0] - 1))
        return (x_T, zeros, zeros, lam0 - 1.0, lam0 - 2.0, orders)

    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del noise
        x, e1, e2, lam1, lam2, orders = state
        c = step_coeffs(schedule, t, s)
        e0 = self._eps(eps, schedule, x, t)
        order = jnp.where(c.sigma_zero_end, 1, orders[i])
        zero = jnp.zeros_like(c.h)
        d1 = c.lam_t - lam1
        d2 = c.lam_t - lam2
        # The moments of the step: K₁ = σ_s h φ₂(h), K₂ = −2σ_s h² φ₃(h) − δ₁ K₁ (finite
        # and unused at σ_s = 0, where h is stored as 0 and the step is first order).
        k1 = c.h * c.sigma_phi2
        k2 = -2.0 * c.sigma_s * c.h**2 * phi3(c.h) - d1 * k1
        k1 = jnp.where(order >= 2, k1, zero)
        k2 = jnp.where(order >= 3, k2, zero)
        # Newton divided differences, as coefficients of ε₁ and ε₂.
        w1 = k1 / d1 - k2 / (d1 * (d2 - d1))
        w2 = k2 / (d2 * (d2 - d1))
        x_s = lincomb((c.alpha_ratio, x), (-c.sigma_phi1 - w1 - w2, e0), (w1, e1), (w2, e2))
        return (x_s, e0, e1, c.lam_t, lam1, orders)

    def output(self, state) -> PyTree:
        return state[0]


DEIS.__init__.__doc__ = """**Arguments:**

- `order`: 1, 2 (default) or 3.
- `lower_order_final`: lower the order of the last two steps when there are fewer
    than 15 (default True, as diffusers).
- `thresholding`: None (default), or `(ratio, sample_max_value)`: diffusers' dynamic
    thresholding of x̂_0 at every evaluation, ε then re-derived from it (the
    continuous adjoints then refuse the sampler).
- `orders`: optionally, the order of each step (a tuple as long as the grid has
    steps), instead of the rule above: diffusers' grids whose last step is the
    identity (σ_min to σ_min) keep the order schedule of all their steps.
"""
