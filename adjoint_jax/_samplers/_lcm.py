"""Multistep consistency sampling (LCM; flow matching's stochastic Euler)."""

from typing import ClassVar

from jaxtyping import Array, PyTree

from .._misc import lincomb
from .._schedule import AbstractSchedule
from ._base import AbstractSampler, EpsFn, predict
from ._coeffs import step_coeffs


class LCM(AbstractSampler[PyTree]):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; the sampler of
    latent consistency models, Luo et al. 2023): step t → s,

        x_s = α_s x̂_0(x_t, t) + σ_s ξ,

    with x̂_0 the model's data prediction (for a consistency model, its estimate of
    where the probability-flow ODE through (x_t, t) lands at t = 0) and ξ the step's
    standard normal noise: each step jumps to the data and re-noises afresh to the
    next noise level. A last step to σ = 0 returns x̂_0 itself (ξ unused there).

    - diffusers' `LCMScheduler` (LCM LoRAs, latent consistency models): with
        `aj.from_diffusers`, whose model adapter turns the network's output into LCM's
        `denoised` (the boundary condition c_skip x_t + c_out x̂_0), on the
        scheduler's timesteps and then t = 0: the last state is the pipeline's
        returned `denoised`.
    - diffusers' `FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)` on
        `aj.FlowMatching()`: x_s = (1 − s) x̂_0 + s ξ (Stable Audio 3's
        "ping-pong" sampling).

    **When to use it:** a few (1–8) steps of a distilled consistency model. It is
    not a discretisation of an ODE or SDE: its x_0 does not converge as N grows
    (order 0). With the exact consistency function of the data (the ODE's flow map
    to t = 0) every step leaves the marginal law exact, at any N; with a denoiser
    (posterior-mean) model the law is off by the last noise level's blur whatever N.
    **Cost:** one model evaluation per step; state x only. **Noise:** step i uses
    `noise[i]` (`aj.sample(..., noise=...)` with a leading axis of N, or `key=`);
    diffusers draws one normal per step except the last, so `noise[N − 1]` is unused
    on a grid that ends at σ = 0. **Gradients:** `aj.DTO()` (exact, including
    ∂L/∂noise; also with checkpoints). The continuous adjoints (`AdjointDEIS`,
    `RecordedAdjoint`, `InterpolatedAdjoint`, `AdjointDPM`) are refused: the steps
    have no continuous-time limit (each re-noises fully, whatever the step size), so
    there is no adjoint equation to solve.
    """

    order: ClassVar[int] = 0
    is_sde: ClassVar[bool] = True
    evals_per_step: ClassVar[int] = 1
    steps_to_sigma_zero: ClassVar[bool] = True
    steps_from_alpha_zero: ClassVar[bool] = True
    # Read by the gradient strategies that assume a smooth ODE/SDE (`check_sampler`).
    continuous_adjoint_error: ClassVar[str] = (
        "LCM's steps have no continuous-time limit (each re-noises fully, whatever "
        "the step size), so there is no adjoint equation to solve; use `aj.DTO()`"
    )

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> PyTree:
        del schedule, ts
        return x_T

    # The consistency step: x̂_0 from one evaluation, then the forward process
    # q(x_s | x_0) = N(α_s x_0, σ_s²) sampled at x_0 = x̂_0. α_s and σ_s come from the
    # step coefficients, exact (1 and 0) at σ_s = 0.
    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del i
        _, x0 = predict(eps, schedule, state, t)
        c = step_coeffs(schedule, t, s)
        return lincomb((c.alpha_s, x0), (c.sigma_s, noise))

    def output(self, state: PyTree) -> PyTree:
        return state


LCM.__init__.__doc__ = """**Arguments:** None."""
