"""The McCallum–Foster construction: an algebraically reversible sampler from any
explicit one (McCallum & Foster 2024), on the probability-flow ODE in y = x/α."""

from typing import ClassVar

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import lincomb, tree_zeros_like
from .._schedule import AbstractSchedule
from ._base import AbstractReversibleSampler, AbstractSampler, EpsFn
from ._coeffs import step_coeffs
from ._dpm_solver import DPMSolver2


def _dpm2(schedule: AbstractSchedule, x, e, e_prev, t, s, r, first):
    """DPM-Solver-2's multistep update t → s (either direction) from ε `e` at t and
    a previous ε `e_prev` at λ_t − r h; first order on the first step."""
    c = step_coeffs(schedule, t, s)
    c2 = jnp.where(first, jnp.zeros_like(c.h), c.sigma_s * c.phi2 / r)
    return lincomb((c.alpha_ratio, x), (-c.sigma_s * c.phi1 - c2, e), (c2, e_prev))


def _where_first(i: Array, first: PyTree, other: PyTree) -> PyTree:
    return jtu.tree_map(lambda a, b: jnp.where(i == 0, a, b), first, other)


class McCallumFoster(AbstractReversibleSampler[tuple]):
    """The McCallum–Foster method: makes any explicit sampler of this library
    algebraically reversible, at the base sampler's order, so that
    `aj.ReversibleAdjoint` gives its exact gradient in O(1) memory.

    With ψ_{t→s} the base sampler's step (an exponential integrator: it steps the
    probability-flow ODE in λ, where it is not stiff) and the auxiliary state x̂, a
    step t → s with coupling λ ∈ (0, 1] is

        x_s = ψ_{t→s}(x̂_t) + λ (x_t − x̂_t),
        x̂_s = x̂_t + x_s − ψ_{s→t}(x_s),

    i.e. x_s = λ x_t + (1 − λ) x̂_t + Φ_h(x̂_t) and x̂_s = x̂_t − Φ_{−h}(x_s) with
    Φ_h = ψ_{t→s} − id, where ψ_{s→t} is the base step taken back towards the noise.
    The inverse is

        x̂_t = x̂_s − x_s + ψ_{s→t}(x_s),
        x_t = x̂_t + (x_s − ψ_{t→s}(x̂_t)) / λ.

    The coupling acts on the base's own state x. (The same construction in y = x/α
    would be equivalent to a per-step coupling λ α_s/α_t > λ, i.e. less damping:
    measured 7–10× less accurate around DPMSolver1.)

    **Bases.** A one-step base (state = x, e.g. `aj.DPMSolver1()`) is used through
    its own `step`, forward and with the times swapped. For the multistep
    `aj.DPMSolver2()` the previous ε cannot simply be carried: overwriting it loses
    information, so no exact inverse would exist (any step that reads ε from the
    previous step needs it back when undone, and it can only come from a state that
    would then have to remember the step before, and so on). Instead the state
    carries c ≈ ε one log-SNR step back, updated *reversibly* by

        c_s = (1 + 2λ) ε(x̂_t, t) − λ c_t − λ ε(x_s, s)  (= ε(x̂_t) − λ(c_t − ĉ)),

    where ĉ = 2ε(x̂_t) − ε(x_s) is the linear extrapolation of ε to λ_t − h; so the
    error of c alternates in sign at O(h²) (damped by λ) instead of accumulating.
    The forward base step is DPM-Solver-2's update with previous ε c_t (r = 1; first
    order on step 0, like `DPMSolver2`), the backward base step its update from s
    with previous ε c_s at the target λ_t (r = −1, a trapezoidal exponential step).
    Both are second order: measured slopes 1.99 (closed-form Gaussian, N = 40…320)
    and 2.0 (mixture reference, N = 80…640); `step_back` inverts `step` to round-off
    (1e-13 relative over 640 steps in float64).

    **When to use it:** `McCallumFoster(aj.DPMSolver2())` with the default coupling
    is, with `aj.AsyncLeapfrog`, the reversible sampler to use on sharp data: as
    accurate as `DPMSolver2` from N ≈ 40 on the mixture benchmark and exactly
    invertible. Around the first-order `DPMSolver1` it is 20–60× less accurate than
    `DPMSolver1` itself at λ = 0.999 (see Stability).

    **Order:** the base's order (1 for `DPMSolver1`, 2 for `DPMSolver2`).

    **Cost:** two base steps per step (2 model evaluations for the DPM-Solvers).
    `step_back` costs the same; with `aj.ReversibleAdjoint` the backward pass costs
    per step one `step_back` plus the VJP of one step.

    **Memory:** the state is two copies of x (x, x̂), three for `DPMSolver2` (c).

    **Stability and the coupling.** For a step that contracts by R (the flow of the
    probability-flow ODE contracts towards the data), the parasitic mode x − x̂ is
    multiplied by about λ/R per step and excited at the base's local error. λ < 1
    damps it (stability; on y' = μy the region of stability has an interior only for
    λ < 1), but `step_back` divides by λ, so round-off in the recovered states grows
    like λ^{−N} (reconstruction error). Measured on the sharp Gaussian mixture of
    `benchmarks/reversible_stability.py` (float64, relative errors):

    | base, λ | forward error, N = 10 / 40 / 640 | recovered x_T, N = 40 / 160 / 640 |
    | --- | --- | --- |
    | DPMSolver1, 0.999 | 2 / 0.8 / 4e-2 | 9e-15 / 9e-15 / 1e-14 |
    | DPMSolver1, 0.9 | 1 / 5e-2 / 6e-4 | 1e-14 / 2e-9 / 2e13 |
    | DPMSolver1, 0.5 | 0.2 / 1e-2 / 6e-4 | 8e-5 / 1e31 / nan |
    | DPMSolver2, 0.999 | 0.3 / 4e-3 / 8e-6 | 4e-14 / 7e-14 / 2e-13 |
    | DPMSolver2, 0.5 | 2e-2 / 1e-3 / 5e-6 | 1e-2 / 1e34 / nan |

    (`DPMSolver1` alone: 0.1 / 2e-2 / 7e-4; `DPMSolver2` alone: 0.1 / 3e-3 / 2e-5.)
    In float32 the default recovers x_T to ≤ 1e-4 up to N = 640.

    ??? cite "References"

        ```bibtex
        @article{mccallum2024efficient,
            title={Efficient, Accurate and Stable Gradients for Neural {ODE}s},
            author={McCallum, Sam and Foster, James},
            journal={arXiv preprint arXiv:2410.11648},
            year={2024}
        }
        ```
    """

    base: AbstractSampler
    coupling: float = 0.999

    def __check_init__(self):
        if not isinstance(self.base, AbstractSampler):
            raise TypeError(
                "`McCallumFoster(base)` needs an `aj` sampler such as "
                f"`aj.DPMSolver2()`; got {type(self.base).__name__}."
            )
        if self.base.is_sde:
            raise ValueError(
                f"`McCallumFoster(base={self.base!r})`: the base must be a "
                "deterministic (ODE) sampler such as `aj.DPMSolver1()` or "
                "`aj.DPMSolver2()`; an SDE sampler's steps cannot be inverted."
            )
        if isinstance(self.base, AbstractReversibleSampler):
            raise ValueError(
                f"`McCallumFoster(base={self.base!r})`: the base is already "
                "reversible; use it directly, or wrap an explicit sampler such as "
                "`aj.DPMSolver2()`."
            )
        c = self.coupling
        if isinstance(c, (int, float)) and not 0.0 < c <= 1.0:
            raise ValueError(
                f"`McCallumFoster(coupling=...)` must lie in (0, 1]; got {c!r}."
            )

    @property
    def order(self) -> int:
        return self.base.order

    is_sde: ClassVar[bool] = False

    @property
    def evals_per_step(self) -> int:
        return 2 * self.base.evals_per_step

    @property
    def _multistep(self) -> bool:
        return isinstance(self.base, DPMSolver2)

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> tuple:
        if self._multistep:
            return (x_T, x_T, tree_zeros_like(x_T))
        base_state = jax.eval_shape(lambda: self.base.init(x_T, schedule, ts))
        if jtu.tree_structure(base_state) != jtu.tree_structure(x_T):
            raise ValueError(
                f"`McCallumFoster(base={self.base!r})` needs a one-step base whose "
                "sampler state is x itself (such as `aj.DPMSolver1()`), or "
                "`aj.DPMSolver2()`; this base carries more state."
            )
        return (x_T, x_T)

    def _psi(self, eps, schedule, x, t, s, i):
        """The one-step base's step t → s (s > t steps towards the noise)."""
        return self.base.step(eps, schedule, x, t, s, i, None)

    def step(self, eps: EpsFn, schedule, state, t, s, i, key):
        del key
        lam = self.coupling
        if not self._multistep:
            x, xh = state
            x_s = lincomb(
                (1.0, self._psi(eps, schedule, xh, t, s, i)), (lam, x), (-lam, xh)
            )
            back = self._psi(eps, schedule, x_s, s, t, i)
            xh_s = lincomb((1.0, x_s), (1.0, xh), (-1.0, back))
            return (x_s, xh_s)
        x, xh, c = state
        first = i == 0
        e = eps(xh, t)
        psi = _dpm2(schedule, xh, e, c, t, s, 1.0, first)
        x_s = lincomb((1.0, psi), (lam, x), (-lam, xh))
        b = eps(x_s, s)
        c_s = _where_first(i, e, lincomb((1.0 + 2.0 * lam, e), (-lam, c), (-lam, b)))
        back = _dpm2(schedule, x_s, b, c_s, s, t, -1.0, False)
        xh_s = lincomb((1.0, x_s), (1.0, xh), (-1.0, back))
        return (x_s, xh_s, c_s)

    def step_back(self, eps: EpsFn, schedule, state, t, s, i, key):
        del key
        lam = self.coupling
        if not self._multistep:
            x_s, xh_s = state
            back = self._psi(eps, schedule, x_s, s, t, i)
            xh = lincomb((1.0, back), (1.0, xh_s), (-1.0, x_s))
            fwd = self._psi(eps, schedule, xh, t, s, i)
            x = lincomb((1.0, xh), (1.0 / lam, x_s), (-1.0 / lam, fwd))
            return (x, xh)
        x_s, xh_s, c_s = state
        first = i == 0
        b = eps(x_s, s)
        back = _dpm2(schedule, x_s, b, c_s, s, t, -1.0, False)
        xh = lincomb((1.0, back), (1.0, xh_s), (-1.0, x_s))
        e = eps(xh, t)
        c = _where_first(
            i,
            tree_zeros_like(c_s),
            lincomb((1.0 / lam + 2.0, e), (-1.0, b), (-1.0 / lam, c_s)),
        )
        psi = _dpm2(schedule, xh, e, c, t, s, 1.0, first)
        x = lincomb((1.0, xh), (1.0 / lam, x_s), (-1.0 / lam, psi))
        return (x, xh, c)

    def output(self, state) -> PyTree:
        return state[0]


McCallumFoster.__init__.__doc__ = """**Arguments:**

- `base`: the explicit ODE sampler to make reversible: a one-step sampler (state = x,
    such as `aj.DPMSolver1()`) or `aj.DPMSolver2()`. Not an SDE sampler.
- `coupling`: λ ∈ (0, 1], default 0.999. Smaller is more stable forward but loses
    a factor 1/λ per step when states are recovered backward.
"""
