"""Explicit exponential Runge–Kutta samplers of the probability-flow ODE: any Butcher
tableau of `_tableaus.py`, applied where the ODE's linear part is exact (Rex's
"Lawson" form in ρ = σ/α, or a φ-function form in λ)."""

import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractOneStepSampler, EpsFn, predict
from ._coeffs import step_coeffs
from ._tableaus import TABLEAUS


_FORMS = ("auto", "lawson", "phi")


def phi(k: int, z: Array) -> Array:
    """φ_k(z) = Σ_{j≥0} z^j/(j + k)! for k = 1, 2, 3: (e^z − Σ_{j<k} z^j/j!)/z^k,
    by its series below |z| < ½ (16 terms, truncation < 1e-20) and directly above
    (cancellation < 30 ε_mach); the direct branch sees z = 1 where the series is
    taken (the double-where), so φ_k and its derivative are finite at z = 0."""
    small = jnp.abs(z) < 0.5
    zs = jnp.where(small, jnp.ones_like(z), z)
    head = sum(zs**j / math.factorial(j) for j in range(1, k))
    direct = (jnp.expm1(zs) - head) / zs**k
    series = jnp.zeros_like(z)
    for j in range(15, -1, -1):  # Horner
        series = series * z + 1.0 / math.factorial(j + k)
    return jnp.where(small, series, direct)


# The φ-form coefficients a_ij(h), b_i(h) (and b̂_i(h)) of an exponential Runge–Kutta
# method (Hochbruck & Ostermann 2005, 2010) for v' = v − ε̂ in v = x/σ against λ
# (the linear part L = 1 is exact); each tends to its tableau's constant as h → 0.
# Entries not listed are 0. Derivations above each.
def _phi_euler(h):
    # Exponential Euler = DPM-Solver-1 (DDIM).
    return {}, [phi(1, h)], None


def _phi_midpoint(h):
    # DPM-Solver-2 (Lu et al. 2022, Alg. 4, r₁ = ½): the stage is DPM-Solver-1 to the
    # λ-midpoint and the update uses its ε alone, x_s = (α_s/α_t)x − σ_s(e^h − 1)ε̂_u.
    return {(1, 0): 0.5 * phi(1, 0.5 * h)}, [jnp.zeros_like(h), phi(1, h)], None


def _phi_heun(h):
    # The trapezoid made exponential (ε linear in λ between the ends, integrated
    # against e^{λ_s − λ} exactly): b = (φ₁ − φ₂, φ₂); embedded: exponential Euler.
    p1, p2 = phi(1, h), phi(2, h)
    return {(1, 0): p1}, [p1 - p2, p2], [p1, jnp.zeros_like(h)]


def _phi_dpm3(h):
    # DPM-Solver-3 (Lu et al. 2022, Alg. 5, r₁ = ⅓, r₂ = ⅔): u₁ is DPM-Solver-1 to
    # λ_t + r₁h; u₂ adds −σ(r₂/r₁)(e^{r₂h} − 1 − r₂h)/(r₂h) D₁, D₁ = ε̂(u₁) − ε̂_t;
    # x_s adds −σ_s (1/r₂)((e^h − 1)/h − 1) D₂, D₂ = ε̂(u₂) − ε̂_t. In φ-functions
    # ((e^{rh} − 1 − rh)/(rh) = rh φ₂(rh)): a₃₂ = (r₂²/r₁)φ₂(r₂h), b₃ = φ₂(h)/r₂.
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    a32 = (r2 * r2 / r1) * phi(2, r2 * h)
    b3 = phi(2, h) / r2
    a = {(1, 0): r1 * phi(1, r1 * h), (2, 0): r2 * phi(1, r2 * h) - a32, (2, 1): a32}
    return a, [phi(1, h) - b3, jnp.zeros_like(h), b3], None


