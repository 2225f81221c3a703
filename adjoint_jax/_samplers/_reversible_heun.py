"""The reversible Heun method (Kidger et al. 2021) on the probability-flow ODE in the
exponentially reparameterised variables (y = x/α, ρ = σ/α)."""

from typing import ClassVar

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import lincomb, tree_zeros_like
from .._schedule import AbstractSchedule
from ._base import AbstractReversibleSampler, EpsFn
from ._coeffs import step_coeffs


def rho_coeffs(schedule: AbstractSchedule, t: Array, s: Array) -> tuple[Array, Array]:
    """For a step t → s (either direction): A = α_s/α_t and K = α_s (ρ_s − ρ_t).

    In y = x/α the probability-flow ODE is dy/dρ = ε(αy, t(ρ)), and an update
    y_s = y_t + Δρ·g reads x_s = A x_t + K g in x. K = −σ_s (e^h − 1) with
    h = λ_s − λ_t, so A x_t + K ε is exactly DPM-Solver-1 (Euler in ρ)."""
    c = step_coeffs(schedule, t, s)
    return c.alpha_ratio, -c.sigma_phi1


def first_step_eps(
    eps: EpsFn, x: PyTree, t: Array, carried: PyTree, i: Array
) -> PyTree:
    """ε(x, t) on step 0 (the state from `init` holds a zero placeholder), else the
    carried value. A `lax.cond`, so only step 0 pays the extra model evaluation;
    `aj.sample` runs step 0 outside its scan and tells the other steps
    (`eps.may_be_first = False`), which then need no `cond`."""
    if not getattr(eps, "may_be_first", True):
        return carried
    return jax.lax.cond(i == 0, lambda: eps(x, t), lambda: carried)


def zero_on_first(i: Array, tree: PyTree) -> PyTree:
    """`tree` with zeros on step 0: `step_back` of step 0 gives back the placeholder of
    `init` exactly, so `step_back(step(state)) == state` slot by slot."""
    return jtu.tree_map(lambda a: jnp.where(i == 0, jnp.zeros_like(a), a), tree)


