"""Singlestep DPM-Solver (Lu et al. 2022) and DPM-Solver++ (Lu et al. 2022c), orders
1–3, as diffusers' `DPMSolverSinglestepScheduler` runs them: a "macro step" of order
k makes k model evaluations (at its start and at k − 1 intermediate points) and then
one update from its start."""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractSampler, EpsFn, predict
from ._coeffs import step_coeffs
from ._x0_clip import dynamic_threshold


_ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")


def _series(u, direct, coeffs):
    """`direct(u)` where |u| ≥ 1e-2, else the power series Σ_k coeffs[k] u^{k+1}
    (the φ-type functions below all vanish like u; truncation < 1e-13 relative)."""
    small = jnp.abs(u) < 1e-2
    us = jnp.where(small, jnp.ones_like(u), u)
    poly = sum(c * u ** (k + 1) for k, c in enumerate(coeffs))
    return jnp.where(small, poly, direct(us))


def psi1(u):
    """ψ₁(u) = (e^{−u} − 1)/u + 1."""
    return _series(u, lambda v: jnp.expm1(-v) / v + 1.0,
                   (1 / 2, -1 / 6, 1 / 24, -1 / 120, 1 / 720))


def psi2(u):
    """ψ₂(u) = (e^{−u} − 1 + u)/u² − ½."""
    return _series(u, lambda v: (jnp.expm1(-v) + v) / v**2 - 0.5,
                   (-1 / 6, 1 / 24, -1 / 120, 1 / 720, -1 / 5040))


def phi3(u):
    """φ₃(u) = (e^u − 1 − u − u²/2)/u²."""
    return _series(u, lambda v: (jnp.expm1(v) - v - v * v / 2) / v**2,
                   (1 / 6, 1 / 24, 1 / 120, 1 / 720, 1 / 5040))


def singlestep_orders(order: int, n: int, lower_order_final: bool) -> np.ndarray:
    """The order of each of n steps (diffusers' `get_order_list`, with its rule that
    a step count not divisible by the order implies `lower_order_final`): macro steps
    [1, 2, …, order]; the last one shorter when n is not a multiple of `order`, and,
    with `lower_order_final` and n a multiple, split into [1, …, order − 1] and [1]."""
    full, rest = divmod(n, order)
    pattern = list(range(1, order + 1))
    if rest:
        orders = pattern * full + list(range(1, rest + 1))
    elif lower_order_final and order > 1:
        orders = pattern * (full - 1) + list(range(1, order)) + [1]
    else:
        orders = pattern * full
    return np.asarray(orders, np.int32)


THRESHOLD_ERROR = (
    "it applies dynamic thresholding to x̂_0 (thresholding) at every step, which is "
    "not the smooth probability-flow ODE/SDE their adjoint equations assume; its "
    "gradient is aj.DTO()'s (exact, almost everywhere) or aj.Truncated's"
)


def check_thresholding(value, name: str) -> None:
    """`thresholding` is None or (ratio in [0, 1], sample_max_value > 0)."""
    if value is None:
        return
    ok = (isinstance(value, tuple) and len(value) == 2
          and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value))
    if not ok or not (0.0 <= value[0] <= 1.0 and value[1] > 0.0):
        raise ValueError(
            f"`{name}(thresholding=...)` must be None or (ratio in [0, 1], "
            f"sample_max_value > 0), as diffusers' config; got {value!r}."
        )


def _where(pred, a: PyTree, b: PyTree) -> PyTree:
    return jtu.tree_map(lambda u, v: jnp.where(pred, u, v), a, b)


