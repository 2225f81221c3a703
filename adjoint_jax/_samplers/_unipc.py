"""UniPC (Zhao et al. 2023): the unified predictor–corrector multistep solver, as
diffusers' `UniPCMultistepScheduler` runs it."""

import math
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
from ._coeffs import StepCoeffs, step_coeffs
from ._x0_clip import dynamic_threshold


# |z| < ½: the omitted terms are below 2⁻¹³/14! ≈ 1.4e-15 of the first (1/(k+1)!).
_SERIES_TERMS = 13
_SMALL = 0.5


def _g(z: Array, k_max: int) -> Array:
    """g_k(z) = k! z φ_{k+1}(z) for k = 1, ..., k_max (a vector), where φ_1(z) =
    (e^z − 1)/z and φ_{k+1}(z) = (φ_k(z) − 1/k!)/z (so g_k = k! Σ_{j≥0} z^{j+1}/(j +
    k + 1)!).

    diffusers builds them by that recursion (`h_phi_k`), which loses a factor |z| of
    precision per level; here |z| < ½ uses the power series (Horner, all k at once)
    and the recursion runs only where it is accurate (both branches are evaluated at
    safe arguments: no NaN reaches a gradient)."""
    small = jnp.abs(z) < _SMALL
    zs = jnp.where(small, z, jnp.zeros_like(z))
    zr = jnp.where(small, jnp.ones_like(z), z)
    ks = range(1, k_max + 1)
    coef = np.array([[math.factorial(k) / math.factorial(j + k + 1) for k in ks]
                     for j in range(_SERIES_TERMS)])
    series = jnp.zeros((k_max,), z.dtype)
    for j in reversed(range(_SERIES_TERMS)):
        series = series * zs + jnp.asarray(coef[j], z.dtype)
    phi, rec = jnp.expm1(zr) / zr, []
    for k in ks:
        phi = (phi - 1.0 / math.factorial(k)) / zr  # φ_{k+1}
        rec.append(math.factorial(k) * zr * phi)
    return jnp.where(small, zs * series, jnp.stack(rec))


def _solve(rs: list[Array], g: list[Array]) -> list[Array]:
    """ρ with Σ_k ρ_k r_k^j = g_{j+1}, j = 0, ..., p − 1: UniPC's Vandermonde system
    R ρ = b (here for ρ̃ = B(h) ρ and g = B(h) b), solved in closed form: the inverse
    of the Vandermonde matrix holds the coefficients of the Lagrange polynomials
    L_k(x) = Π_{m≠k} (x − r_m)/(r_k − r_m), so ρ_k = Σ_j [x^j] L_k · g_{j+1}."""
    rho = []
    for k, r_k in enumerate(rs):
        coef, denom = [jnp.ones_like(r_k)], jnp.ones_like(r_k)
        for m, r_m in enumerate(rs):
            if m == k:
                continue
            # (c_0 + c_1 x + ...)(x − r_m)
            coef = [-r_m * coef[0]] + [
                coef[j - 1] - r_m * coef[j] for j in range(1, len(coef))
            ] + [coef[-1]]
            denom = denom * (r_k - r_m)
        rho.append(sum(c * gj for c, gj in zip(coef, g)) / denom)
    return rho


def _pick(p: Array, table: dict[int, list[Array]]) -> list[Array]:
    """The weights of the runtime order p from `table` (order → weights)."""
    orders = sorted(table)
    out = table[orders[0]]
    for q in orders[1:]:
        out = [jnp.where(p == q, b, a) for a, b in zip(out, table[q])]
    return out


def _diff(a: PyTree, b: PyTree) -> PyTree:
    return jtu.tree_map(lambda u, v: u - v, a, b)