class ReversibleHeun(AbstractReversibleSampler[tuple]):
    """The reversible Heun method (Kidger et al. 2021): an algebraically reversible,
    second-order, one-evaluation-per-step sampler of the probability-flow ODE. With
    `aj.ReversibleAdjoint` it gives the *exact* gradient of the sampler in O(1)
    memory in the number of steps.

    It steps dy/dρ = ε_θ(αy, z, t(ρ)) in y = x/α against ρ = σ/α (the ε-form in t is
    stiff like 1/σ near t = 0; this one is not, and its Euler step is DDIM). With
    the auxiliary state ŷ and the carried ε̂_n = ε_θ(ŷ_n, t_n), for Δρ = ρ_s − ρ_t:

        ŷ_s = 2 y_t − ŷ_t + Δρ ε̂_t,
        ε̂_s = ε_θ(ŷ_s, s),
        y_s = y_t + ½ Δρ (ε̂_t + ε̂_s),

    and the inverse is the same map with t and s swapped (the method is symmetric):
    ŷ_t = 2 y_s − ŷ_s − Δρ ε̂_s, ε̂_t = ε_θ(ŷ_t, t), y_t = y_s − ½ Δρ (ε̂_t + ε̂_s).
    The state holds x = αy, x̂ = αŷ and ε̂, so everything is written in x with the
    exponential-integrator coefficients α_s/α_t and −σ_s (e^h − 1) = α_s Δρ.

    **When to use it:** exact gradients when `aj.DTO` runs out of memory: N steps
    cost the memory of one. It is the cheapest reversible sampler here (one model
    evaluation per step), but on sharp data it needs more steps than
    `aj.AsyncLeapfrog` before it is accurate (see Stability).

    **Order:** 2 (x_0 and its exact gradient). Measured slopes: 2.00 against the
    closed-form Gaussian (N = 40…320) and 2.0 against the converged mixture reference
    (N = 80…640).

    **Cost:** one model evaluation per step, plus one on the first step (N + 1 in
    all). `step_back` costs one evaluation; with `aj.ReversibleAdjoint` the backward
    pass costs per step that evaluation plus the VJP of one step (one evaluation and
    its VJP): about 2× the evaluations of `aj.DTO`'s backward pass.

    **Memory:** the state is three copies of x (x, x̂, ε̂).

    **Stability:** on the test equation y' = μy its region of stability is the
    interval [−i, i] of the imaginary axis (spectral radius 1.01 at μh = −0.01, 1.6
    at −0.5): the 2A − B update of x̂ has a parasitic root of modulus above 1 for
    every decaying mode, and the probability-flow ODE has decaying modes everywhere.
    In y, ρ their total growth over a solve is bounded independently of N, so the
    scheme converges and recovers x_T to round-off (sharp Gaussian mixture of
    `benchmarks/reversible_stability.py`, N = 10…640: ≤ 1e-14 in float64, ≤ 8e-6 in
    float32). It shows in the forward accuracy instead: on that mixture the error
    is 0.6 at N = 10 and 2e-2 at N = 40 (asynchronous leapfrog: 1e-2, 2e-3), and
    second order only from N ≈ 80 (3e-4). The parasitic mode also amplifies
    round-off: on the random-MLP problem of `adjoint-jax compare --problem mlp
    --dtype float32`, `ReversibleAdjoint` and the checkpointed `DTO` variants differ
    from plain `DTO` by 2e-3 in float32 (1e-13 in float64), and its discrete gradient
    stays 77–95% away from every continuous adjoint's even at N = 256, where
    `DPMSolver2`'s converges. Prefer `aj.McCallumFoster(aj.DPMSolver2())` on stiff or
    float32 problems.

    **float32.** `aj.ReversibleAdjoint` with float32 state and weights against the
    float64 `aj.DTO` gradient (random MLP of `tests/test_reversible_float32.py`,
    t_end = 1e-3; relative errors of ∂L/∂x_T / ∂L/∂θ): 1e-3 / 3e-4 at N = 10,
    2e-4 / 5e-5 at N = 20, 2e-5 / 1e-5 at N = 40; over other inputs 3e-4–2e-3 at
    N = 10, 2e-4 at N = 20, up to 4e-4 at N = 40 and 1.2e-3 at N = 80, where the
    float32 `aj.DTO` gradient is as far off (the parasitic mode amplifies the forward
    pass's round-off too). float32 gradient error bound (N = 10 / 20 / 40): 2e-3 /
    2e-3 / 2e-3 (checked by that test). **Unsafe in float32 at any N**:
    `aj.ReversibleAdjoint` warns at trace time for a state of 32 bits or fewer.

    **Conditioning:** ε̂_s is evaluated at the end of step i, with step i's
    conditioning, and reused by step i + 1. `step_back` of step i therefore
    re-evaluates ε̂_t with step i − 1's conditioning (step 0's for i = 0): its
    `eps_prev`.

    ??? cite "References"

        ```bibtex
        @inproceedings{kidger2021efficient,
            title={Efficient and Accurate Gradients for Neural {SDE}s},
            author={Kidger, Patrick and Foster, James and Li, Xuechen and Lyons, Terry},
            booktitle={Advances in Neural Information Processing Systems},
            volume={34},
            pages={18747--18761},
            year={2021}
        }
        ```
    """

    order: ClassVar[int] = 2
    is_sde: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 1
    # It works in y = x/α (undefined at α = 0) and evaluates the model at the end of
    # each step (σ = 0 at a grid's end).
    steps_to_sigma_zero: ClassVar[bool] = False
    steps_from_alpha_zero: ClassVar[bool] = False
    startup_eval: ClassVar[bool] = True
    rebuild: ClassVar[str] = "previous"

    def precision_warning(self, num_steps, dtype):
        del num_steps
        if jnp.finfo(dtype).bits > 32:
            return None
        return (
            "reversible Heun's parasitic mode amplifies float32 round-off, in the "
            "rebuilt states and (from N ≈ 40) in the forward pass itself: measured "
            "2e-4–2e-3 (relative) on a random MLP at N = 5–80, where its float32 DTO "
            "gradient reaches 1e-3 too. Prefer `aj.AsyncLeapfrog()` or `aj.BELM()` "
            "(within 5e-5 there)."
        )

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> tuple:
        del schedule, ts
        # ε̂_0 = ε(x_T, ts[0]) needs the model; step 0 computes it (`first_step_eps`).
        return (x_T, x_T, tree_zeros_like(x_T))

    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del noise
        x, xh, eh = state
        eh = first_step_eps(eps, xh, t, eh, i)
        a, k = rho_coeffs(schedule, t, s)
        xh_s = lincomb((2.0 * a, x), (-a, xh), (k, eh))
        eh_s = eps(xh_s, s)
        x_s = lincomb((a, x), (0.5 * k, eh), (0.5 * k, eh_s))
        return (x_s, xh_s, eh_s)

    def step_back(self, eps: EpsFn, eps_prev: EpsFn, schedule, state, t, s, i, noise):
        del eps, noise
        x_s, xh_s, eh_s = state
        b, kb = rho_coeffs(schedule, s, t)  # α_t/α_s and α_t (ρ_t − ρ_s)
        xh = lincomb((2.0 * b, x_s), (-b, xh_s), (kb, eh_s))
        # ε̂_t was evaluated by step i − 1 (by step 0 itself when i = 0), with that
        # step's conditioning.
        eh = eps_prev(xh, t)
        x = lincomb((b, x_s), (0.5 * kb, eh), (0.5 * kb, eh_s))
        return (x, xh, zero_on_first(i, eh))

    def output(self, state) -> PyTree:
        return state[0]


ReversibleHeun.__init__.__doc__ = """**Arguments:** None."""
