"""BELM with the O-BELM coefficients (Wang et al. 2024): an exactly invertible
two-step linear multistep method of the probability-flow ODE, one evaluation per
step."""

from typing import ClassVar

import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import lincomb, tree_zeros_like
from .._schedule import AbstractSchedule
from ._base import AbstractReversibleSampler, EpsFn
from ._reversible_heun import rho_coeffs, zero_on_first


def previous_time(ts: Array, t: Array, i: Array) -> Array:
    """t_{i−1} (t itself on step 0) from the grid a two-step sampler keeps in its
    state: the last grid time before t, so that zero-length steps in between (which
    left the state as it was) are passed over."""
    k = jnp.maximum(jnp.sum(ts > t) - 1, 0)
    return jnp.where(i > 0, ts[k], t)


def two_step_coeffs(schedule: AbstractSchedule, ts: Array, t, s, i):
    """For the step t_i → t_{i+1} = s of a two-step method: (A_i, k_i) = rho_coeffs(t,
    s), (A_p, k_p) = rho_coeffs(t_{i−1}, t) and whether a previous step exists. In
    y = x/α, ρ = σ/α: A_i = α_{i+1}/α_i, k_i = α_{i+1} Δ_i, A_p = α_i/α_{i−1},
    k_p = α_i Δ_{i−1} with Δ_j = ρ_{j+1} − ρ_j (k_p = 0 on step 0)."""
    t_prev = previous_time(ts, t, i)
    a_i, k_i = rho_coeffs(schedule, t, s)
    a_p, k_p = rho_coeffs(schedule, t_prev, t)
    return a_i, k_i, a_p, k_p, i > 0


def _safe_div(num, den, ok):
    """num/den where `ok`, 0 elsewhere (the double-where: no NaN value or gradient
    from the branch not taken)."""
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


