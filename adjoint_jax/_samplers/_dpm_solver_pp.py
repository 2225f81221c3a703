"""DPM-Solver++ (Lu et al. 2022c): the multistep exponential integrator in the data
prediction, orders 1–3, as diffusers' `DPMSolverMultistepScheduler` runs it; and the
pieces its SDE and noise-prediction relatives share (the order schedule, the slope
estimates from earlier evaluations, the option checks)."""

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractSampler, EpsFn, predict
from ._coeffs import step_coeffs
from ._x0_clip import dynamic_threshold


def _phi(h, order):
    """ψ₁ = (e^{−h} − 1)/h + 1 and ψ₂ = (e^{−h} − 1 + h)/h² − ½, with their series
    for small h (both vanish like h)."""
    small = jnp.abs(h) < 1e-2
    hs = jnp.where(small, jnp.ones_like(h), h)
    em1 = jnp.expm1(-hs)
    if order == 1:
        return jnp.where(small, h / 2 - h * h / 6 + h**3 / 24, em1 / hs + 1.0)
    return jnp.where(small, -h / 6 + h * h / 24 - h**3 / 120, (em1 + hs) / hs**2 - 0.5)


# ---- what the multistep samplers of this family share -------------------------------
def multistep_orders(
    order: int, n: int, lower_order_final: bool, euler_at_final: bool,
    orders: tuple | None = None, name: str = "DPMSolverPP",
) -> np.ndarray:
    """The order of each of the n steps (before the σ = 0 rule), diffusers' rule: step
    i uses at most order i + 1 (warm-up); the last step is first order with
    `euler_at_final`, or with `lower_order_final` and n < 15, when the one before is
    at most second order. `orders` (a tuple of n ints) replaces the rule."""
    if orders is not None:
        if len(orders) != n:
            raise ValueError(
                f"`{name}(orders=...)` gives {len(orders)} step orders for a grid of "
                f"{n} steps."
            )
        return np.asarray(orders, np.int32)
    out = np.minimum(order, np.arange(1, n + 1))
    if lower_order_final and n < 15:
        out[-1] = 1
        if n >= 2:
            out[-2] = min(out[-2], 2)
    if euler_at_final:
        out[-1] = 1
    return out.astype(np.int32)


def check_multistep(sampler, name: str, max_order: int = 3) -> None:
    """The option checks of the multistep samplers of this family."""
    if isinstance(sampler.order, bool) or sampler.order not in range(1, max_order + 1):
        raise ValueError(
            f"`{name}(order=...)` must be one of {tuple(range(1, max_order + 1))}; got "
            f"{sampler.order!r}."
        )
    if sampler.solver_type not in ("midpoint", "heun"):
        raise ValueError(
            f"`{name}(solver_type=...)` must be 'midpoint' or 'heun'; got "
            f"{sampler.solver_type!r}."
        )
    for field in ("lower_order_final", "euler_at_final"):
        if not isinstance(getattr(sampler, field), bool):
            raise TypeError(
                f"`{name}({field}=...)` must be a bool; got "
                f"{getattr(sampler, field)!r}."
            )
    orders = sampler.orders
    if orders is not None and (
        not isinstance(orders, tuple)
        or not all(isinstance(k, int) and 1 <= k <= sampler.order for k in orders)
        or any(k > i + 1 for i, k in enumerate(orders))
    ):
        raise ValueError(
            f"`{name}(orders=...)` must be None or a tuple of ints, the i-th in "
            f"[1, min(order, i + 1)]; got {orders!r}."
        )
    thr = sampler.thresholding
    if thr is not None:
        ok = isinstance(thr, tuple) and len(thr) == 2 and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in thr
        )
        if not ok or not (0.0 < thr[0] <= 1.0 and thr[1] > 0.0):
            raise ValueError(
                f"`{name}(thresholding=...)` must be None or a tuple "
                f"(ratio, max_value) with 0 < ratio <= 1 and max_value > 0; got "
                f"{thr!r}."
            )


def thresholding_error(sampler) -> str | None:
    """Why a continuous adjoint cannot differentiate a thresholding sampler."""
    if sampler.thresholding is None:
        return None
    return (
        "it applies dynamic thresholding to x̂_0 at every step (thresholding), which "
        "is not the smooth probability-flow ODE/SDE their adjoint equations (or "
        "inverse steps) assume; use `adjoint=aj.DTO()` (exact, almost everywhere) or "
        "aj.Truncated"
    )


