"""CogVideoX's DPM-Solver: the second-order multistep SDE-DPM-Solver++ ("DPM++ 2M SDE",
midpoint) as diffusers' `CogVideoXDPMScheduler` runs it, with its step targets and
its first-order last step."""

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractSDESampler, EpsFn
from ._coeffs import step_coeffs
from ._dpm_solver_pp import data_prediction
from ._sde_dpm_solver_pp import SDEDPMSolverPP, _sde_coeffs


# The first-order SDE step (the DDPM posterior): the continuous adjoints' inverse step
# and noise factor are its.
_FIRST_ORDER = SDEDPMSolverPP(order=1)


class CogVideoXDPM(AbstractSDESampler[tuple]):
    """The sampler of diffusers' `CogVideoXDPMScheduler` (CogVideoX-5b's model-card
    scheduler): SDE-DPM-Solver++ (Lu et al. 2022c) of order 2 in its multistep,
    "midpoint" form, in the data prediction x̂_0. Step t → s, h = λ_s − λ_t,
    m₀ = x̂_0(x_t, t), m₁ the previous step's x̂_0 (at λ_t − h₀, r = h₀/h):

        x_s = (σ_s/σ_t) e^{−h} x_t + α_s (1 − e^{−2h}) [(1 + 1/(2r)) m₀ − m₁/(2r)]
              + σ_s √(1 − e^{−2h}) ξ.

    The first step (no m₁) is first order (m₁ weight 0: the DDPM posterior,
    `aj.DDIM(eta=1.0)`), and so is the last with `first_order_last=True` (diffusers:
    the step to `final_alpha_cumprod`, whose timestep n − T // N is negative) and any
    step to σ = 0 (then x_s = x̂_0). After a first step from α = 0 (zero terminal SNR)
    h₀ = ∞, so r = ∞ and the second step is first order too, as in diffusers.
    Without targets it equals `aj.SDEDPMSolverPP(order=2, orders=(1, 2, …, 2, 1))`.

    **Targets.** diffusers steps from timestep n to n − T // N, then evaluates the
    network at the next timestep of its list, whichever it is (up to one timestep
    off for 'trailing' timesteps when N does not divide T, more for 'linspace'): with
    `targets=(s_0, …, s_{N−1})` step i goes from `ts[i]` to `targets[i]` and its
    result is taken as the state at `ts[i + 1]`; r is still measured between the
    grid times at which m₀ and m₁ were evaluated, as diffusers does.

    **Noise.** `noise[i]` (a standard normal like x) is the normal step i uses.
    diffusers' `step` draws one normal on a first-order step and two on a
    second-order step, of which it uses the second: `used_draws(N)` gives, for each
    step, the index of the draw it uses among all of diffusers' draws (0, 2, 4, …,
    and 2N − 3 for a first-order last step; 98 draws for 50 steps). Its `eta`
    argument is ignored, as diffusers ignores it.

    **When to use it:** to reproduce CogVideoX pipelines run with
    `CogVideoXDPMScheduler`; for new work prefer `aj.SDEDPMSolverPP`. **Order:** 2
    (weak; measured on Gaussian data in tests/test_diffusers_cogvideox.py), strong
    order 1/2 in the noise. **Cost:** one model evaluation per step. **Memory:** x,
    the previous x̂_0 and its λ. **Gradients:** `aj.DTO()` (exact, also ∂L/∂noise)
    and `aj.Truncated` always; without `targets`, also the continuous adjoints of
    the reverse diffusion SDE (`aj.AdjointDEIS`, `aj.RecordedAdjoint`, factor 2, as
    for `aj.DDIM(eta=1.0)`).
    """

    targets: tuple[float, ...] | None = eqx.field(default=None, static=True)
    first_order_last: bool = eqx.field(default=True, static=True)

    order: ClassVar[int] = 2
    is_sde: ClassVar[bool] = True
    evals_per_step: ClassVar[int] = 1
    steps_to_sigma_zero: ClassVar[bool] = True
    steps_from_alpha_zero: ClassVar[bool] = True
    adjoint_factor: ClassVar[float] = 2.0

    def __check_init__(self):
        if self.targets is not None and (
            not isinstance(self.targets, tuple)
            or not all(isinstance(v, float) for v in self.targets)
        ):
            raise ValueError(
                "`CogVideoXDPM(targets=...)` must be None or a tuple of Python floats "
                f"(one time per step); got {self.targets!r}."
            )
        if not isinstance(self.first_order_last, bool):
            raise TypeError(
                "`CogVideoXDPM(first_order_last=...)` must be a bool; got "
                f"{self.first_order_last!r}."
            )

    @property
    def continuous_adjoint_error(self) -> str | None:
        """Why the continuous adjoints cannot differentiate it (None: they can)."""
        if self.targets is None:
            return None
        return (
            "its steps go to `targets`, not to the grid's next time, so it "
            "discretises no SDE on the grid; use `adjoint=aj.DTO()` (exact) or "
            "aj.Truncated"
        )

    def used_draws(self, num_steps: int) -> np.ndarray:
        """For each of `num_steps` steps, the index of the standard normal it uses
        among those diffusers' `step` draws in turn (`randn_tensor`): step 0 its
        only draw, a second-order step i the second of its two (2i), a first-order
        last step its only one (2N − 3)."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer):
            raise TypeError(f"`num_steps` must be an int; got {num_steps!r}.")
        if num_steps < 1:
            raise ValueError(f"`num_steps` must be at least 1; got {num_steps}.")
        used = 2 * np.arange(num_steps)
        if self.first_order_last and num_steps > 1:
            used[-1] -= 1
        return used

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array):
        del schedule
        n = ts.shape[0] - 1
        if self.targets is not None and len(self.targets) != n:
            raise ValueError(
                f"`CogVideoXDPM(targets=...)` has {len(self.targets)} times but the "
                f"grid has {n} steps; pass one target per step."
            )
        second = np.ones(n, bool)
        second[0] = False
        if self.first_order_last:
            second[-1] = False
        # The previous x̂_0 starts as zeros at λ = −∞ (weight 0 on the first step).
        zeros = lincomb((jnp.zeros((), ts.dtype), x_T))
        return (x_T, zeros, jnp.full((), -jnp.inf, ts.dtype), jnp.asarray(second))

    # The SDE in the data prediction, d(x/σ) = 2 e^{λ} x̂_0 dλ + noise, integrates over
    # [λ_t, λ_s] to x_s = (σ_s/σ_t) e^{−h} x_t + 2 α_s ∫_0^h e^{−2(h − τ)} x̂_0 dτ
    # + σ_s √(1 − e^{−2h}) ξ. With x̂_0 = m₀ + τ D/h, D = (m₀ − m₁)/r the backward
    # difference, and the "midpoint" weight ½ (1 − e^{−2h}) for D (that of x̂_0 at
    # τ = h/2), the x̂_0 term is α_s (1 − e^{−2h}) (m₀ + D/2): diffusers' `denoised_d`
    # = (1 + 1/(2r)) m₀ − m₁/(2r), with 1/(2r) = h/(2 h₀).
    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        x, m1, lam1, second = state
        if self.targets is not None:
            # Step i goes to its own target; the result is the state at ts[i + 1].
            s = jnp.asarray(self.targets, jnp.result_type(t))[i]
        c = step_coeffs(schedule, t, s)
        m0 = data_prediction(eps, schedule, x, t, None)
        a, b, scale = _sde_coeffs(c)
        finite = jnp.isfinite(lam1)
        use = second[i] & finite & ~c.sigma_zero_end & ~c.alpha_zero_start
        # h₀ = λ_t − λ_prev, replaced before the arithmetic where it is not used
        # (λ_prev = −∞ after a step from α = 0: r = ∞, weight 0, as in diffusers).
        h0 = jnp.where(use, c.lam_t - jnp.where(finite, lam1, 0.0), 1.0)
        w = jnp.where(use, 0.5 * c.h / h0, 0.0)  # 1/(2r)
        x_s = lincomb((a, x), (b * (1.0 + w), m0), (-b * w, m1), (scale, noise))
        return (x_s, m0, c.lam_t, second)

    def noise_scale(self, schedule, t, s):
        return _FIRST_ORDER.noise_scale(schedule, t, s)

    def invert_step(self, schedule, x, e, t, s, noise):
        return _FIRST_ORDER.invert_step(schedule, x, e, t, s, noise)

    def output(self, state) -> PyTree:
        return state[0]


CogVideoXDPM.__init__.__doc__ = """**Arguments:**

- `targets`: None (default), or one time per step (Python floats): step i goes
    from `ts[i]` to `targets[i]` and its result is taken as the state at `ts[i + 1]`
    (diffusers' step from timestep n to n − T // N).
- `first_order_last`: the last step is first order (default True: diffusers' step
    to `final_alpha_cumprod`); False where diffusers' last step lands on a
    timestep ≥ 0 and is second order.
"""