def _phi_rk4(h):
    # Cox & Matthews' ETDRK4 (2002): stages 2, 3 exponential Euler / midpoint to
    # λ_t + h/2, stage 4 from stage 2 by e^{h/2}u₂ + (h/2)φ₁(h/2)(2N₃ − N₁);
    # b = quadrature of the quadratic through (0, ½, 1) against e^{(1−θ)h}:
    # (φ₁ − 3φ₂ + 4φ₃, 2φ₂ − 4φ₃, 2φ₂ − 4φ₃, 4φ₃ − φ₂).
    q = 0.5 * phi(1, 0.5 * h)
    p1, p2, p3 = phi(1, h), phi(2, h), phi(3, h)
    a = {(1, 0): q, (2, 1): q, (3, 0): q * jnp.expm1(0.5 * h), (3, 2): 2.0 * q}
    mid = 2.0 * p2 - 4.0 * p3
    return a, [p1 - 3.0 * p2 + 4.0 * p3, mid, mid, 4.0 * p3 - p2], None


_PHI = {
    "euler": _phi_euler,
    "midpoint": _phi_midpoint,
    "heun": _phi_heun,
    "dpm3": _phi_dpm3,
    "rk4": _phi_rk4,
}


def _full(x: PyTree, value) -> PyTree:
    return jtu.tree_map(lambda v: jnp.full_like(v, value), x)