class BELM(AbstractReversibleSampler[tuple]):
    """The Bidirectional Explicit Linear Multistep sampler with the O-BELM
    coefficients (Wang et al. 2024): exactly invertible, second order, **one model
    evaluation per step**. With `aj.ReversibleAdjoint` it gives the exact gradient
    of the sampler in O(1) memory at the cost floor: the backward pass re-uses the
    evaluation that rebuilds each state for that step's VJP (N VJPs, no other
    evaluations).

    In y = x/α against ρ = σ/α (where the probability-flow ODE is dy/dρ = ε), with
    Δ_i = ρ_{i+1} − ρ_i and e_i = ε(x_i, t_i):

        y_{i+1} = a_i y_{i−1} + (1 − a_i) y_i + (Δ_i + a_i Δ_{i−1}) e_i,
        a_i = (Δ_i / Δ_{i−1})²,

    the two-step explicit formula that is exact for y quadratic in ρ (the O-BELM
    choice, which minimises the local truncation error: it is O(Δ³)). Step 0 has no
    y_{−1} and is a DDIM step (a_0 = 0). It is BDIA (`aj.BDIA`) in y with γ_i = a_i.

    **How it is computed.** Not as written above, but in the equivalent velocity
    form (the same iterates in exact arithmetic): with v_i = (y_i − y_{i−1})/Δ_{i−1}
    (≈ ε, the slope of the last step) and r_i = Δ_i/Δ_{i−1} (so a_i = r_i²),

        v_{i+1} = e_i + r_i (e_i − v_i),
        x_{i+1} = (α_{i+1}/α_i) x_i + α_{i+1} Δ_i v_{i+1}

    (the second line is a DDIM step with ε replaced by v_{i+1}), inverted by
    x_i = (x_{i+1} − α_{i+1} Δ_i v_{i+1}) / (α_{i+1}/α_i), e_i = ε(x_i, t_i) and
    v_i = e_i + (e_i − v_{i+1})/r_i, evaluating ε where the step did. The state holds
    (x_i, v_i) and the time grid (for t_{i−1}); v_0 is a zero placeholder (step 0 has
    r_0 = 0 and does not read it).

    **When to use it:** exact, memory-flat gradients at the lowest cost: one
    evaluation per step forward (N in all, no start-up evaluation) and one VJP per
    step backward. It is as accurate as `aj.DPMSolver2` (sharp mixture of
    `benchmarks/reversible_stability.py`, N = 10 / 20 / 40: 1e-1 / 1e-2 / 3e-3);
    `aj.AsyncLeapfrog` is more accurate at so few steps (1e-2 / 5e-3 / 2e-3).

    **Order:** 2 (x_0 and its exact gradient); measured slopes in
    `tests/test_reversible.py` (closed-form Gaussian and the mixture reference).

    **Stability and float32.** The characteristic roots are 1 and −a_i. On a grid
    whose steps in ρ shrink (every grid of `aj.time_grid`: ρ falls fastest at the
    noise end) a_i < 1, so the forward pass damps the parasitic mode and the inverse
    amplifies it, by 1/a_i per step and (Δ_0/Δ_{N−1})² over the solve: on
    `aj.time_grid(aj.VPLinear(), N, t_end=1e-3)` 1/a_i = e^{2h} = 6.8 / 2.6 / 1.6
    per step and 3.1e7 / 8.1e7 / 1.3e8 in all at N = 10 / 20 / 40, growing like
    1/t_end. That cannot change (it is the scheme), but where round-off enters it
    can. The two-slot form (x_{i−1}, x_i), whose inverse
    x_{i−1} = (x_{i+1} − c_x x_i − c_e e_i)/c_p recovers the parasitic component
    y_i − y_{i−1} = Δ_{i−1} v_i as a difference of two O(|y|) numbers, rounds it at
    ε_mach |y|; in the velocity form it is rounded at ε_mach Δ_{i−1} |v|, smaller by
    about |x|/(σ (1 − e^{−h}) |ε|) ≈ 2e2–5e2 at the data end, where the rest of the
    solve amplifies it most (σ = 0.01 at t = 1e-3). Measured on the random MLP of
    `tests/test_reversible_float32.py` (float32 state and weights), the two-slot form
    rebuilt x_T to 6e-4 at t_end = 1e-3 and to 3e-2–1e-1 at t_end = 1e-5, and its
    gradient error grew from 1e-4 to 1e-2 (with no warning); the velocity form
    rebuilds x_T to 2e-5 and 1e-4 and its gradient stays within 1e-4 (table). On
    the sharp mixture of `benchmarks/reversible_stability.py` (N = 10…80) x_T comes
    back to 4e-6–8e-6 in float32 (two-slot: 3e-5–1e-4) and 4e-15–6e-14 in float64.
    Sharper networks amplify round-off more, in every reversible sampler: with that
    MLP's weights scaled ×3–4 (t_end = 1e-3, N = 10 / 20 / 40, 12 runs) the two-slot
    form was up to 1.5e-2 off, the velocity form ≤ 7e-4 but for one run at 2.4e-3
    (asynchronous leapfrog ≤ 2e-4, BDIA ≤ 9e-4 there). A grid whose ρ-steps grow
    makes the forward pass unstable instead.

    **float32.** `aj.ReversibleAdjoint` with float32 state and weights against the
    float64 `aj.DTO` gradient, random MLP of `tests/test_reversible_float32.py`
    (relative errors of ∂L/∂x_T / ∂L/∂θ; the two-slot rows are the former form):

    | grid | N = 10 | N = 20 | N = 40 |
    | --- | --- | --- | --- |
    | t_end = 1e-3 | 5e-6 / 2e-6 | 3e-6 / 1e-6 | 2e-6 / 1e-6 |
    | t_end = 1e-5 | 3e-5 / 1e-5 | 2e-5 / 1e-5 | 5e-6 / 3e-6 |
    | t_end = 1e-5, AMD EPYC | 9e-5 / 1e-4 | 2e-5 / 4e-5 | 2e-6 / 3e-6 |
    | two-slot, t_end = 1e-3 | 1.5e-4 / 1.1e-4 | 2e-5 / 1e-5 | 9e-6 / 5e-6 |
    | two-slot, t_end = 1e-5 | 7e-3 / 4e-3 | 9e-3 / 1e-2 | 1e-2 / 1e-2 |

    (Round-off depends on the CPU's vector code: the rows above are from one x86
    machine, the EPYC row from another, same software.)

    float32 gradient error bound (N = 10 / 20 / 40): 2e-4 / 1e-4 / 5e-5 (either
    grid; checked by that test). Safe in float32: no warning.

    **Memory:** the state is two copies of x (x, v; plus the grid).

    ??? cite "References"

        ```bibtex
        @inproceedings{wang2024belm,
            title={{BELM}: Bidirectional Explicit Linear Multi-step Sampler for Exact
                   Inversion in Diffusion Models},
            author={Wang, Fangyikang and Yin, Hubery and Dong, Yuejiang and Zhu,
                    Huminhao and Zhang, Chao and Zhao, Hanbin and Qian, Hui and Li,
                    Chen},
            booktitle={Advances in Neural Information Processing Systems},
            year={2024}
        }
        ```
    """

    order: ClassVar[int] = 2
    is_sde: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 1
    steps_to_sigma_zero: ClassVar[bool] = False
    steps_from_alpha_zero: ClassVar[bool] = False
    rebuild: ClassVar[str] = "shared"

    def _coeffs(self, schedule, ts, t, s, i):
        """(A_i, k_i, r_i, i > 0) with A_i = α_{i+1}/α_i, k_i = α_{i+1} Δ_i and
        r_i = Δ_i/Δ_{i−1} (0 on step 0), all in the grid's dtype."""
        a_i, k_i, a_p, k_p, has_prev = two_step_coeffs(schedule, ts, t, s, i)
        # Δ_i/Δ_{i−1} = (k_i/α_{i+1}) / (k_p/α_i) = k_i / (A_i k_p).
        return a_i, k_i, _safe_div(k_i, a_i * k_p, has_prev), has_prev

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> tuple:
        del schedule
        return (x_T, tree_zeros_like(x_T), ts)

    # The O-BELM step in its velocity form. From y_{i+1} − y_i = a_i (y_{i−1} − y_i)
    # + (Δ_i + a_i Δ_{i−1}) e_i, with Δ_i v_{i+1} = y_{i+1} − y_i, a_i = r_i² and
    # a_i Δ_{i−1} = r_i Δ_i: Δ_i v_{i+1} = −r_i Δ_i v_i + (1 + r_i) Δ_i e_i, i.e.
    # v_{i+1} = e_i + r_i (e_i − v_i); and x_{i+1} = α_{i+1} (y_i + Δ_i v_{i+1}) =
    # A_i x_i + k_i v_{i+1}. The inverse solves the two lines in reverse order,
    # forming the small difference e_i − v_{i+1} before dividing by r_i.
    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del noise
        x, v, ts = state
        e = eps(x, t)
        a, k, r, _ = self._coeffs(schedule, ts, t, s, i)
        v_s = _add_scaled_diff(e, r, e, v)
        return (lincomb((a, x), (k, v_s)), v_s, ts)

    def step_back(self, eps: EpsFn, eps_prev: EpsFn, schedule, state, t, s, i, noise):
        del eps_prev, noise
        x_s, v_s, ts = state
        a, k, r, has_prev = self._coeffs(schedule, ts, t, s, i)
        x = lincomb((1.0 / a, x_s), (-k / a, v_s))
        e = eps(x, t)
        inv = _safe_div(1.0, r, has_prev)
        v = _add_scaled_diff(e, inv, e, v_s)
        # Step 0 read no v_0 (r_0 = 0): give back init's placeholder.
        return (x, zero_on_first(i, v), ts)

    def output(self, state) -> PyTree:
        return state[0]


def _add_scaled_diff(base: PyTree, c, u: PyTree, w: PyTree) -> PyTree:
    """base + c (u − w), leaf by leaf, with c cast to each leaf's dtype."""
    return jtu.tree_map(
        lambda b, u_, w_: b + jnp.asarray(c).astype(b.dtype) * (u_ - w_), base, u, w
    )


BELM.__init__.__doc__ = """**Arguments:** None."""