def slopes(c, order, lam1, lam2, m0, m1, m2):
    """The first differences D₁⁰ = (m₀ − m₁)/r₀, D₁¹ = (m₁ − m₂)/r₁ of the current
    and two earlier evaluations (at λ_t − r₀h, λ_t − (r₀ + r₁)h), and 1/(r₀ + r₁).

    r₀, r₁ are ∞ (no slope information) where an earlier λ is −∞ (warm-up, or a first
    step from α = 0): the differences then vanish, as in diffusers. Steps of lower
    order use placeholder ratios (their differences get zero weight)."""
    one = jnp.ones_like(c.h)
    h = jnp.where(c.h == 0, one, c.h)
    # The double-where: an earlier λ of −∞ is replaced before the division, so that
    # the untaken branch's infinite partial derivative never meets a zero cotangent
    # (0·∞ = NaN in the gradient with respect to the schedule or the grid).
    fin1, fin2 = jnp.isfinite(lam1), jnp.isfinite(lam2)
    lam1 = jnp.where(fin1, lam1, c.lam_t - h)
    lam2 = jnp.where(fin2, lam2, lam1 - h)
    r0 = jnp.where(fin1, (c.lam_t - lam1) / h, jnp.inf * one)
    r1 = jnp.where(fin2, (lam1 - lam2) / h, jnp.inf * one)
    r0 = jnp.where(order >= 2, r0, one)
    r1 = jnp.where(order >= 3, r1, one)
    d10 = lincomb((1.0 / r0, m0), (-1.0 / r0, m1))
    d11 = lincomb((1.0 / r1, m1), (-1.0 / r1, m2))
    inv = jnp.where(order >= 3, 1.0 / (r0 + r1), jnp.zeros_like(one))
    return d10, d11, r0, inv


def slope_weights(order, a2, a3, b3, r0, inv):
    """The weights of D₁⁰ and D₁¹ in a2 D₁ (order 2, D₁ = D₁⁰) or a3 D₁ + b3 D₂
    (order 3, D₁ = D₁⁰ + r₀/(r₀ + r₁)(D₁⁰ − D₁¹), D₂ = (D₁⁰ − D₁¹)/(r₀ + r₁));
    zero for order 1."""
    zero = jnp.zeros_like(a2)
    k3 = a3 * (1 + r0 * inv) + b3 * inv
    k_d10 = jnp.where(order == 2, a2, jnp.where(order >= 3, k3, zero))
    k_d11 = jnp.where(order >= 3, -a3 * r0 * inv - b3 * inv, zero)
    return k_d10, k_d11


def data_prediction(eps: EpsFn, schedule, x, t, thresholding):
    """x̂_0 at (x, t) (the model's own when it has one), dynamically thresholded."""
    _, m0 = predict(eps, schedule, x, t)
    return m0 if thresholding is None else dynamic_threshold(m0, *thresholding)


def init_history(x_T: PyTree, ts: Array, orders: np.ndarray):
    # The earlier evaluations start as zeros at λ = −∞ (never read with weight: the
    # first steps are of lower order).
    zeros = lincomb((jnp.zeros((), ts.dtype), x_T))
    lam = jnp.full((), -jnp.inf, ts.dtype)
    return (x_T, zeros, zeros, lam, lam, jnp.asarray(orders))