class ExpRK(AbstractOneStepSampler):
    """An explicit Runge–Kutta method (any of `_tableaus.TABLEAUS`) applied to the
    probability-flow ODE where its linear part is exact. The state is x alone.

    **Forms** (`form`), with h = λ_s − λ_t:

    - `"lawson"`: Rex's form (Blasingame et al. 2026, `zblasingame/Rex-solver`,
        `_psi_step` with `prediction_type="noise"`): the ODE in y = x/α against
        ρ = σ/α = e^{−λ} is dy/dρ = ε̂(α y, t(ρ)), and the tableau is applied to it
        as it stands: stage i at ρ_t + c_i Δρ (its time from `schedule.t_of_lam`),

            x_i = (α_i/α_t) x_t + α_i Δρ Σ_j a_ij ε̂_j,
            x_s = (α_s/α_t) x_t − σ_s(e^h − 1) Σ_i b_i ε̂_i,

        with α_i Δρ = α_i e^{−λ_t}(e^{−h} − 1) (so α_s Δρ = −σ_s(e^h − 1), finite
        and accurate for small h). Defined for every tableau; Euler is DDIM.
        (Rex's default, `prediction_type="data"`, is the same construction in
        y = x/σ against e^{λ} with the data prediction: not implemented here.)

    - `"phi"`: an exponential Runge–Kutta method in λ (Hochbruck–Ostermann): in
        v = x/σ the ODE is v' = v − ε̂ with a constant linear part, solved exactly;
        the stages sit at λ_t + c_i h and the weights are φ-functions,

            x_i = (α_i/α_t) x_t − σ_i h Σ_j a_ij(h) ε̂_j,
            x_s = (α_s/α_t) x_t − σ_s h Σ_i b_i(h) ε̂_i.

        Defined for "euler" (DPM-Solver-1), "midpoint" (DPM-Solver-2), "dpm3"
        (DPM-Solver-3, Lu et al. 2022's singlestep solvers), "heun" (b = (φ₁ − φ₂,
        φ₂), embedded exponential Euler) and "rk4" (Cox–Matthews ETDRK4); the
        coefficients are written out in this file. Other tableaus: a ValueError.

    **Endpoints.** A step to σ = 0 (a grid ending at t = 0) is the data prediction
    α_s x̂_0(x_t) (one evaluation, first order, as `aj.Heun`), chosen by a
    `lax.switch` so that no stage is evaluated at σ = 0; its error estimate is 0. A
    step from α = 0 is not supported (y = x/α is infinite there):
    `steps_from_alpha_zero = False` and `aj.sample` refuses such grids; `advance`
    returns NaN for a step from σ = 0 or α = 0. A zero-length step (t == s, e.g.
    the padding of an adaptive grid) returns x itself, evaluating nothing, with
    finite gradients (identity in x, zero in the parameters).

    **When to use it:** a high-order single-step sampler for accurate solves (the
    reference of a benchmark, small tolerances, few NFE wasted on warm-up), and
    with its embedded error estimate (`advance_with_error`: "heun", "bosh3",
    "dopri5", "tsit5") for error-controlled grids. For few steps on image models
    the multistep `aj.DPMSolverPP` and `aj.UniPC` reach a given error with fewer
    evaluations. **Order:** the tableau's: euler 1, midpoint 2, heun 2, dpm3 3,
    bosh3 3, rk4 4, dopri5 5, tsit5 5 (embedded: heun 1, bosh3 2, dopri5 4, tsit5
    4). Measured slopes of x_0's error (`tests/test_exp_rk.py`; closed-form
    Gaussian, N in brackets / sharp mixture vs its reference):

        euler    L, φ 0.96 (16–64) / 1.02 (80–320)
        midpoint L 2.97* (16–64) / 1.93;  φ 2.05 / 2.01
        heun     L 2.09 (16–64) / 2.04;   φ 2.04 / 2.03
        dpm3     L 3.00 (64–256) / 2.98;  φ 3.07 / 3.06
        bosh3    L 2.94 (16–64) / 3.04
        rk4      L 4.01 (16–64) / 3.96;   φ 4.17 / 3.92
        dopri5   L 6.16 (8–32) / 6.72 (20–80)†
        tsit5    L 6.69 (8–32) / 7.79 (20–80)†

    `*`: the Gaussian's ODE cancels the midpoint rule's h³ local-error term (order
    3 there). `†`: faster than h⁵ all the way down to the reference's floor (1e-12):
    the asymptotic regime is not reached in float64.

    **Cost:** `evals_per_step` = the stages of the solution: 1, 2, 2, 3, 3, 4, 6, 6
    (the FSAL stage of bosh3/dopri5/tsit5 is used only by the error estimate:
    `advance_with_error` costs one more, 4/7/7; there is no FSAL reuse across steps,
    since the state is x alone). **Memory:** x and the stage ε̂'s of one step.
    **Low precision.** A tableau's large coefficients amplify the round-off of a
    low-precision model: with a bfloat16 network under a float32 state (random MLP,
    N = 5, the `tests/test_matrix.py` problem) the DTO gradient is 46–82% off float64's
    with "tsit5" (|a_ij| up to 13), 2–4% with "bosh3", as with `aj.DPMSolver2`; use a
    low-order tableau, or many steps, with a bfloat16 network.
    **Gradients:** `aj.DTO()` (exact); the continuous adjoints (`aj.AdjointDEIS`,
    `aj.RecordedAdjoint`, `aj.InterpolatedAdjoint`) give the probability-flow
    ODE's adjoint. It is not reversible on its own: `aj.McCallumFoster(aj.ExpRK())`
    calls `advance` both ways (s > t steps back towards the noise).

    **Lawson or φ (measured).** Relative error of x_0 at equal NFE (same tableau and
    N), Lawson / φ: closed-form Gaussian (`GaussianProblem.make(4)`, N = 32) and
    the sharp mixture (`MixtureProblem.make(2)`, 8 points, N = 80, against
    `reference` at rtol 1e-13):

        midpoint  5.4e-4 / 5.8e-3    1.16e-4 / 1.30e-4
        heun      1.19e-2 / 7.6e-3   2.48e-4 / 1.66e-4
        dpm3      2.1e-4 / 3.9e-5    7.8e-6 / 3.3e-6
        rk4       7.0e-5 / 2.3e-5    6.1e-7 / 5.1e-7

    (Euler is the same update in both.) φ wins for heun, dpm3 and rk4 (1.2–5×),
    Lawson for midpoint (DPM-Solver-2's φ form weights only the midpoint ε). The
    default `form="auto"` takes the more accurate: φ for euler, heun, dpm3, rk4;
    Lawson for midpoint and for the tableaus without a φ form.
    """

    tableau: str = eqx.field(default="tsit5", static=True)
    form: str = eqx.field(default="auto", static=True)

    is_sde: ClassVar[bool] = False
    steps_to_sigma_zero: ClassVar[bool] = True
    steps_from_alpha_zero: ClassVar[bool] = False

    def __check_init__(self):
        if self.tableau not in TABLEAUS:
            raise ValueError(
                f"`ExpRK(tableau=...)` must be one of {tuple(TABLEAUS)}; got "
                f"{self.tableau!r}."
            )
        if self.form not in _FORMS:
            raise ValueError(
                f"`ExpRK(form=...)` must be one of {_FORMS}; got {self.form!r}."
            )
        if self.form == "phi" and self.tableau not in _PHI:
            raise ValueError(
                f"`ExpRK(tableau={self.tableau!r}, form='phi')`: no φ-function form is "
                f"defined for {self.tableau!r}; the φ form exists for {tuple(_PHI)}. "
                "Use form='lawson' (every tableau)."
            )

    @property
    def resolved_form(self) -> str:
        """The form used: `form`, or for "auto" the more accurate per evaluation
        (measured above): "phi" for euler, heun, dpm3, rk4, else "lawson"."""
        if self.form != "auto":
            return self.form
        phi_better = self.tableau in _PHI and self.tableau != "midpoint"
        return "phi" if phi_better else "lawson"

    @property
    def order(self) -> int:
        return TABLEAUS[self.tableau].order

    @property
    def evals_per_step(self) -> int:
        return TABLEAUS[self.tableau].stages

    @property
    def embedded_order(self) -> int | None:
        """The order of the embedded solution (None without an error estimate)."""
        if not self.has_error_estimate:
            return None
        if self.resolved_form == "phi":
            return 1
        return TABLEAUS[self.tableau].embedded_order

    @property
    def has_error_estimate(self) -> bool:
        if self.resolved_form == "phi":
            return self.tableau == "heun"
        return TABLEAUS[self.tableau].b_hat is not None

    def advance(self, eps: EpsFn, schedule: AbstractSchedule, x: PyTree, t, s):
        """One step t → s of x, in either direction (s > t: back towards the noise)."""
        return self._step(eps, schedule, x, t, s, False)[0]

    def interior_advance(self, eps: EpsFn, schedule: AbstractSchedule, x, t, s):
        """The tableau's step alone (no `lax.switch`): times of finite log-SNR."""
        return self._rk(eps, schedule, x, jnp.asarray(t), jnp.asarray(s), False)[0]

    def advance_with_error(self, eps: EpsFn, schedule: AbstractSchedule, x, t, s):
        """(x_s, err): the step t → s and the difference between it and the embedded
        lower-order solution, in x's units (a pytree like x)."""
        if not self.has_error_estimate:
            have = [k for k, v in TABLEAUS.items() if v.b_hat is not None]
            raise ValueError(
                f"`ExpRK(tableau={self.tableau!r}, form={self.form!r})` has no "
                f"embedded error estimate; tableaus with one: {have} (form='phi': "
                "'heun' only)."
            )
        return self._step(eps, schedule, x, t, s, True)

    def _step(self, eps, schedule, x, t, s, with_error):
        t, s = jnp.asarray(t), jnp.asarray(s)
        same = t == s
        c = step_coeffs(schedule, t, s)
        from_end = (c.alpha_t == 0) | (c.sigma_t == 0) | (c.alpha_s == 0)
        to_data = c.sigma_zero_end
        # Branches 0 identity, 1 data prediction, 2 the tableau, 3 undefined (NaN).
        index = jnp.where(same, 0, jnp.where(from_end, 3, jnp.where(to_data, 1, 2)))
        # The double-where: each branch sees times where it is finite (a zero-length
        # step at an interior time when it is not the branch taken), so no NaN from
        # an untaken branch reaches a value or a gradient, also under vmap.
        mid = jnp.asarray(0.5 * (schedule.t_min + schedule.t_max), t.dtype)
        t_rk = jnp.where(index == 2, t, mid)
        s_rk = jnp.where(index == 2, s, mid)
        t_d = jnp.where(index == 1, t, mid)
        zeros = _full(x, 0)

        def identity(x):
            return x, zeros

        def data(x):
            _, x0 = predict(eps, schedule, x, t_d)
            return lincomb((c.alpha_s, x0)), zeros

        def tableau(x):
            x_s, err = self._rk(eps, schedule, x, t_rk, s_rk, with_error)
            return x_s, zeros if err is None else err

        def undefined(x):
            return _full(x, jnp.nan), zeros

        return jax.lax.switch(index, (identity, data, tableau, undefined), x)

    # One step of the tableau between interior times (finite λ at both ends). Both
    # forms write stage i as x_i = (α_i/α_t) x_t + g_i Σ_j A_ij ε̂_j, with
    #   lawson: stage at ρ_i = ρ_t(1 + c_i(e^{−h} − 1)), i.e. λ_i = λ_t − log1p(c_i
    #     expm1(−h)), g_i = α_i Δρ = e^{log α_i − λ_t} expm1(−h), A = the tableau's a;
    #   phi: stage at λ_i = λ_t + c_i h, g_i = −σ_i h, A = a(h) (the φ-functions);
    # and the solution (err: with b − b̂) likewise with g_s and b.
    def _rk(self, eps, schedule, x, t, s, with_error):
        tab = TABLEAUS[self.tableau]
        n = tab.error_stages if with_error else tab.stages
        la_t, ls_t = schedule.log_alpha(t), schedule.log_sigma(t)
        la_s, ls_s = schedule.log_alpha(s), schedule.log_sigma(s)
        lam_t = la_t - ls_t
        h = (la_s - ls_s) - lam_t
        if self.resolved_form == "lawson":
            em = jnp.expm1(-h)
            lam_at = lambda ci: lam_t - jnp.log1p(ci * em)
            gain = lambda la, ls: jnp.exp(la - lam_t) * em
            a = {(i, j): float(tab.a[i, j]) for i in range(n) for j in range(i)
                 if tab.a[i, j] != 0}
            b = [float(v) for v in tab.b]
            b_hat = None if tab.b_hat is None else [float(v) for v in tab.b_hat]
        else:
            lam_at = lambda ci: lam_t + ci * h
            gain = lambda la, ls: -jnp.exp(ls) * h
            a, b, b_hat = _PHI[self.tableau](h)
        ks = []
        for i in range(n):
            ci = float(tab.c[i])
            if ci == 0.0:
                ti, la_i, ls_i = t, la_t, ls_t
            elif ci == 1.0:
                ti, la_i, ls_i = s, la_s, ls_s
            else:
                ti = schedule.t_of_lam(lam_at(ci))
                la_i, ls_i = schedule.log_alpha(ti), schedule.log_sigma(ti)
            g = gain(la_i, ls_i)
            terms = [(g * a[i, j], ks[j]) for j in range(i) if (i, j) in a]
            x_i = lincomb((jnp.exp(la_i - la_t), x), *terms) if terms else x
            ks.append(predict(eps, schedule, x_i, ti, derive=False)[0])
        g_s = gain(la_s, ls_s)
        x_s = lincomb((jnp.exp(la_s - la_t), x),
                      *[(g_s * b[i], ks[i]) for i in range(tab.stages)])
        if not with_error:
            return x_s, None
        err = lincomb(*[(g_s * (b[i] - (b_hat[i] if i < len(b_hat) else 0.0)), ks[i])
                        for i in range(n)])
        return x_s, err


ExpRK.__init__.__doc__ = """**Arguments:**

- `tableau`: `"tsit5"` (default), `"euler"`, `"midpoint"`, `"heun"`, `"bosh3"`,
    `"rk4"`, `"dopri5"` or `"dpm3"` (DPM-Solver-3's nodes; Heun's third-order
    method as h → 0).
- `form`: `"auto"` (default: the more accurate, `"phi"` for euler, heun, dpm3
    and rk4, else `"lawson"`), `"lawson"` (Rex's y = x/α against σ/α, every
    tableau) or `"phi"`
    (exponential RK in λ with φ-function weights: euler, midpoint, heun, dpm3, rk4).
"""
