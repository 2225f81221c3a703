"""BDIA (Zhang et al. 2024): bidirectional integration approximation, an exactly
invertible two-step DDIM with one evaluation per step."""

import abc
import math
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import check_unit_interval, lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractReversibleSampler, EpsFn, round_off_growth
from ._belm import _safe_div, previous_time
from ._reversible_heun import rho_coeffs


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


def where_tree(pred, a: PyTree, b: PyTree) -> PyTree:
    return jtu.tree_map(lambda u, v: jnp.where(pred, u, v), a, b)


class BDIA(AbstractTwoStepSampler):
    """BDIA-DDIM (Zhang, Lewis and Kleijn, ECCV 2024): exactly invertible, second
    order, **one model evaluation per step**. With `aj.ReversibleAdjoint` (fused
    backward: N VJPs, no other evaluations) it gives exact gradients in O(1) memory.

    Each step integrates forward over [t_i, t_{i+1}] *and* backward over
    [t_i, t_{i−1}] with the same ε(x_i, t_i), and corrects the previous state by the
    backward integral:

        x_{i+1} = γ (x_{i−1} − D_{t_i→t_{i−1}}(x_i)) + D_{t_i→t_{i+1}}(x_i),

    where D_{t→s}(x) = (α_s/α_t) x − σ_s (e^h − 1) ε(x, t) is the DDIM step. Step 0
    is a DDIM step. The inverse is explicit (for γ > 0):

        x_{i−1} = (x_{i+1} − D_{t_i→t_{i+1}}(x_i)) / γ + D_{t_i→t_{i−1}}(x_i).

    Written in y = x/α this is the two-step method y_{i+1} = γ' y_{i−1} +
    (1 − γ') y_i + (Δ_i + γ' Δ_{i−1}) ε with γ' = γ α_{i−1}/α_{i+1}; with
    γ' = (Δ_i/Δ_{i−1})² instead it would be `aj.BELM`.

    **When to use it:** when you want the published BDIA sampler (γ = 1, the
    exactly invertible setting of the paper's inversion experiments): x_T is rebuilt
    to 1e-15 (float64) and 5e-7 (float32) at any N, but on sharp data it is
    pre-asymptotic below N ≈ 80 (mixture of `benchmarks/reversible_stability.py`,
    N = 10 / 20 / 40: 1.0 / 0.3 / 5e-2; `aj.AsyncLeapfrog`: 1e-2 / 5e-3 / 2e-3).
    `gamma < 1` (the paper's γ = 0.5 for generation) damps the parasitic mode in
    the forward pass but divides by γ in every inverse step: round-off grows like
    γ^(−N) in the reconstruction, so `aj.ReversibleAdjoint` with γ < 1 is exact only
    for short solves (float64, γ = 0.5: ~1e-16·2^N). Use `aj.DTO` there.

    **Order:** 2 for γ = 1 (γ' = 1 + O(h), so the local error
    (Δ_i² − γ'Δ_{i−1}²) y''/2 is O(h³)); 1 for γ < 1 (`order` says which). Measured
    slopes in `tests/test_reversible.py`.

    **Stability:** characteristic roots 1 and −γ'; at γ = 1, γ' = α_{i−1}/α_{i+1}
    is just below 1, so the parasitic mode is weakly damped forward and weakly
    amplified backward (by at most α_N/α_0 per pair of steps over the solve).

    **float32.** `aj.ReversibleAdjoint` with float32 state and weights against the
    float64 `aj.DTO` gradient (random MLP of `tests/test_reversible_float32.py`,
    t_end = 1e-3, γ = 1; relative errors of ∂L/∂x_T / ∂L/∂θ): 4e-6 / 6e-7 at
    N = 10, 2e-6 / 1e-6 at N = 20, 7e-7 / 6e-7 at N = 40 (5e-6 at most with
    t_end = 1e-5). float32 gradient error bound (N = 10 / 20 / 40): 2e-5 / 2e-5 /
    2e-5 (γ = 1; checked by that test). With γ < 1 the reconstruction loses a factor
    1/γ per step: measured at γ = 0.5, 4e-5 at N = 10, 4e-4 at N = 15, 2e-3–7e-3 at
    N = 20; `aj.ReversibleAdjoint` warns at trace time once γ^−(N−1) ε_mach passes
    1e-3 (γ = 0.5: from N = 15 in float32, N = 40 in float64).

    **Cost:** one evaluation per step (N in all). **Memory:** two copies of x (plus
    the grid).

    ??? cite "References"

        ```bibtex
        @inproceedings{zhang2024exact,
            title={Exact Diffusion Inversion via Bidirectional Integration
                   Approximation},
            author={Zhang, Guoqiang and Lewis, J. P. and Kleijn, W. Bastiaan},
            booktitle={European Conference on Computer Vision},
            year={2024}
        }
        ```
    """

    gamma: float = eqx.field(default=1.0, static=True)

    def __check_init__(self):
        check_unit_interval(
            "BDIA(gamma=...)", self.gamma,
            "γ = 0 is DDIM, which has no inverse; γ = 1 is the exactly invertible "
            "setting",
        )

    @property
    def order(self) -> int:
        return 2 if self.gamma == 1 else 1

    def precision_warning(self, num_steps, dtype):
        if self.gamma == 1:
            return None
        err = round_off_growth(dtype, -(num_steps - 1) * math.log(self.gamma))
        if err <= 1e-3:
            return None
        return (
            f"BDIA(gamma={self.gamma}) divides by γ in every inverse step, so "
            f"round-off grows like γ^−(N−1): to about {err:.0e} (relative) here "
            "(measured for γ = 0.5 in float32: 4e-4 at N = 15, 2e-3–7e-3 at N = 20)."
        )

    def _coeffs(self, schedule, ts, t, s, i):
        """(c_prev, c_x, c_e) of x_{i+1} = c_prev x_{i−1} + c_x x_i + c_e e_i."""
        a_f, k_f = rho_coeffs(schedule, t, s)
        a_b, k_b = rho_coeffs(schedule, t, previous_time(ts, t, i))
        g = jnp.where(i > 0, self.gamma, 0.0)
        return g, a_f - g * a_b, k_f - g * k_b


BDIA.__init__.__doc__ = """**Arguments:**

- `gamma`: γ in (0, 1], the weight of the backward correction (default 1: exactly
    invertible without amplification; γ < 1 divides by γ in every inverse step).
"""