class DPMSolverSinglestep(AbstractSampler[tuple]):
    """Singlestep DPM-Solver / DPM-Solver++ (Lu et al. 2022, 2022c), orders 1–3, as
    diffusers' `DPMSolverSinglestepScheduler` (with the same order schedule).

    **Grid and state.** The time grid holds *every* evaluation time, as diffusers'
    `sigmas` do. The steps are grouped into macro steps of orders [1, 2, …, k] (see
    `singlestep_orders`): a step of order j evaluates the model at its current point
    t and then updates from the macro step's *base point* b (the point of its order-1
    step) straight to the next grid time s, using the j model outputs taken at b and
    at the j − 1 points after it. The state carries x, the base point x_b and its time,
    the outputs at b and at the point after b (q₀, q₁), and that point's log-SNR
    offset. A step of order 1 is DPM-Solver-1 from x_t; the macro step's last update
    lands on the grid point its successor starts from.

    **Update** from b to s with h = λ_s − λ_b, the current point's offset
    h₀ = λ_t − λ_b, the point after b at h₁ (r₀ = h₀/h, r₁ = h₁/h), m the output at t:

    - `"dpmsolver++"` (outputs x̂₀): x_s = (σ_s/σ_b) x_b + α_s (1 − e^{−h}) q₀ + …,
        order 2: + c D₁, D₁ = (m − q₀)/r₀, c = ½ α_s (1 − e^{−h}) ("midpoint") or
        α_s ψ₁(h) ("heun"); order 3: + α_s ψ₁(h) D₁,₁ ("midpoint", D₁,₁ = (m − q₀)/r₀)
        or + α_s ψ₁(h) D₁ − α_s ψ₂(h) D₂ ("heun"), with D₁,₀ = (q₁ − q₀)/r₁,
        D₁ = (r₀ D₁,₀ − r₁ D₁,₁)/(r₀ − r₁), D₂ = 2 (D₁,₁ − D₁,₀)/(r₀ − r₁);
    - `"dpmsolver"` (outputs ε): x_s = (α_s/α_b) x_b − σ_s (e^h − 1) q₀ − …, with
        −½ σ_s (e^h − 1) or −σ_s φ₂(h) on D₁ (order 2), −σ_s φ₂(h) on D₁,₁ or D₁ and
        −σ_s φ₃(h) on D₂ (order 3), φ₂ = (e^h − 1 − h)/h, φ₃ = (e^h − 1 − h − h²/2)/h²;
    - `"sde-dpmsolver++"`: x_s = (σ_s/σ_b) e^{−h} x_b + α_s (1 − e^{−2h}) q₀ + … +
        σ_s √(1 − e^{−2h}) ξ, with the `dpmsolver++` terms at 2h; its order-3 "heun"
        D₂ coefficient is diffusers' −α_s (ψ₂(2h) + 1), reproduced as is although it
        tends to −α_s, not 0, as h → 0 (on Gaussian data the D-terms vanish along the
        mean path, so the mean map is exact for every order of this variant).

    ψ₁(h) = (e^{−h} − 1)/h + 1, ψ₂(h) = (e^{−h} − 1 + h)/h² − ½. A step to σ = 0 is of
    order 1 (the data prediction, as diffusers' `final_sigmas_type="zero"`).

    **Order:** `order` for the deterministic algorithms (each macro step starts
    afresh, so no lower-order warm-up limits it). "midpoint" order 3 weights only
    D₁,₁, third order where r₀ → ⅔, i.e. on grids whose λ-spacing varies smoothly.
    Measured on the closed-form Gaussian (`tests/test_diffusers_singlestep.py`,
    x_0 at N = 16–64 / 24–96): order 1: 0.97; 2 "midpoint" 1.89, "heun" 1.98;
    3 "midpoint" 2.90 (2.99 at N = 128–1024), "heun" 2.93, `"dpmsolver"` "heun"
    3 within 0.25. The SDE variant draws one standard normal per step (`noise[i]`,
    also on the intermediate steps, as diffusers does).
    **Cost:** one model evaluation per step (a macro step of order k: k), plus one
    with `reevaluate_last`.
    **Memory:** x, x_b and two model outputs. **Gradients:** `aj.DTO()` (exact, also
    ∂L/∂noise); the deterministic algorithms also with `aj.AdjointDEIS`,
    `aj.RecordedAdjoint` and `aj.InterpolatedAdjoint` (continuous adjoints of the
    probability-flow ODE); the SDE variant, whose state is not x alone, only with
    `aj.DTO()`.
    """

    order: int = eqx.field(default=2, static=True)
    solver_type: str = eqx.field(default="midpoint", static=True)
    algorithm_type: str = eqx.field(default="dpmsolver++", static=True)
    lower_order_final: bool = eqx.field(default=True, static=True)
    orders: tuple[int, ...] | None = eqx.field(default=None, static=True)
    reevaluate_last: bool = eqx.field(default=False, static=True)
    thresholding: tuple[float, float] | None = eqx.field(default=None, static=True)

    evals_per_step: ClassVar[int] = 1
    steps_to_sigma_zero: ClassVar[bool] = True
    steps_from_alpha_zero: ClassVar[bool] = False

    def __check_init__(self):
        if isinstance(self.order, bool) or self.order not in (1, 2, 3):
            raise ValueError(
                f"`DPMSolverSinglestep(order=...)` must be 1, 2 or 3; got {self.order!r}."
            )
        if self.solver_type not in ("midpoint", "heun"):
            raise ValueError(
                "`DPMSolverSinglestep(solver_type=...)` must be 'midpoint' or 'heun'; "
                f"got {self.solver_type!r}."
            )
        if self.algorithm_type not in _ALGORITHMS:
            raise ValueError(
                f"`DPMSolverSinglestep(algorithm_type=...)` must be one of {_ALGORITHMS};"
                f" got {self.algorithm_type!r}."
            )
        if not isinstance(self.lower_order_final, bool):
            raise TypeError(
                "`DPMSolverSinglestep(lower_order_final=...)` must be a bool; got "
                f"{self.lower_order_final!r}."
            )
        if self.orders is not None and (
            not isinstance(self.orders, tuple) or not self.orders or self.orders[0] != 1
            or any(k not in (1, prev + 1) or k > self.order
                   for prev, k in zip(self.orders, self.orders[1:]))
        ):
            raise ValueError(
                "`DPMSolverSinglestep(orders=...)` must be None or a tuple of macro "
                f"steps [1, 2, …, k ≤ order] (each entry 1 or the previous + 1); got "
                f"{self.orders!r}."
            )
        check_thresholding(self.thresholding, "DPMSolverSinglestep")
        if self.thresholding is not None and self.algorithm_type == "dpmsolver":
            raise ValueError(
                "`DPMSolverSinglestep(thresholding=...)` with algorithm_type='dpmsolver' "
                "is not supported: diffusers' noise-prediction branch indexes its ᾱ "
                "table with timestep=None there and fails."
            )
        if self.reevaluate_last and self.is_sde:
            raise ValueError(
                "`DPMSolverSinglestep(reevaluate_last=True)` is deterministic only: the "
                "re-evaluated update would draw a second normal in its step."
            )

    def _orders(self, n: int) -> np.ndarray:
        """The order of each step (and of the re-evaluation after the last)."""
        m = n + 1 if self.reevaluate_last else n
        if self.orders is None:
            return singlestep_orders(self.order, m, self.lower_order_final)
        if len(self.orders) != m:
            raise ValueError(
                f"`DPMSolverSinglestep(orders=...)` gives {len(self.orders)} orders for a "
                f"grid of {n} steps" + (" and the re-evaluation" if self.reevaluate_last
                                        else "") + "."
            )
        return np.asarray(self.orders, np.int32)

    @property
    def is_sde(self) -> bool:
        return self.algorithm_type == "sde-dpmsolver++"

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array):
        del schedule
        zeros = lincomb((jnp.zeros((), ts.dtype), x_T))
        orders = jnp.asarray(self._orders(ts.shape[0] - 1))
        zero = jnp.zeros((), ts.dtype)
        return (x_T, x_T, ts[0], zeros, zeros, zero, orders)

    @property
    def continuous_adjoint_error(self) -> str | None:
        """Why the continuous adjoints cannot differentiate this sampler (None: they
        can)."""
        if self.thresholding is None:
            return None
        return THRESHOLD_ERROR

    def _output(self, eps, schedule, x, t):
        e, x0 = predict(eps, schedule, x, t, derive=self.algorithm_type != "dpmsolver")
        if self.algorithm_type == "dpmsolver":
            return e
        return x0 if self.thresholding is None else dynamic_threshold(x0, *self.thresholding)

    def _coeffs(self, cb):
        """(A, B₀, order-2 coefficient of D₁, order-3 coefficient of D₁,₁ or D₁,
        order-3 coefficient of D₂, noise scale) of the update from the base point
        (step coefficients `cb`), for this algorithm and solver type."""
        h, one = cb.h, jnp.ones_like(cb.h)
        mid = self.solver_type == "midpoint"
        end = cb.exp_neg_h == 0  # the step to σ = 0 (h itself is stored as 0)
        if self.algorithm_type == "dpmsolver":
            k2 = -0.5 * cb.sigma_phi1 if mid else -cb.sigma_phi2
            return (cb.alpha_ratio, -cb.sigma_phi1, k2, -cb.sigma_phi2,
                    -cb.sigma_s * phi3(h), None)
        if self.algorithm_type == "dpmsolver++":
            a1 = cb.alpha_s * jnp.where(end, one, -jnp.expm1(-h))
            p1 = cb.alpha_s * psi1(h)
            return (cb.sigma_ratio, a1, 0.5 * a1 if mid else p1, p1,
                    -cb.alpha_s * psi2(h), None)
        # sde-dpmsolver++: the data-prediction terms at 2h, and the noise.
        one_m = jnp.where(end, one, -jnp.expm1(-2.0 * h))
        a1 = cb.alpha_s * one_m
        p1 = cb.alpha_s * psi1(2.0 * h)
        return (cb.sigma_ratio * cb.exp_neg_h, a1, 0.5 * a1 if mid else p1, p1,
                -cb.alpha_s * (psi2(2.0 * h) + 1.0), cb.sigma_s * jnp.sqrt(one_m))

    def _update(self, schedule, order, m, lam_t, s, base, t_b, q0, q1, h1, noise):
        """The update from the base point (x_b at t_b, output q₀; q₁ at λ_b + h₁) to s
        of the given order, with the output m at the current point (log-SNR lam_t)."""
        cb = step_coeffs(schedule, t_b, s)
        one = jnp.ones_like(cb.h)
        h = jnp.where(cb.h == 0, one, cb.h)
        h0 = lam_t - cb.lam_t  # λ_t − λ_b (0 on an order-1 step)
        r0 = jnp.where(order >= 2, h0 / h, one)
        r1 = jnp.where(order >= 3, h1 / h, jnp.full_like(one, 2.0))
        a, b0, k_o2, k_o3, k_d2, scale = self._coeffs(cb)
        d11 = lincomb((1.0 / r0, m), (-1.0 / r0, q0))  # D₁,₁ (order 2: D₁)
        d10 = lincomb((1.0 / r1, q1), (-1.0 / r1, q0))  # D₁,₀
        zero = jnp.zeros_like(one)
        heun3 = (order == 3) & (self.solver_type == "heun")
        # Order 3 "heun": D₁ = (r₀ D₁,₀ − r₁ D₁,₁)/(r₀ − r₁), D₂ = 2(D₁,₁ − D₁,₀)/(r₀ − r₁).
        inv = jnp.where(heun3, 1.0 / (r0 - r1), zero)
        k_d11 = jnp.where(order == 2, k_o2, jnp.where(order == 3, k_o3, zero))
        k_d11 = jnp.where(heun3, -k_o3 * r1 * inv + 2.0 * k_d2 * inv, k_d11)
        k_d10 = jnp.where(heun3, k_o3 * r0 * inv - 2.0 * k_d2 * inv, zero)
        x_s = lincomb((a, base), (b0, q0), (k_d11, d11), (k_d10, d10),
                      (scale, noise if self.is_sde else None))
        return x_s, h0

    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        x, base, t_b, q0, q1, h1, orders = state
        c = step_coeffs(schedule, t, s)
        order = jnp.where(c.sigma_zero_end, 1, orders[i])
        m = self._output(eps, schedule, x, t)
        # An order-1 step starts a macro step: x and its output become the base.
        new = order == 1
        base, q0 = _where(new, x, base), _where(new, m, q0)
        t_b = jnp.where(new, t, t_b)
        x_s, h0 = self._update(schedule, order, m, c.lam_t, s, base, t_b, q0, q1, h1, noise)
        q1 = _where(order == 2, m, q1)
        h1 = jnp.where(order == 2, h0, h1)
        if self.reevaluate_last:
            # The last macro step's last evaluation at its own target s, and its update
            # redone one order higher with it (the current point is s: r₀ = 1).
            def again(x_s):
                m_s = self._output(eps, schedule, x_s, s)
                return self._update(schedule, orders[i + 1], m_s, c.lam_t + c.h, s, base,
                                    t_b, q0, q1, h1, noise)[0]

            x_s = jax.lax.cond(i == orders.shape[0] - 2, again, lambda v: v, x_s)
        return (x_s, base, t_b, q0, q1, h1, orders)

    def output(self, state) -> PyTree:
        return state[0]


