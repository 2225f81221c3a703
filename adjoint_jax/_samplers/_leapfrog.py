"""The asynchronous leapfrog method (Mutze 2013; MALI, Zhuang et al. 2021) on the
probability-flow ODE in the exponentially reparameterised variables (y = x/α,
ρ = σ/α)."""

from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._misc import lincomb, tree_zeros_like
from .._schedule import AbstractSchedule
from ._base import AbstractReversibleSampler, EpsFn
from ._reversible_heun import first_step_eps, rho_coeffs, zero_on_first


def _midpoint(schedule: AbstractSchedule, t: Array, s: Array):
    """The midpoint in ρ of the step t → s: its time t_m and log α_m. Always called
    with the forward-ordered (t, s), so `step` and `step_back` evaluate ε at
    bit-identical times."""
    h = schedule.lam(s) - schedule.lam(t)
    # ρ_m = (ρ_t + ρ_s)/2 = ρ_t (1 + e^{−h})/2, so λ_m = λ_t − log1p(expm1(−h)/2).
    lam_m = schedule.lam(t) - jnp.log1p(0.5 * jnp.expm1(-h))
    t_m = schedule.t_of_lam(lam_m)
    return t_m, schedule.log_alpha(t_m), h


class AsyncLeapfrog(AbstractReversibleSampler[tuple]):
    """The asynchronous leapfrog method (Mutze 2013, popularised as MALI by Zhuang et
    al. 2021): an algebraically reversible, second-order, one-evaluation-per-step
    sampler of the probability-flow ODE. With `aj.ReversibleAdjoint` it gives the
    *exact* gradient of the sampler in O(1) memory in the number of steps.

    It steps dy/dρ = ε_θ(αy, z, t(ρ)) in y = x/α against ρ = σ/α (not stiff, unlike
    the ε-form in t) and carries a velocity v ≈ dy/dρ = ε. For Δρ = ρ_s − ρ_t and
    the midpoint ρ_m = (ρ_t + ρ_s)/2:

        y_m = y_t + ½ Δρ v_t,    f = ε_θ(α_m y_m, t(ρ_m)),
        v_s = 2 f − v_t,          y_s = y_t + Δρ f;

    the inverse is y_m = y_s − ½ Δρ v_s, f = ε_θ(α_m y_m, t(ρ_m)), v_t = 2f − v_s,
    y_t = y_s − Δρ f. The state holds x = αy and v (v is in ε units, so needs no
    scaling); the x-update is DDIM with ε taken at the midpoint. v_0 = ε_θ(x_T, t_0)
    is computed on the first step.

    **When to use it:** as `aj.ReversibleHeun` (exact O(1)-memory gradients with
    `aj.ReversibleAdjoint`, one evaluation per step), and in preference to it on
    sharp data at small N: it evaluates ε at midpoints rather than at an auxiliary
    state (on the sharp mixture of `benchmarks/reversible_stability.py`: error 1e-2
    at N = 10 against reversible Heun's 0.6; the two are alike from N ≈ 80).

    **Order:** 2. Measured slope 2.0 against the converged mixture reference
    (N = 80…640). On *Gaussian* data it is 4th order (slope 4.0): its local error
    −h³(y''' + 3 F_y y'')/24 vanishes identically when y − m ∝ √(s² + ρ²), so do not
    read its accuracy on a Gaussian benchmark as typical.

    **Cost:** one model evaluation per step, plus one on the first step. With
    `aj.ReversibleAdjoint` the backward pass costs per step one evaluation for
    `step_back` plus the VJP of one step.

    **Memory:** the state is two copies of x (x, v).

    **Stability:** its region of stability on y' = μy is the interval [−i, i] of the
    imaginary axis (spectral radius 1.01 at μh = −0.01). For a decaying mode the
    parasitic root of v_s = 2f − v_t has modulus above 1, so v and ε(x) drift apart
    by a factor exp(C Σ|μΔρ|), bounded in N in these variables. Measured on the
    sharp mixture, N = 10…640: x_T recovered to ≤ 6e-15 in float64, ≤ 8e-6 in
    float32.

    **float32.** `aj.ReversibleAdjoint` with float32 state and weights against the
    float64 `aj.DTO` gradient (random MLP of `tests/test_reversible_float32.py`,
    t_end = 1e-3; relative errors of ∂L/∂x_T / ∂L/∂θ): 6e-6 / 3e-6 at N = 10,
    4e-6 / 2e-6 at N = 20, 3e-6 / 7e-7 at N = 40 (1e-5 at most with t_end = 1e-5).
    float32 gradient error bound (N = 10 / 20 / 40): 2e-5 / 2e-5 / 2e-5 (checked by
    that test). Safe in float32: no warning.

    ??? cite "References"

        ```bibtex
        @article{mutze2013asynchronous,
            title={An asynchronous leapfrog method {II}},
            author={Mutze, Ulrich},
            journal={arXiv preprint arXiv:1311.6602},
            year={2013}
        }
        @inproceedings{zhuang2021mali,
            title={{MALI}: A memory efficient and reverse accurate integrator for
                   Neural {ODE}s},
            author={Zhuang, Juntang and Dvornek, Nicha C. and Tatikonda, Sekhar and
                    Duncan, James S.},
            booktitle={International Conference on Learning Representations},
            year={2021}
        }
        ```
    """

    order: ClassVar[int] = 2
    is_sde: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 1
    # It works in y = x/α (undefined at α = 0) and would rebuild its velocity from the
    # model at the end of the last step (σ = 0 at a grid's end).
    steps_to_sigma_zero: ClassVar[bool] = False
    steps_from_alpha_zero: ClassVar[bool] = False
    startup_eval: ClassVar[bool] = True
    rebuild: ClassVar[str] = "shared"

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> tuple:
        del schedule, ts
        return (x_T, tree_zeros_like(x_T))  # v_0 is computed on step 0

    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del noise
        x, v = state
        v = first_step_eps(eps, x, t, v, i)
        a, k = rho_coeffs(schedule, t, s)
        t_m, la_m, h = _midpoint(schedule, t, s)
        # x_m = α_m (y_t + ½Δρ v) = (α_m/α_t) x_t + ½ α_m Δρ v, and
        # α_m Δρ = α_m ρ_t (e^{−h} − 1) = (α_m/α_t) σ_t expm1(−h).
        a_m = jnp.exp(la_m - schedule.log_alpha(t))
        k_m = 0.5 * a_m * schedule.sigma(t) * jnp.expm1(-h)
        f = eps(lincomb((a_m, x), (k_m, v)), t_m)
        v_s = lincomb((2.0, f), (-1.0, v))
        x_s = lincomb((a, x), (k, f))
        return (x_s, v_s)

    def step_back(self, eps: EpsFn, eps_prev: EpsFn, schedule, state, t, s, i, noise):
        del eps_prev, noise
        x_s, v_s = state
        b, kb = rho_coeffs(schedule, s, t)
        t_m, la_m, h = _midpoint(schedule, t, s)
        a_t = jnp.exp(la_m - schedule.log_alpha(t))
        k_m = 0.5 * a_t * schedule.sigma(t) * jnp.expm1(-h)  # ½ α_m Δρ, as in `step`
        a_m = jnp.exp(la_m - schedule.log_alpha(s))
        f = eps(lincomb((a_m, x_s), (-k_m, v_s)), t_m)
        v = lincomb((2.0, f), (-1.0, v_s))
        x = lincomb((b, x_s), (kb, f))
        return (x, zero_on_first(i, v))

    def output(self, state) -> PyTree:
        return state[0]


AsyncLeapfrog.__init__.__doc__ = """**Arguments:** None."""