class UniPC(AbstractSampler[tuple]):
    """UniPC (Zhao et al. 2023), the unified predictor–corrector exponential
    integrator, exactly as diffusers' `UniPCMultistepScheduler` runs it (SD users'
    fast sampler; Wan 2.1 ships it with flow sigmas).

    Notation: step t → s, h = λ_s − λ_t, z = −h in the data prediction
    (`predict_x0=True`, m = x̂_0) and z = h in the noise prediction (m = ε); m₀ is the
    model at the current point, m_k (k ≥ 1) the earlier ones at λ_t + r_k h
    (r_k < 0), D_k = (m_k − m₀)/r_k. B(h) = z ("bh1") or e^z − 1 ("bh2").

    **UniP-p (predictor)**, data prediction (noise prediction: α ↔ σ, x̂_0 ↔ ε):

        x_s = (σ_s/σ_t) x_t + α_s (1 − e^{−h}) m₀ − α_s Σ_{k<p} ρ̃_k D_k,

    with ρ̃ = B(h)/2 for p = 2 (diffusers' simplified UniP-2, which with "bh2" is
    DPM-Solver++(2M): ½ α_s (1 − e^{−h}) D) and, for p ≥ 3, the solution of
    `Σ_k ρ̃_k r_k^{j−1} = g_j` (j = 1, ..., p − 1), `g_j = j! z φ_{j+1}(z)` — the
    Taylor matching conditions that make the step order p. (diffusers solves
    R ρ = b with b_j = g_j/B(h) and multiplies by B(h): the same ρ̃, so bh1 and
    bh2 differ only where ρ is the fixed ½.)

    **UniC-p (corrector)**: once the model has been evaluated at the predicted
    x_s (m_s, the next step's m₀), the step t → s is redone from the same x_t with
    D_p = m_s − m₀ (r_p = 1) added: x_s^c = (σ_s/σ_t) x_t + α_s (1 − e^{−h}) m₀
    − α_s (Σ_{k<p} ρ̃_k D_k + ρ̃_p D_p), ρ̃ solving the p × p system (j = 1..p),
    or ρ̃ = B(h)/2 for p = 1. The corrected x_s^c replaces x_s for the next
    predictor, while m_s (evaluated at the *uncorrected* x_s) is kept as it is:
    one model evaluation per step, none for the corrector. The last step is not
    corrected (no evaluation follows it) unless `correct_last=True`.

    **Orders** (diffusers' rule): step i's order is min(`solver_order`, i + 1), and
    with `lower_order_final` also at most N − i (so the last step is first order,
    whatever N); the corrector at step i has the order of step i − 1's predictor. A
    step to σ = 0 is first order (its data prediction α_s m₀).

    **Convergence** (`order`): p + 1 with `lower_order_final=False` (the corrector
    raises UniP-p's order by one), measured on the closed-form Gaussian
    (`tests/test_diffusers_unipc.py`, t_end = 10⁻³): 2.0 (p = 1), 3.0 (p = 2), 3.9
    (p = 3, N = 80–320). A step left uncorrected lowers it to that step's order + 1;
    so `lower_order_final`'s first-order last step caps it at 2, but only
    asymptotically: the data prediction varies like σ² near the data, so on a grid
    ending near σ = 0 its O(h²) error shows late (p = 3: slopes 3.2, 3.5, 3.2, 2.6
    from N = 40 to 640; p = 2 measures 3.0 up to N = 160).

    **Finite at σ = 0.** diffusers' `bh1` step to σ = 0 multiplies B(h) = −h = −∞
    by a zero and returns NaN, and its noise-prediction step to σ = 0 multiplies
    σ_s = 0 by e^h − 1 = ∞; this sampler takes the limit (the data prediction α_s m₀
    for the first-order last step) and is finite there.

    **When to use it:** a fast deterministic sampler for 5–25 steps (order 2 with
    "bh2" for guided sampling, order 3 unconditionally, as the paper suggests), or to
    reproduce a diffusers pipeline that uses `UniPCMultistepScheduler`
    (`aj.from_diffusers`). **Cost:** one model evaluation per step (N in all; N + 1
    with `correct_last`). **Memory:** the state holds x, the previous corrected x,
    `solver_order` earlier model outputs and their λ. **Gradients:** `aj.DTO()`
    (exact); the continuous adjoints (`aj.AdjointDEIS`, `aj.RecordedAdjoint`,
    `aj.InterpolatedAdjoint`) and `aj.AdjointDPM` treat it as an ODE sampler (except
    with `thresholding`); not `aj.ReversibleAdjoint` (the step has no exact inverse).
    """

    solver_order: int = eqx.field(default=2, static=True)
    solver_type: str = eqx.field(default="bh2", static=True)
    predict_x0: bool = eqx.field(default=True, static=True)
    lower_order_final: bool = eqx.field(default=True, static=True)
    disable_corrector: tuple[int, ...] = eqx.field(default=(), static=True)
    correct_last: bool = eqx.field(default=False, static=True)
    thresholding: tuple[float, float] | None = eqx.field(default=None, static=True)

    is_sde: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 1
    steps_to_sigma_zero: ClassVar[bool] = True
    # A first step from α = 0 would need bh1's UniC-1 with B(h) = ∞.
    steps_from_alpha_zero: ClassVar[bool] = False

    def __check_init__(self):
        k = self.solver_order
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(
                f"`UniPC(solver_order=...)` must be an int >= 1; got {k!r}."
            )
        if self.solver_type not in ("bh1", "bh2"):
            raise ValueError(
                "`UniPC(solver_type=...)` must be 'bh1' or 'bh2'; got "
                f"{self.solver_type!r}."
            )
        for name in ("predict_x0", "lower_order_final", "correct_last"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"`UniPC({name}=...)` must be a bool; got {getattr(self, name)!r}."
                )
        dc = self.disable_corrector
        if not isinstance(dc, tuple) or any(
            isinstance(j, bool) or not isinstance(j, int) or j < 0 for j in dc
        ):
            raise TypeError(
                "`UniPC(disable_corrector=...)` must be a tuple of step indices (ints "
                f">= 0); got {dc!r}."
            )
        th = self.thresholding
        if th is not None and not (
            isinstance(th, tuple) and len(th) == 2 and 0 < th[0] <= 1 and th[1] >= 1
        ):
            raise ValueError(
                "`UniPC(thresholding=...)` must be None or (ratio in (0, 1], "
                f"max_value >= 1); got {th!r}."
            )
        if th is not None and not self.predict_x0:
            raise ValueError(
                "`UniPC(thresholding=...)` acts on the data prediction; it needs "
                "predict_x0=True."
            )

    @property
    def order(self) -> int:
        """The convergence order: UniC-p makes a step of order p + 1 (local error
        O(h^{p+2})); an uncorrected step j of predictor order q = min(p, j + 1) (local
        error O(h^{q+1})) caps it at q + 1, so `lower_order_final`'s first-order last
        step caps it at 2 (see the docstring for where that shows)."""
        order = self.solver_order + 1
        for j in self.disable_corrector:
            order = min(order, min(self.solver_order, j + 1) + 1)
        return min(order, 2) if self.lower_order_final else order

    @property
    def continuous_adjoint_error(self) -> str | None:
        if self.thresholding is None:
            return None
        return (
            "it applies dynamic thresholding to x̂_0 (thresholding) at every step, "
            "which is not the smooth probability-flow ODE their adjoint equations "
            "assume"
        )

    def _schedule_arrays(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Each step's predictor order and whether its corrector runs (step i's
        corrector corrects step i − 1; with `correct_last`, entry n − 1 of the second
        array is for the correction after the last step)."""
        total = n + int(self.correct_last)  # diffusers counts the identity step
        i = np.arange(n)
        orders = np.minimum(self.solver_order, i + 1)
        if self.lower_order_final:
            orders = np.minimum(orders, total - i)
        corrected = np.array([j >= 1 and (j - 1) not in self.disable_corrector
                              for j in range(n)])
        last = n - 1 not in self.disable_corrector
        return orders.astype(np.int32), np.append(corrected, last)

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array):
        zeros = jtu.tree_map(jnp.zeros_like, x_T)
        lam0 = schedule.lam(ts[0])
        lam0 = jnp.where(jnp.isfinite(lam0), lam0, jnp.zeros_like(lam0))
        # Placeholder history: distinct finite λ below λ(t_0), so that every
        # (unused) Vandermonde system of the warm-up steps is regular.
        lams = lam0 - jnp.arange(1, self.solver_order + 1, dtype=lam0.dtype)
        orders, corrected = self._schedule_arrays(ts.shape[0] - 1)
        ms = (zeros,) * self.solver_order
        # The frame of "the previous step" (read by step 0's corrector, not used).
        one = jnp.ones_like(lam0)
        z = -one if self.predict_x0 else one
        bh = z if self.solver_type == "bh1" else jnp.expm1(z)
        frame = (one, 0 * one, 0 * one, z, bh, one)
        return (x_T, x_T, ms, lams, frame, jnp.asarray(orders), jnp.asarray(corrected))

    # ---- the two updates ---------------------------------------------------------
    def _frame(self, c: StepCoeffs):
        """(coefficient of x, of m₀, the factor F of the correction, z, B(h), h) of
        the step described by `c`. The first two stay exact at σ_s = 0 (h, infinite
        there, is then replaced by 1 where the unused weights need it)."""
        one = jnp.ones_like(c.h)
        h = jnp.where(c.h == 0, one, c.h)
        if self.predict_x0:
            a1 = c.alpha_s * jnp.where(c.exp_neg_h == 0, one, -jnp.expm1(-c.h))
            frame = (c.sigma_ratio, a1, c.alpha_s, -h)
        else:
            frame = (c.alpha_ratio, -c.sigma_phi1, c.sigma_s, h)
        z = frame[3]
        bh = z if self.solver_type == "bh1" else jnp.expm1(z)
        return (*frame, bh, h)

    def _ratios(self, lams: Array, lam_anchor: Array, h: Array) -> list[Array]:
        """r_k = (λ_k − λ_anchor)/h of the history `lams` of a step of size h."""
        return [(lams[k] - lam_anchor) / h for k in range(lams.shape[0])]

    def _pred_weights(self, p, z, bh, r):
        """w_k = ρ̃_k / r_k of UniP-p, k = 1, ..., K − 1 (0 beyond p − 1)."""
        k1 = self.solver_order - 1
        g = _g(z, max(k1, 1))
        table = {}
        for q in range(1, self.solver_order + 1):
            w = [jnp.zeros_like(z)] * k1
            if q == 2:
                w[0] = 0.5 * bh / r[0]
            elif q >= 3:
                rho = _solve(r[: q - 1], g[: q - 1])
                w[: q - 1] = [rho[k] / r[k] for k in range(q - 1)]
            table[q] = w
        return _pick(p, table)

    def _corr_weights(self, p, z, bh, r):
        """(w_1, ..., w_{K−1}, w_new) of UniC-p: ρ̃_k / r_k and ρ̃_p (r_p = 1)."""
        k1 = self.solver_order - 1
        g = _g(z, self.solver_order)
        table = {}
        for q in range(1, self.solver_order + 1):
            w = [jnp.zeros_like(z)] * k1
            if q == 1:
                table[q] = [*w, 0.5 * bh]
                continue
            rho = _solve([*r[: q - 1], jnp.ones_like(z)], g[:q])
            w[: q - 1] = [rho[k] / r[k] for k in range(q - 1)]
            table[q] = [*w, rho[q - 1]]
        return _pick(p, table)

    # x_new = A x + B m₀ − F (Σ_k w_k (m_k − m₀) + w_new (m_new − m₀)): the base is
    # the exponential integrator with m frozen at m₀ (DPM-Solver(++)-1), and the
    # correction integrates the polynomial through the m_k, whose divided
    # differences are D_k (UniPC's eq. (8) with the φ-function weights above).
    def _combine(self, frame, x, m0, hist, w_hist, new=None, w_new=None):
        a, b, f = frame[0], frame[1], frame[2]
        terms = [(a, x), (b, m0)]
        terms += [(-f * w, _diff(m, m0)) for w, m in zip(w_hist, hist)]
        if new is not None:
            terms.append((-f * w_new, _diff(new, m0)))
        return lincomb(*terms)

    def _predictor(self, frame, lam_t, x, m0, hist, lams, p):
        r = self._ratios(lams, lam_t, frame[5])
        w = self._pred_weights(p, frame[3], frame[4], r)
        return self._combine(frame, x, m0, hist, w)

    def _corrector(self, frame, x_last, ms, lams, m_new, p):
        """UniC-p of the step of `frame` (from the point of ms[0], lams[0])."""
        r = self._ratios(lams[1:], lams[0], frame[5])
        w = self._corr_weights(p, frame[3], frame[4], r)
        return self._combine(frame, x_last, ms[0], ms[1:], w[:-1], m_new, w[-1])

    def _model(self, eps, schedule, x, t):
        e, x0 = predict(eps, schedule, x, t, derive=self.predict_x0)
        if not self.predict_x0:
            return e
        if self.thresholding is None:
            return x0
        return dynamic_threshold(x0, *self.thresholding)

    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del noise
        x, x_last, ms, lams, frame_prev, orders, corrected = state
        m = self._model(eps, schedule, x, t)
        # The corrector of step i − 1 (whose frame the state carries), with the model
        # just evaluated at its (uncorrected) result.
        p_prev = orders[jnp.maximum(i - 1, 0)]
        x_c = self._corrector(frame_prev, x_last, ms, lams, m, p_prev)
        x = jtu.tree_map(lambda u, v: jnp.where(corrected[i], u, v), x_c, x)
        c = step_coeffs(schedule, t, s)
        frame = self._frame(c)
        ms_new = (m, *ms[:-1])
        lams_new = jnp.concatenate([c.lam_t[None], lams[:-1]])
        p = jnp.where(c.sigma_zero_end, 1, orders[i])
        x_s = self._predictor(frame, c.lam_t, x, m, ms[:-1], lams, p)
        if self.correct_last:
            x_s = self._last_correction(
                eps, schedule, frame, x, ms_new, lams_new, x_s, s, i, orders, corrected
            )
        return (x_s, x, ms_new, lams_new, frame, orders, corrected)

    def _last_correction(self, eps, schedule, frame, x, ms, lams, x_s, s, i, orders,
                         corrected):
        """After the last step: evaluate the model at x_s and correct (a `lax.cond`,
        so only that step pays the evaluation)."""
        n = orders.shape[0]

        def correct():
            m_s = self._model(eps, schedule, x_s, s)
            x_c = self._corrector(frame, x, ms, lams, m_s, orders[i])
            return jtu.tree_map(lambda u, v: jnp.where(corrected[n], u, v), x_c, x_s)

        return jax.lax.cond(i == n - 1, correct, lambda: x_s)

    def output(self, state) -> PyTree:
        return state[0]


UniPC.__init__.__doc__ = """**Arguments** (diffusers' names and defaults):

- `solver_order`: p ≥ 1 of UniP-p/UniC-p (default 2).
- `solver_type`: B(h), `"bh2"` (default, e^z − 1) or `"bh1"` (z).
- `predict_x0`: integrate in the data prediction (default True) or in ε.
- `lower_order_final`: lower the order of the last steps (default True: the last
    step first order, the one before at most second, for any N).
- `disable_corrector`: indices j of the steps whose result is not corrected
    (diffusers' convention: the corrector run at step j + 1 corrects step j).
- `correct_last`: evaluate the model once more after the last step and correct it
    (diffusers does when its grid ends with a repeated σ: `final_sigmas_type=
    "sigma_min"` on a Karras/exponential/beta/flow grid); the order rule then counts
    that extra step, as diffusers' does.
- `thresholding`: `(ratio, max_value)`: dynamic thresholding of x̂_0 at every
    evaluation (diffusers' `thresholding=True` with `dynamic_thresholding_ratio`,
    `sample_max_value`); needs `predict_x0`.
"""
