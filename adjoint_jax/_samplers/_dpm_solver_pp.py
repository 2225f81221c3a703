"""DPM-Solver++ (Lu et al. 2022c): the multistep exponential integrator in the data
prediction, orders 1–3, as diffusers' `DPMSolverMultistepScheduler` runs it."""

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractSampler, EpsFn, predict
from ._coeffs import step_coeffs


def _phi(h, order):
    """ψ₁ = (e^{−h} − 1)/h + 1 and ψ₂ = (e^{−h} − 1 + h)/h² − ½, with their series
    for small h (both vanish like h)."""
    small = jnp.abs(h) < 1e-2
    hs = jnp.where(small, jnp.ones_like(h), h)
    em1 = jnp.expm1(-hs)
    if order == 1:
        return jnp.where(small, h / 2 - h * h / 6 + h**3 / 24, em1 / hs + 1.0)
    return jnp.where(small, -h / 6 + h * h / 24 - h**3 / 120, (em1 + hs) / hs**2 - 0.5)


class DPMSolverPP(AbstractSampler[tuple]):
    """DPM-Solver++ (Lu et al. 2022c) in its multistep form: the exponential
    integrator of the probability-flow ODE in the *data* prediction x̂_0, orders 1–3.
    With the defaults it is diffusers' default `DPMSolverMultistepScheduler`
    (`algorithm_type="dpmsolver++"`, `solver_order=2`, `solver_type="midpoint"`,
    `lower_order_final=True`).

    Step t → s, h = λ_s − λ_t > 0, with m₀ = x̂_0(x_t, t) and the two earlier data
    predictions m₁, m₂ at λ_t − h₀, λ_t − h₀ − h₁ (r₀ = h₀/h, r₁ = h₁/h):

        order 1:  x_s = (σ_s/σ_t) x_t + α_s (1 − e^{−h}) m₀
        order 2:  … + c D₁,  D₁ = (m₀ − m₁)/r₀,
                  c = ½ α_s (1 − e^{−h}) ("midpoint") or α_s ψ₁(h) ("heun"),
        order 3:  … + α_s ψ₁(h) D₁ − α_s ψ₂(h) D₂ with D₁ = D₁⁰ + r₀/(r₀ + r₁)(D₁⁰ − D₁¹),
                  D₂ = (D₁⁰ − D₁¹)/(r₀ + r₁), D₁⁰ = (m₀ − m₁)/r₀, D₁¹ = (m₁ − m₂)/r₁,

    with ψ₁ = (e^{−h} − 1)/h + 1 and ψ₂ = (e^{−h} − 1 + h)/h² − ½ (order 3 ignores
    `solver_type`, as diffusers does).

    **Order 3 is second order as diffusers writes it.** With the data prediction
    m(λ_t + τ) = m₀ + m′τ + m″τ²/2 + …, the exact step has the term −α_s h² ψ₂ m″,
    while D₁⁰ − D₁¹ = h² m″ (r₀ + r₁)/2 + O(h³), so D₂ = h² m″/2: the m″ term is
    half its Taylor value and the local error is O(h³). diffusers (and the reference
    DPM-Solver code) use this D₂; `third_order="diffusers"` (the default) reproduces
    it, and its measured global order is 2 (`tests/test_samplers.py`).
    `third_order="taylor"` uses 2 D₂, which makes it third order (measured 3 on a
    Gaussian mixture, 4 on Gaussian data).

    **Order schedule** (diffusers' rule): step i uses at most order i + 1 (the
    warm-up); a last step to σ = 0 is first order (it is the data prediction α_s m₀);
    with `lower_order_final` and fewer than 15 steps, the last step is first order
    and the one before at most second order. The data-prediction form is finite at
    both ends of a grid: a last step to σ = 0 and a first step from α = 0 (a flow
    model's t = 1, or zero terminal SNR).

    **When to use it:** the deterministic sampler of most text-to-image pipelines;
    orders 2 and 3 at 10–25 steps. **Cost:** one model evaluation per step.
    **State:** x, the two previous data predictions and their λ.
    """

    order: int = eqx.field(default=2, static=True)
    solver_type: str = eqx.field(default="midpoint", static=True)
    lower_order_final: bool = eqx.field(default=True, static=True)
    third_order: str = eqx.field(default="diffusers", static=True)

    is_sde: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 1
    steps_to_sigma_zero: ClassVar[bool] = True
    steps_from_alpha_zero: ClassVar[bool] = True

    def __check_init__(self):
        if self.order not in (1, 2, 3) or isinstance(self.order, bool):
            raise ValueError(
                f"`DPMSolverPP(order=...)` must be 1, 2 or 3; got {self.order!r}."
            )
        if self.solver_type not in ("midpoint", "heun"):
            raise ValueError(
                "`DPMSolverPP(solver_type=...)` must be 'midpoint' or 'heun'; got "
                f"{self.solver_type!r}."
            )
        if self.third_order not in ("diffusers", "taylor"):
            raise ValueError(
                "`DPMSolverPP(third_order=...)` must be 'diffusers' or 'taylor'; got "
                f"{self.third_order!r}."
            )
        if not isinstance(self.lower_order_final, bool):
            raise TypeError(
                "`DPMSolverPP(lower_order_final=...)` must be a bool; got "
                f"{self.lower_order_final!r}."
            )

    def _orders(self, n: int) -> np.ndarray:
        """The order of each of the n steps, before the σ = 0 rule."""
        orders = np.minimum(self.order, np.arange(1, n + 1))
        if self.lower_order_final and n < 15:
            orders[-1] = 1
            if n >= 2:
                orders[-2] = min(orders[-2], 2)
        return orders.astype(np.int32)

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array):
        # The earlier data predictions start as zeros at λ = −∞ (never read with
        # weight: the first steps are of lower order).
        zeros = lincomb((jnp.zeros((), ts.dtype), x_T))
        lam = jnp.full((), -jnp.inf, ts.dtype)
        orders = jnp.asarray(self._orders(ts.shape[0] - 1))
        return (x_T, zeros, zeros, lam, lam, orders)

    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del noise
        x, m1, m2, lam1, lam2, orders = state
        c = step_coeffs(schedule, t, s)
        _, m0 = predict(eps, schedule, x, t)
        order = jnp.where(c.sigma_zero_end, 1, orders[i])
        one = jnp.ones_like(c.h)
        h = jnp.where(c.h == 0, one, c.h)
        # r₀, r₁ are ∞ (no slope information) where an earlier λ is −∞ (warm-up, or a
        # first step from α = 0); then D₁, D₂ vanish, as in diffusers.
        r0 = jnp.where(jnp.isfinite(lam1), (c.lam_t - lam1) / h, jnp.inf * one)
        r1 = jnp.where(jnp.isfinite(lam2), (lam1 - lam2) / h, jnp.inf * one)
        r0 = jnp.where(order >= 2, r0, one)
        r1 = jnp.where(order >= 3, r1, one)
        # α_s (1 − e^{−h}), with expm1 for small h; α_s at an endpoint (e^{−h} = 0).
        a1 = c.alpha_s * jnp.where(c.exp_neg_h == 0, one, -jnp.expm1(-c.h))
        d10 = lincomb((1.0 / r0, m0), (-1.0 / r0, m1))
        d11 = lincomb((1.0 / r1, m1), (-1.0 / r1, m2))
        # Order 2: c₂ D₁⁰; order 3: α_s ψ₁ (D₁⁰ + w (D₁⁰ − D₁¹)) − α_s ψ₂ (D₁⁰ − D₁¹)/(r₀ + r₁)
        # with w = r₀/(r₀ + r₁).
        psi1, psi2 = c.alpha_s * _phi(c.h, 1), c.alpha_s * _phi(c.h, 2)
        if self.third_order == "taylor":
            psi2 = 2.0 * psi2  # the m″ term at its Taylor value (see the docstring)
        c2 = 0.5 * a1 if self.solver_type == "midpoint" else psi1
        inv = jnp.where(order >= 3, 1.0 / (r0 + r1), jnp.zeros_like(one))
        zero = jnp.zeros_like(one)
        k3 = psi1 * (1 + r0 * inv) - psi2 * inv
        k_d10 = jnp.where(order == 2, c2, jnp.where(order >= 3, k3, zero))
        k_d11 = jnp.where(order >= 3, -psi1 * r0 * inv + psi2 * inv, zero)
        x_s = lincomb((c.sigma_ratio, x), (a1, m0), (k_d10, d10), (k_d11, d11))
        return (x_s, m0, m1, c.lam_t, lam1, orders)

    def output(self, state) -> PyTree:
        return state[0]


DPMSolverPP.__init__.__doc__ = """**Arguments:**

- `order`: 1, 2 (default) or 3.
- `solver_type`: the second-order coefficient, `"midpoint"` (default, diffusers'
    default) or `"heun"`.
- `lower_order_final`: drop the order of the last steps when there are fewer than
    15 (default True, as diffusers).
- `third_order`: the second difference of order 3: `"diffusers"` (default; exactly
    diffusers' update, second-order convergent) or `"taylor"` (third order).
"""
