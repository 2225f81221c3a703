"""The McCallum–Foster construction: an algebraically reversible sampler from any
explicit one (McCallum & Foster 2024), on the probability-flow ODE in y = x/α."""

import math
import warnings
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree

from .._misc import (
    concrete_float,
    describe_class_error,
    is_concrete,
    tree_zeros_like,
)
from .._schedule import AbstractSchedule
from ._base import (
    AbstractMultistepSampler,
    AbstractOneStepSampler,
    AbstractReversibleSampler,
    AbstractSampler,
    EpsFn,
    round_off_growth,
)


def _where_first(i: Array, first: PyTree, other: PyTree) -> PyTree:
    return jtu.tree_map(lambda a, b: jnp.where(i == 0, a, b), first, other)


def _couple(lam, fn, *trees):
    """`fn(λ, *leaves)` leaf by leaf, with the coupling λ in each leaf's dtype (the
    same rounded λ in `step` and `step_back`)."""
    return jtu.tree_map(lambda *v: fn(jnp.asarray(lam).astype(v[0].dtype), *v), *trees)


class McCallumFoster(AbstractReversibleSampler[tuple]):
    """The McCallum–Foster method: makes any explicit sampler of this library
    algebraically reversible, at the base sampler's order, so that
    `aj.ReversibleAdjoint` gives its exact gradient in O(1) memory.

    With ψ_{t→s} the base sampler's step (an exponential integrator: it steps the
    probability-flow ODE in λ, where it is not stiff) and the auxiliary state x̂, a
    step t → s with coupling λ ∈ (0, 1] is

        x_s = ψ_{t→s}(x̂_t) + λ (x_t − x̂_t),
        x̂_s = x̂_t + x_s − ψ_{s→t}(x_s),

    i.e. `x_s = λ x_t + (1 − λ) x̂_t + Φ_h(x̂_t)` and `x̂_s = x̂_t − Φ_{−h}(x_s)`
    with `Φ_h = ψ_{t→s} − id`, where `ψ_{s→t}` is the base step taken back towards
    the noise.
    The inverse is

        x̂_t = x̂_s − x_s + ψ_{s→t}(x_s),
        x_t = x̂_t + (x_s − ψ_{t→s}(x̂_t)) / λ.

    The coupling acts on the base's own state x. (The same construction in y = x/α
    would be equivalent to a per-step coupling λ α_s/α_t > λ, i.e. less damping:
    measured 7–10× less accurate around DPMSolver1.)

    **Bases.** Any `aj.AbstractOneStepSampler` (`aj.ExpRK`: reversible exponential
    Runge–Kutta of any tableau, Rex's construction, Blasingame et al. 2026), whose
    ψ is its `interior_advance` (all stages, either direction), and any
    `aj.AbstractMultistepSampler`: the method asks its base for its
    `update` (the exponential step from ε at the current point and at most one
    earlier ε), forward and with the times swapped. A one-step base (`memory = 0`,
    e.g. `aj.DPMSolver1()`) needs nothing more. For a base with memory
    (`memory = 1`, e.g. `aj.DPMSolver2()`) the previous ε cannot simply be carried:
    overwriting it loses information, so no exact inverse would exist (any step that
    reads ε from the previous step needs it back when undone, and it can only come
    from a state that would then have to remember the step before, and so on).
    Instead the state
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

    **Cost:** two base steps per step (2 model evaluations; 2 × the stages around
    `aj.ExpRK`). `step_back` evaluates the model at the same points, which
    `aj.ReversibleAdjoint` fuses with the step's VJP (`rebuild = "shared"`): one
    model VJP per forward evaluation and nothing else (`tests/test_rex.py`).
    Around `aj.ExpRK("tsit5")` (random MLP, N = 12, float64) its gradient equals
    `aj.DTO()`'s to 7e-13.

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

    **Precision of the gradient.** With `aj.ReversibleAdjoint`, round-off in the
    rebuilt states shows in the gradient. Around `DPMSolver1()` it stays at the
    level of asynchronous leapfrog (float32, random MLP, N = 24: 1e-6–7e-6 from
    `aj.DTO`). Around `DPMSolver2()` it is 5–15× larger (5e-6–6e-5), and the
    coupling is not the cause (0.999^{−24} = 1.02): inverting the ε memory,
    c_t = 2ε(x̂_t) − ε(x_s) − (c_s − ε(x̂_t))/λ, multiplies an error in the rebuilt
    x̂_t by (2 + 1/λ)·∂ε/∂x ≈ 3·∂ε/∂x, which then returns to x̂ through the
    second-order coefficients; at log-SNR steps h ≈ 0.4 the backward map's spectral
    norm reaches 5 per step, against 2.6 for asynchronous leapfrog and 1.2 around
    `DPMSolver1`. (Reducing that factor would take a memory update that damps less
    in the forward pass: damping forward is amplification backward.) The step and
    its inverse form the small differences x − x̂ and 2ε − c − b first and divide
    by the very λ they multiplied by, so that the coefficients round consistently:
    with a float16 state this took the error from 45% to 4%. A 16-bit state remains
    unsafe for every reversible sampler (`aj.ReversibleAdjoint` warns), and in
    bfloat16 the default coupling 0.999 rounds to 1 (a warning says so).

    **float32.** `aj.ReversibleAdjoint` with float32 state and weights against the
    float64 `aj.DTO` gradient (random MLP of `tests/test_reversible_float32.py`,
    t_end = 1e-3, default coupling; relative errors of ∂L/∂x_T / ∂L/∂θ):

    | base | N = 10 | N = 20 | N = 40 |
    | --- | --- | --- | --- |
    | `DPMSolver1()` | 4e-6 / 1e-6 | 6e-6 / 2e-6 | 1e-5 / 3e-6 |
    | `DPMSolver2()` | 2e-5 / 2e-5 | 1e-5 / 1e-5 | 1e-5 / 9e-6 |

    float32 gradient error bound (N = 10 / 20 / 40): 5e-5 / 5e-5 / 5e-5 (either
    base, default coupling; checked by that test). A smaller coupling loses 1/λ per
    step: at λ = 0.9, measured 7e-5 at N = 40 and 2e-3 at N = 80 around
    `DPMSolver2()`, 8e-5 at N = 80 and 8e-3 at N = 120 around `DPMSolver1()`;
    `aj.ReversibleAdjoint` warns at trace time where λ^−N ε_mach (×10 for a base
    with ε memory) passes 1e-3.

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

    base: AbstractMultistepSampler | AbstractOneStepSampler
    coupling: float | Array = 0.999

    # `step_back` evaluates the model where `step` does: `step` makes ψ_{t→s}(x̂_t)'s
    # k evaluations, then ψ_{s→t}(x_s)'s; `step_back` the latter first, then the
    # former (for a base with ε memory, k = 1: ε(x̂_t), then ε(x_s)).
    rebuild: ClassVar[str] = "shared"

    def shared_evaluations(self, num: int) -> tuple[int, ...]:
        k = num // 2
        return tuple((j + k) % num for j in range(num))

    def __check_init__(self):
        msg = describe_class_error("McCallumFoster(base)", self.base, "aj.DPMSolver2()")
        if msg:
            raise TypeError(msg)
        if not isinstance(self.base, AbstractSampler):
            raise TypeError(
                "`McCallumFoster(base)` needs an `aj` sampler such as "
                f"`aj.DPMSolver2()`; got {type(self.base).__name__}."
            )
        if isinstance(self.base, AbstractReversibleSampler):
            raise ValueError(
                f"`McCallumFoster(base={self.base!r})`: the base is already "
                "reversible; use it directly, or wrap an explicit sampler such as "
                "`aj.DPMSolver2()`."
            )
        explicit = (AbstractMultistepSampler, AbstractOneStepSampler)
        if self.base.is_sde or not isinstance(self.base, explicit):
            raise ValueError(
                f"`McCallumFoster(base={self.base!r})`: the base must be an explicit "
                "ODE sampler: a one-step map of x (an `aj.AbstractOneStepSampler` "
                "such as `aj.ExpRK()`) or a step that evaluates ε once and reuses at "
                "most one earlier ε, such as `aj.DPMSolver1()` or `aj.DPMSolver2()`"
                + (
                    "; an SDE sampler's steps cannot be inverted."
                    if self.base.is_sde
                    else "."
                )
            )
        if getattr(self.base, "memory", 0) not in (0, 1):
            raise ValueError(
                f"`McCallumFoster(base={self.base!r})`: bases that reuse more than one "
                "earlier ε are not supported."
            )
        if jnp.ndim(self.coupling) != 0:
            raise ValueError(
                "`McCallumFoster(coupling=...)` must be a scalar; got shape "
                f"{jnp.shape(self.coupling)}."
            )
        c = concrete_float(self.coupling)
        if c is not None and not 0.0 < c <= 1.0:
            raise ValueError(
                f"`McCallumFoster(coupling=...)` must lie in (0, 1]; got {c!r}."
            )

    @property
    def order(self) -> int:
        return self.base.order

    is_sde: ClassVar[bool] = False
    # It evaluates the model at the end of each step (σ = 0 at a grid's end) and
    # steps back towards the start (α = 0 at a grid's start).
    steps_to_sigma_zero: ClassVar[bool] = False
    steps_from_alpha_zero: ClassVar[bool] = False

    @property
    def evals_per_step(self) -> int:
        return 2 * self.base.evals_per_step

    def _lam(self, like: PyTree) -> Array:
        """The coupling, with a runtime check when it is traced, and a warning when
        it rounds to 1 in the state's dtype (bfloat16 rounds 0.999 to 1.0, which
        removes the damping the method relies on)."""
        lam = self.coupling
        if not is_concrete(lam):
            lam = eqx.error_if(
                lam,
                ~((lam > 0) & (lam <= 1)),
                "McCallumFoster coupling must lie in (0, 1].",
            )
        else:
            dtype = jtu.tree_leaves(like)[0].dtype
            c = float(lam)
            if c < 1 and float(np.asarray(c).astype(dtype)) == 1.0:
                warnings.warn(
                    f"McCallumFoster(coupling={c}) rounds to 1.0 in the state's dtype "
                    f"{jnp.dtype(dtype).name}: the method loses its damping. Use a "
                    "coupling representable below 1 in that dtype (e.g. 0.99 for "
                    "bfloat16) or keep x_T in float32.",
                    stacklevel=3,
                )
        return lam

    def precision_warning(self, num_steps, dtype):
        lam = concrete_float(self.coupling)
        if lam is None:  # traced: unknown at trace time
            return None
        # λ^−N, and ~10× more through the ε memory of a second-order base (a fit to
        # the float32 measurements of the docstring).
        log_growth = -num_steps * math.log(lam) + self._memory * math.log(10.0)
        err = round_off_growth(dtype, log_growth)
        if err <= 1e-3:
            return None
        return (
            f"McCallumFoster(coupling={lam}) divides by λ in every inverse step, so "
            f"round-off grows like λ^−N: to about {err:.0e} (relative) here "
            "(measured in float32 at λ = 0.9: 2e-3 at N = 80 around DPMSolver2, 8e-3 "
            "at N = 120 around DPMSolver1)."
        )

    @property
    def _memory(self) -> int:
        return getattr(self.base, "memory", 0)

    def _psi(self, eps: EpsFn, schedule, x, a, b):
        """ψ_{a→b}(x): the base's step from a to b (either direction), for a base
        without ε memory."""
        if isinstance(self.base, AbstractOneStepSampler):
            return self.base.interior_advance(eps, schedule, x, a, b)
        return self.base.update(schedule, x, eps(x, a), None, a, b, None, True)

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> tuple:
        del schedule, ts
        if self._memory:
            return (x_T, x_T, tree_zeros_like(x_T))
        return (x_T, x_T)

    # The step, written so that the small differences x − x̂ and 2ε̂ − c − b are
    # formed first (the coupling acts on them) and the inverse divides by the very
    # coupling the step multiplied by.
    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del noise
        lam = self._lam(state[0])
        first = i == 0
        if not self._memory:
            x, xh = state
            psi = self._psi(eps, schedule, xh, t, s)
            x_s = _couple(lam, lambda lam_, p, a, b: p + lam_ * (a - b), psi, x, xh)
            back = self._psi(eps, schedule, x_s, s, t)
            xh_s = _couple(lam, lambda lam_, a, h, bk: a + (h - bk), x_s, xh, back)
            return (x_s, xh_s)
        update = self.base.update
        x, xh, c = state
        e = eps(xh, t)
        psi = update(schedule, xh, e, c, t, s, 1.0, first)
        x_s = _couple(lam, lambda lam_, p, a, b: p + lam_ * (a - b), psi, x, xh)
        b = eps(x_s, s)
        # c_s = (1 + 2λ) e − λ c − λ b = e + λ ((e − c) + (e − b)).
        c_s = _couple(
            lam, lambda lam_, e_, c_, b_: e_ + lam_ * ((e_ - c_) + (e_ - b_)), e, c, b
        )
        c_s = _where_first(i, e, c_s)
        back = update(schedule, x_s, b, c_s, s, t, -1.0, False)
        xh_s = _couple(lam, lambda lam_, a, h, bk: a + (h - bk), x_s, xh, back)
        return (x_s, xh_s, c_s)

    def step_back(self, eps: EpsFn, eps_prev: EpsFn, schedule, state, t, s, i, noise):
        del eps_prev, noise
        lam = self._lam(state[0])
        first = i == 0
        if not self._memory:
            x_s, xh_s = state
            back = self._psi(eps, schedule, x_s, s, t)
            xh = _couple(lam, lambda lam_, bk, h, a: bk + (h - a), back, xh_s, x_s)
            psi = self._psi(eps, schedule, xh, t, s)
            x = _couple(lam, lambda lam_, h, a, p: h + (a - p) / lam_, xh, x_s, psi)
            return (x, xh)
        update = self.base.update
        x_s, xh_s, c_s = state
        b = eps(x_s, s)
        back = update(schedule, x_s, b, c_s, s, t, -1.0, False)
        xh = _couple(lam, lambda lam_, bk, h, a: bk + (h - a), back, xh_s, x_s)
        e = eps(xh, t)
        # c = 2e − b − (c_s − e)/λ, the inverse of the update of c in `step`.
        c = _couple(
            lam, lambda lam_, e_, b_, cs: e_ + ((e_ - b_) - (cs - e_) / lam_), e, b, c_s
        )
        c = _where_first(i, tree_zeros_like(c_s), c)
        psi = update(schedule, xh, e, c, t, s, 1.0, first)
        x = _couple(lam, lambda lam_, h, a, p: h + (a - p) / lam_, xh, x_s, psi)
        return (x, xh, c)

    def output(self, state) -> PyTree:
        return state[0]


McCallumFoster.__init__.__doc__ = """**Arguments:**

- `base`: the explicit ODE sampler to make reversible: an `aj.AbstractOneStepSampler`
    such as `aj.ExpRK("tsit5")`, or an `aj.AbstractMultistepSampler` such as
    `aj.DPMSolver1()` or `aj.DPMSolver2()`. Not an SDE sampler.
- `coupling`: λ ∈ (0, 1], default 0.999. Smaller is more stable forward but loses
    a factor 1/λ per step when states are recovered backward.
"""