class DPMSolverPP(AbstractSampler[tuple]):
    """DPM-Solver++ (Lu et al. 2022c) in its multistep form: the exponential
    integrator of the probability-flow ODE in the *data* prediction x̂_0, orders 1–3.
    With the defaults it is diffusers' default `DPMSolverMultistepScheduler`
    (`algorithm_type="dpmsolver++"`, `solver_order=2`, `solver_type="midpoint"`,
    `lower_order_final=True`); on a Karras σ-grid it is "DPM++ 2M Karras".

    Step t → s, h = λ_s − λ_t > 0, with m₀ = x̂_0(x_t, t) and the two earlier data
    predictions m₁, m₂ at λ_t − h₀, λ_t − h₀ − h₁ (r₀ = h₀/h, r₁ = h₁/h):

        order 1:  x_s = (σ_s/σ_t) x_t + α_s (1 − e^{−h}) m₀
        order 2:  … + c D₁,  D₁ = (m₀ − m₁)/r₀,
                  c = ½ α_s (1 − e^{−h}) ("midpoint") or α_s ψ₁(h) ("heun"),
        order 3:  … + α_s ψ₁(h) D₁ − α_s ψ₂(h) D₂,
                  D₁ = D₁⁰ + r₀/(r₀ + r₁)(D₁⁰ − D₁¹),
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
    and the one before at most second order; `euler_at_final` makes the last step
    first order; `orders` replaces the rule. The data-prediction form is finite at
    both ends of a grid: a last step to σ = 0 and a first step from α = 0 (a flow
    model's t = 1, or zero terminal SNR).

    **Thresholding** (`thresholding=(ratio, max_value)`, diffusers' `thresholding`):
    each x̂_0 is dynamically thresholded (Imagen) before it enters the update; the
    sampler is then piecewise smooth, `aj.DTO()` differentiates it almost everywhere
    (torch autograd's derivatives at the kinks) and the continuous adjoints refuse it.

    **When to use it:** the deterministic sampler of most text-to-image pipelines;
    orders 2 and 3 at 10–25 steps. **Cost:** one model evaluation per step.
    **State:** x, the two previous data predictions and their λ. **Gradients:**
    every strategy (`aj.DTO()` exact; the continuous adjoints approximate the
    probability-flow ODE's) except with `thresholding` (then `aj.DTO()` and
    `aj.Truncated`).
    """

    order: int = eqx.field(default=2, static=True)
    solver_type: str = eqx.field(default="midpoint", static=True)
    lower_order_final: bool = eqx.field(default=True, static=True)
    third_order: str = eqx.field(default="diffusers", static=True)
    euler_at_final: bool = eqx.field(default=False, static=True)
    orders: tuple[int, ...] | None = eqx.field(default=None, static=True)
    thresholding: tuple[float, float] | None = eqx.field(default=None, static=True)

    is_sde: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 1
    steps_to_sigma_zero: ClassVar[bool] = True
    steps_from_alpha_zero: ClassVar[bool] = True

    def __check_init__(self):
        check_multistep(self, "DPMSolverPP")
        if self.third_order not in ("diffusers", "taylor"):
            raise ValueError(
                "`DPMSolverPP(third_order=...)` must be 'diffusers' or 'taylor'; got "
                f"{self.third_order!r}."
            )

    @property
    def continuous_adjoint_error(self) -> str | None:
        return thresholding_error(self)

    def _orders(self, n: int) -> np.ndarray:
        """The order of each of the n steps, before the σ = 0 rule."""
        return multistep_orders(self.order, n, self.lower_order_final,
                                self.euler_at_final, self.orders)

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array):
        return init_history(x_T, ts, self._orders(ts.shape[0] - 1))

    # Data-prediction exponential integrator (Lu et al. 2022c, eq. 9): with
    # x = α x̂_0 + σ ε the probability-flow ODE in λ is d(x/σ)/dλ = e^λ x̂_0, so
    #     x_s = (σ_s/σ_t) x_t + σ_s ∫_{λ_t}^{λ_s} e^λ x̂_0(λ) dλ;
    # x̂_0 expanded about λ_t to order k − 1 (slopes from the earlier evaluations)
    # integrates to the coefficients α_s (1 − e^{−h}), α_s ψ₁(h) h, … of the docstring.
    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del noise
        x, m1, m2, lam1, lam2, orders = state
        c = step_coeffs(schedule, t, s)
        m0 = data_prediction(eps, schedule, x, t, self.thresholding)
        order = jnp.where(c.sigma_zero_end, 1, orders[i])
        d10, d11, r0, inv = slopes(c, order, lam1, lam2, m0, m1, m2)
        one = jnp.ones_like(c.h)
        # α_s (1 − e^{−h}), with expm1 for small h; α_s at an endpoint (e^{−h} = 0).
        a1 = c.alpha_s * jnp.where(c.exp_neg_h == 0, one, -jnp.expm1(-c.h))
        psi1, psi2 = c.alpha_s * _phi(c.h, 1), c.alpha_s * _phi(c.h, 2)
        if self.third_order == "taylor":
            psi2 = 2.0 * psi2  # the m″ term at its Taylor value (see the docstring)
        c2 = 0.5 * a1 if self.solver_type == "midpoint" else psi1
        k_d10, k_d11 = slope_weights(order, c2, psi1, -psi2, r0, inv)
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
- `euler_at_final`: make the last step first order (diffusers' `euler_at_final`).
- `orders`: optionally, the order of each step (a tuple as long as the grid has
    steps) instead of the rule above (diffusers' grids whose identity last step
    σ_min → σ_min is dropped keep the order schedule of all their steps).
- `thresholding`: None (default), or `(ratio, max_value)`: dynamic thresholding of
    every x̂_0 (diffusers' `dynamic_thresholding_ratio`, `sample_max_value`); each
    leaf of x has a leading batch axis (as diffusers' latents).
"""