DPMSolverSinglestep.__init__.__doc__ = """**Arguments:**

- `order`: 1, 2 (default) or 3: the order of the macro steps.
- `solver_type`: `"midpoint"` (default) or `"heun"`: the coefficient of the
    first difference (order 2) and the third-order form (order 3).
- `algorithm_type`: `"dpmsolver++"` (default; the data prediction), `"dpmsolver"`
    (the noise prediction) or `"sde-dpmsolver++"` (stochastic: one standard normal
    per step).
- `lower_order_final`: when the step count is a multiple of `order`, split the last
    macro step into orders [1, …, order − 1] and [1] (default True; diffusers sets it
    whenever its grid ends at σ = 0).
- `orders`: optionally, the order of each step, as a tuple (and of the
    re-evaluation, last), instead of the rule above.
- `thresholding`: None (default), or `(ratio, sample_max_value)`: diffusers' dynamic
    thresholding of x̂_0 at every evaluation (`dpmsolver++` and `sde-dpmsolver++`);
    the continuous adjoints then refuse the sampler.
- `reevaluate_last`: after the last step, evaluate the model once more at its
    target and redo the last macro step's update one order higher with that
    evaluation (default False). This is diffusers' zero-length last step σ_min →
    σ_min of a Karras / exponential / beta grid with `final_sigmas_type="sigma_min"`:
    the step evaluates at its own target and updates from its macro step's base.
"""
