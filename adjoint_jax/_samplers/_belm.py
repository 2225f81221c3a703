"""BELM with the O-BELM coefficients (Wang et al. 2024): an exactly invertible
two-step linear multistep method of the probability-flow ODE, one evaluation per
step."""

import abc
from typing import ClassVar

import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractReversibleSampler, EpsFn
from ._reversible_heun import rho_coeffs


def previous_time(ts: Array, t: Array, i: Array) -> Array:
    """t_{i−1} (t itself on step 0) from the grid a two-step sampler keeps in its
    state."""
    return jnp.where(i > 0, ts[jnp.maximum(i - 1, 0)], t)


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


class AbstractTwoStepSampler(AbstractReversibleSampler[tuple]):
    """An exactly invertible two-step method with one evaluation per step,
    x_{i+1} = c_p x_{i−1} + c_x x_i + c_e ε(x_i, t_i) (c_p = 0 on step 0), whose
    inverse x_{i−1} = (x_{i+1} − c_x x_i − c_e ε(x_i, t_i))/c_p evaluates ε where the
    step did. The state holds (x_{i−1}, x_i) and the time grid (for t_{i−1}).
    Subclasses give the coefficients (`_coeffs`)."""

    is_sde: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 1
    steps_to_sigma_zero: ClassVar[bool] = False
    steps_from_alpha_zero: ClassVar[bool] = False
    rebuild: ClassVar[str] = "shared"

    @abc.abstractmethod
    def _coeffs(self, schedule, ts, t, s, i):
        """(c_p, c_x, c_e) of the step t_i = t → t_{i+1} = s."""

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> tuple:
        del schedule
        return (x_T, x_T, ts)

    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del noise
        x_prev, x, ts = state
        e = eps(x, t)
        c_p, c_x, c_e = self._coeffs(schedule, ts, t, s, i)
        return (x, lincomb((c_p, x_prev), (c_x, x), (c_e, e)), ts)

    def step_back(self, eps: EpsFn, eps_prev: EpsFn, schedule, state, t, s, i, noise):
        del eps_prev, noise
        x, x_s, ts = state
        e = eps(x, t)
        c_p, c_x, c_e = self._coeffs(schedule, ts, t, s, i)
        inv = _safe_div(1.0, c_p, i > 0)
        rebuilt = lincomb((inv, x_s), (-inv * c_x, x), (-inv * c_e, e))
        # Step 0 started from init's (x_T, x_T): its x_{−1} slot is x_T itself.
        return (where_tree(i > 0, rebuilt, x), x, ts)

    def output(self, state) -> PyTree:
        return state[1]


class BELM(AbstractTwoStepSampler):
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
    y_{−1} and is a DDIM step (a_0 = 0). The inverse is explicit:

        y_{i−1} = (y_{i+1} − (1 − a_i) y_i − (Δ_i + a_i Δ_{i−1}) e_i) / a_i,

    with e_i evaluated at the same (x_i, t_i) as the forward step. It is BDIA
    (`aj.BDIA`) in y with γ_i = a_i. The state holds (x_{i−1}, x_i) and the time
    grid (for t_{i−1}); every formula is written in x with exponential-integrator
    coefficients.

    **When to use it:** exact, memory-flat gradients at the lowest cost: one
    evaluation per step forward (N in all, no start-up evaluation) and one VJP per
    step backward. It is as accurate as `aj.DPMSolver2` (sharp mixture of
    `benchmarks/reversible_stability.py`, N = 10 / 20 / 40: 1e-1 / 1e-2 / 3e-3);
    `aj.AsyncLeapfrog` is more accurate at so few steps (1e-2 / 5e-3 / 2e-3) and
    better conditioned in float32 (see Stability).

    **Order:** 2 (x_0 and its exact gradient); measured slopes in
    `tests/test_reversible.py` (closed-form Gaussian and the mixture reference).

    **Stability:** the characteristic roots are 1 and −a_i. On a grid whose steps
    in ρ shrink (every grid of `aj.time_grid`: ρ falls fastest at the noise end)
    a_i < 1, so the forward pass damps the parasitic mode; the inverse amplifies it
    by 1/a_i per step, i.e. round-off by up to (Δ_0/Δ_{N−1})² over the solve:
    x_T is rebuilt to 6e-14–4e-13 in float64 and 3e-5–2e-4 in float32 on the sharp
    mixture at N = 10…640 (`benchmarks/reversible_stability.py`; asynchronous
    leapfrog: 1e-6). A grid whose ρ-steps grow makes the forward pass unstable
    instead.

    **Memory:** the state is two copies of x (plus the grid).

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

    def _coeffs(self, schedule, ts, t, s, i):
        """(c_prev, c_x, c_e) of x_{i+1} = c_prev x_{i−1} + c_x x_i + c_e e_i."""
        a_i, k_i, a_p, k_p, has_prev = two_step_coeffs(schedule, ts, t, s, i)
        # Δ_i/Δ_{i−1} = (k_i/α_{i+1}) / (k_p/α_i) = k_i / (A_i k_p).
        r = _safe_div(k_i, a_i * k_p, has_prev)
        a = r * r
        # y_{i−1} = x_{i−1}/α_{i−1} enters x_{i+1} = α_{i+1} y_{i+1} with α_{i+1}/α_{i−1}
        # = A_i A_p; Δ_{i−1} with α_{i+1} Δ_{i−1} = A_i k_p.
        return a * a_i * a_p, (1.0 - a) * a_i, k_i + a * a_i * k_p


def where_tree(pred, a: PyTree, b: PyTree) -> PyTree:
    return jtu.tree_map(lambda u, v: jnp.where(pred, u, v), a, b)


BELM.__init__.__doc__ = """**Arguments:** None."""
