"""EDICT (Wallace et al. 2023): exact diffusion inversion by two coupled DDIM chains
mixed after every step."""

import math
from typing import ClassVar

import equinox as eqx
from jaxtyping import Array, PyTree

from .._misc import check_unit_interval, lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractReversibleSampler, EpsFn, round_off_growth
from ._reversible_heun import rho_coeffs


class EDICT(AbstractReversibleSampler[tuple]):
    """EDICT (Wallace, Gokul and Naik, CVPR 2023), the sampler behind DOODL's exact
    x_T gradients: two coupled DDIM chains (x, y), each stepped with ε evaluated on
    the other, then mixed with weight p = `mix`. With A = α_s/α_t and
    B = −σ_s (e^h − 1) (DDIM's coefficients for the step t → s):

        x' = A x + B ε(y, t),      y' = A y + B ε(x', t),
        x'' = p x' + (1 − p) y',   y'' = p y' + (1 − p) x''.

    Every line is inverted explicitly, in reverse order:
    y' = (y'' − (1 − p) x'')/p, x' = (x'' − (1 − p) y')/p, y = (y' − B ε(x', t))/A,
    x = (x' − B ε(y, t))/A; the inverse evaluates ε at the same two points as the
    step, so `aj.ReversibleAdjoint` re-uses them (2N VJPs, no other evaluations).
    The sample is x. (The reference implementation also swaps the roles of the two
    chains on alternate steps; this is the paper's algorithm, without the swap.)

    **When to use it:** to reproduce EDICT/DOODL. It costs two evaluations per step
    and is first order (sharp mixture of `benchmarks/reversible_stability.py`,
    N = 10 / 20 / 40 / 160: 8 / 1 / 0.3 / 4e-3), so `aj.BELM` or `aj.AsyncLeapfrog`
    give the same exact, memory-flat gradient at half the evaluations and a higher
    order.

    **Order:** 1 (the second chain's ε is evaluated at the new state but the old
    time; the mixing averages two first-order chains).

    **Stability:** the un-mixing divides by p twice per step, so round-off in the
    reconstruction grows like p^(−2N) (p = 0.93: ×1.16 per step, ×1.4e3 at N = 50):
    x_T is rebuilt to 1e-15 up to N = 80 and 1e-11 at 160 in float64, to 1e-5 up
    to N = 80 in float32, and is lost beyond N ≈ 300 (float64) or 150 (float32).
    p < 0.9 or large N makes the reconstruction, hence `aj.ReversibleAdjoint`,
    inaccurate; `aj.DTO` is unaffected.

    **float32.** `aj.ReversibleAdjoint` with float32 state and weights against the
    float64 `aj.DTO` gradient (random MLP of `tests/test_reversible_float32.py`,
    t_end = 1e-3; relative errors of ∂L/∂x_T / ∂L/∂θ): 7e-4 / 1e-4 at N = 10,
    5e-4 / 1e-4 at N = 20, 8e-5 / 2e-5 at N = 40 (other inputs: up to 1.4e-3,
    5.5e-4, 8e-5; 1.1e-3 at N = 5, 2e-4 at N = 120, 5e-3–2e-2 at N = 160). On coarse
    grids the inverse couples the two chains' round-off through ∂ε/∂x (3–5× per step
    near the noise end); on long ones the un-mixing adds about 1/p per step (the
    measured growth; 1/p² bounds it). float32
    gradient error bound (N = 10 / 20 / 40): 2e-3 / 1e-3 / 2e-4 (checked by that
    test). **Unsafe in float32 at N ≤ 10 and beyond N ≈ 130** (p = 0.93):
    `aj.ReversibleAdjoint` warns at trace time where its fit to these measurements,
    (1.2e5/N + p^−N) ε_mach, passes 1e-3.

    **Cost:** two evaluations per step. **Memory:** two copies of x.

    ??? cite "References"

        ```bibtex
        @inproceedings{wallace2023edict,
            title={{EDICT}: Exact Diffusion Inversion via Coupled Transformations},
            author={Wallace, Bram and Gokul, Akash and Naik, Nikhil},
            booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and
                       Pattern Recognition},
            year={2023}
        }
        ```
    """

    mix: float = eqx.field(default=0.93, static=True)

    order: ClassVar[int] = 1
    is_sde: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 2
    steps_to_sigma_zero: ClassVar[bool] = False
    steps_from_alpha_zero: ClassVar[bool] = False
    rebuild: ClassVar[str] = "shared"

    def __check_init__(self):
        check_unit_interval("EDICT(mix=...)", self.mix, "the paper uses 0.93")

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> tuple:
        del schedule, ts
        return (x_T, x_T)

    def precision_warning(self, num_steps, dtype):
        # A fit to the float32 measurements of the docstring: ~1.2e5/N ε_mach from
        # coarse steps plus p^−N ε_mach from the un-mixing.
        coarse = round_off_growth(dtype, math.log(1.2e5 / num_steps))
        mixing = round_off_growth(dtype, -num_steps * math.log(self.mix))
        if coarse + mixing <= 1e-3:
            return None
        return (
            f"EDICT's inverse amplifies round-off, to about {coarse + mixing:.0e} "
            "(relative) here: on coarse grids through the coupling of its two chains "
            "(float32, random MLP: 7e-4–1.4e-3 at N = 10), on long ones by about 1/p "
            f"per step of un-mixing (p = {self.mix}: 2e-4 at N = 120, 5e-3–2e-2 at "
            "N = 160)."
        )

    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del i, noise
        x, y = state
        a, b = rho_coeffs(schedule, t, s)
        p = self.mix
        x1 = lincomb((a, x), (b, eps(y, t)))
        y1 = lincomb((a, y), (b, eps(x1, t)))
        x2 = lincomb((p, x1), (1.0 - p, y1))
        y2 = lincomb((p, y1), (1.0 - p, x2))
        return (x2, y2)

    def step_back(self, eps: EpsFn, eps_prev: EpsFn, schedule, state, t, s, i, noise):
        del eps_prev, i, noise
        x2, y2 = state
        a, b = rho_coeffs(schedule, t, s)
        p = self.mix
        y1 = lincomb((1.0 / p, y2), (-(1.0 - p) / p, x2))
        x1 = lincomb((1.0 / p, x2), (-(1.0 - p) / p, y1))
        y = lincomb((1.0 / a, y1), (-b / a, eps(x1, t)))
        x = lincomb((1.0 / a, x1), (-b / a, eps(y, t)))
        return (x, y)

    def output(self, state) -> PyTree:
        return state[0]


EDICT.__init__.__doc__ = """**Arguments:**

- `mix`: the mixing weight p in (0, 1] (default 0.93, the paper's).
"""
