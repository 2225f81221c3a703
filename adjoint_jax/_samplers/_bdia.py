"""BDIA (Zhang et al. 2024): bidirectional integration approximation, an exactly
invertible two-step DDIM with one evaluation per step."""


import equinox as eqx
import jax.numpy as jnp

from .._misc import check_unit_interval
from ._belm import AbstractTwoStepSampler, previous_time
from ._reversible_heun import rho_coeffs


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
    (Δ_i² − γ'Δ_{i−1}²) y''/2 is O(h³)); 1 for γ < 1 (`order` says which). Measured slopes
    in `tests/test_reversible.py`.

    **Stability:** characteristic roots 1 and −γ'; at γ = 1, γ' = α_{i−1}/α_{i+1}
    is just below 1, so the parasitic mode is weakly damped forward and weakly
    amplified backward (by at most α_N/α_0 per pair of steps over the solve).

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
            "γ = 0 is DDIM, which has no inverse; γ = 1 is the exactly invertible setting",
        )

    @property
    def order(self) -> int:
        return 2 if self.gamma == 1 else 1

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
