"""The σ-grid half of the option table (`benchmarks/option_configs.py` has the
`Option` row and the DDPM-timestep schedulers): the k-diffusion schedulers (Euler,
Euler a, Heun, KDPM2, KDPM2 a, LMS), flow matching (FlowMatchEuler, FlowMatchHeun)
and EDM, each option value at two step counts, with the same sources (the float64
parity tests `tests/test_diffusers_{euler*,flow,edm}.py`)."""

import numpy as np
from option_configs import (  # noqa: I001 (the names of the rows)
    EDMDPM,
    EDMEULER,
    EULER,
    EULER_A,
    FHEUN,
    FLOW,
    HEUN,
    KDPM2,
    KDPM2A,
    LMS,
    SD,
    SMIN,
    TH,
    X0,
    ZSNR,
    Option,
    V,
    by_n,
    given,
    lens,
    mu,
    rows,
)

import adjoint_jax as aj


def _churn(config, **kw):
    """`EulerDiscreteScheduler.step(s_churn=, …)`: `aj.EulerChurn` (diffusers draws a
    normal on the churning steps only; `aj` gets it at that step)."""
    pred = config.get("prediction_type", "epsilon")
    extra = 1 if config.get("interpolation_type") == "log_linear" else 0  # N + 1 σ

    def sampler(setup, n):
        sigmas = n + extra if extra else None
        return aj.EulerChurn(**kw, prediction=pred, num_sigmas=sigmas)

    return Option("EulerDiscreteScheduler", config, (7, 20), step_kwargs=kw,
                  sampler=sampler, note="step churn")


def lms_order(k):
    return Option("LMSDiscreteScheduler", {}, (7, 20), step_kwargs={"order": k},
                  sampler=lambda setup, n: aj.LMS(order=k), note="step(order=)")


AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.555, 0.113, 0.0]
GEOM_SIGMAS = list(np.geomspace(12.0, 0.05, 20)) + [0.0]
AYS_SD15 = [999, 850, 645, 455, 233, 124, 24]
LIN_T = list(np.linspace(995.5, 3.25, 20))
HEUN_T = ([999, 901.5, 700, 512, 300, 120, 15], list(np.linspace(980, 4.5, 20)))
EDM_RAMP = ([0.0, 0.1, 0.3, 0.6, 0.8, 1.0],
            [-0.05, 0.1, 0.25, 0.5, 0.7, 0.85, 0.95, 1.02])
FLUX_S = by_n("sigmas", lambda n: np.linspace(1.0, 1 / n, n))


def _flow_both(config, n):
    return {"timesteps": np.linspace(990, 20, n), "sigmas": np.linspace(1.0, 0.05, n)}


def _hunyuan(n):
    return np.linspace(1.0, 0.0, n + 1)[:-1]


SIGMA_ROWS: tuple[Option, ...] = (
    # ---- Euler / Euler a -------------------------------------------------------------
    *rows(
        EULER,
        ({},), (SD | dict(timestep_spacing="leading", steps_offset=1),),
        (dict(timestep_spacing="trailing"),),
        (SD | dict(use_karras_sigmas=True, timestep_spacing="leading"),),
        (SD | dict(interpolation_type="log_linear", use_karras_sigmas=True,
                   timestep_spacing="trailing"),),
        (dict(use_exponential_sigmas=True) | SMIN | X0, (8, 21)),
        (dict(use_beta_sigmas=True, sigma_min=0.004, sigma_max=10.0),),
        (dict(interpolation_type="log_linear"),),
        (SD | ZSNR | V | dict(timestep_spacing="trailing"),),
        (dict(timestep_type="continuous") | V,),
        (dict(timestep_type="continuous", interpolation_type="log_linear") | V,
         (6, 19)),
        (SD, lens(AYS_SDXL, GEOM_SIGMAS, drop=1),
         given("sigmas", AYS_SDXL, GEOM_SIGMAS, drop=1),
         "Align Your Steps (SDXL); log-uniform to 0.05"),
        ({}, lens(AYS_SD15, LIN_T), given("timesteps", AYS_SD15, LIN_T)),
        (ZSNR,), (SD | dict(use_karras_sigmas=True, sigma_max=80.0),),
        (dict(interpolation_type="cubic"),), (dict(final_sigmas_type="one"),),
        ({}, (7, 20), None, {"eta": 0.5}),
        (dict(use_karras_sigmas=True), (2,), given("timesteps", [900, 500])),
        steps=(7, 20),
    ),
    _churn({}, s_churn=2.0),
    _churn(SD | V | dict(use_karras_sigmas=True), s_churn=3.0, s_tmin=0.5, s_tmax=5.0,
           s_noise=1.003),
    _churn(X0, s_churn=10.0, s_tmin=0.1),
    _churn(dict(interpolation_type="log_linear"), s_churn=1.5),
    *rows(
        EULER_A,
        ({},), (SD | dict(timestep_spacing="trailing"), (1, 4), "SDXL-Turbo"),
        (SD | V | dict(timestep_spacing="leading", steps_offset=1),),
        (SD | ZSNR | V | dict(timestep_spacing="trailing"),),
        (dict(use_karras_sigmas=True), (7, 20),
         "not an option of its class: ignored as diffusers ignores it"),
        (X0,), ({}, (1,), given("sigmas", [1.0, 0.0], drop=1)),
        steps=(7, 20),
    ),
    # ---- Heun / FlowMatchHeun --------------------------------------------------------
    *rows(
        HEUN,
        ({},), (dict(timestep_spacing="leading", steps_offset=1, beta_schedule="exp"),),
        (SD | dict(timestep_spacing="trailing"),),
        (SD | V | dict(use_karras_sigmas=True),),
        (dict(use_exponential_sigmas=True),), (SD | dict(use_beta_sigmas=True),),
        (X0, lens(*HEUN_T), given("timesteps", *HEUN_T)),
        (dict(clip_sample=True, clip_sample_range=0.9),),
        ({}, (1,), given("sigmas", [1.0, 0.0], drop=1)),
        steps=(7, 20),
    ),
    *rows(FHEUN, ({},), (dict(shift=3.0),), ({}, (7, 20), mu(0.5)), steps=(7, 20)),
    # ---- KDPM2 / KDPM2 a -------------------------------------------------------------
    *rows(
        KDPM2,
        ({},), (dict(timestep_spacing="leading", steps_offset=1),),
        (SD | dict(use_exponential_sigmas=True),), (dict(use_beta_sigmas=True),),
        (SD | V | dict(use_karras_sigmas=True),), (X0,),
        ({}, (2,), given("timesteps", [900, 500])),
        steps=(7, 20),
    ),
    *rows(
        KDPM2A,
        ({}, (10, 7), "linspace: integer timesteps at N = 10, fractional at 7"),
        (SD | dict(timestep_spacing="trailing"),),
        (dict(use_exponential_sigmas=True) | V,),
        (dict(use_karras_sigmas=True, timestep_spacing="leading"),), (X0,),
        steps=(7, 20),
    ),
    # ---- LMS -------------------------------------------------------------------------
    *rows(
        LMS,
        ({},), (SD | V | dict(timestep_spacing="leading", steps_offset=1),),
        (dict(timestep_spacing="trailing"),), (SD | X0 | dict(use_karras_sigmas=True),),
        (dict(use_exponential_sigmas=True),), (SD | X0 | dict(use_beta_sigmas=True),),
        (dict(beta_schedule="exp"),),
        steps=(7, 20),
    ),
    lms_order(2), lms_order(3),
    # ---- FlowMatchEuler --------------------------------------------------------------
    *rows(
        FLOW,
        ({},), (dict(shift=3.0), (7, 24), "SD3"),
        (dict(use_dynamic_shifting=True, shift=3.0), (7, 24), mu(0.93, "flux"),
         "FLUX.1-dev"),
        (dict(use_dynamic_shifting=True, time_shift_type="linear"), (7, 24), mu(1.6)),
        (dict(shift=1.0), (4, 24), FLUX_S, "FLUX.1-schnell"),
        (dict(shift=7.0), (7, 24), by_n("sigmas", _hunyuan), "HunyuanVideo"),
        (dict(use_dynamic_shifting=True, shift_terminal=0.1), (7, 24), mu(1.4, "flux"),
         "LTX-Video"),
        (dict(shift=3.0), (7, 24),
         by_n("timesteps", lambda n: np.linspace(1000, 60, n))),
        (dict(shift=2.0), (7, 24), _flow_both),
        *((dict(shift=3.0, **{k: True}),) for k in (
            "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")),
        (dict(use_dynamic_shifting=True, use_karras_sigmas=True), (7, 24),
         mu(1.1, "flux")),
        (dict(shift=1.0, invert_sigmas=True), (7, 24), FLUX_S),
        (dict(shift=3.0, invert_sigmas=True),),
        (dict(shift=3.0, num_train_timesteps=500),),
        (dict(shift=1.0), (7, 24),
         by_n("sigmas", lambda n: np.geomspace(1.0, 2e-5, n))),
        (dict(shift=3.0, stochastic_sampling=True),),
        (dict(use_dynamic_shifting=True, stochastic_sampling=True), (7, 24),
         mu(0.93, "flux")),
        (dict(shift=3.0), (7, 24), None,
         dict(s_churn=0.7, s_tmin=0.1, s_tmax=50.0, s_noise=1.3),
         "accepted by its step, unused"),
        (dict(use_dynamic_shifting=True),),
        (dict(stochastic_sampling=True, invert_sigmas=True),),
        (dict(use_karras_sigmas=True, use_beta_sigmas=True),),
        ({}, (7, 24), None, {"eta": 0.5}),
        steps=(7, 24),
    ),
    # ---- EDM -------------------------------------------------------------------------
    *rows(
        EDMDPM,
        ({}, (8, 20), "Playground v2.5"),
        (dict(sigma_schedule="exponential") | V,),
        (dict(rho=5.0, solver_type="heun", euler_at_final=True) | SMIN,),
        (dict(solver_order=3, lower_order_final=False, sigma_data=0.7),),
        (dict(algorithm_type="sde-dpmsolver++"),),
        (dict(algorithm_type="sde-dpmsolver++", solver_type="heun", sigma_max=40.0)
         | TH,),
        (dict(solver_order=1, sigma_min=0.01),),
        (X0,), (dict(algorithm_type="dpmsolver"),),
        (dict(algorithm_type="sde-dpmsolver++", solver_order=3),),
        (dict(algorithm_type="sde-dpmsolver++") | SMIN,),
        ({}, (3,), given("sigmas", [0.0, 0.5, 1.0])),
    ),
    *rows(
        EDMEULER,
        ({},), (dict(sigma_schedule="exponential") | V,), (dict(rho=3.0) | SMIN,),
        ({}, lens(*EDM_RAMP), given("sigmas", *EDM_RAMP, tensor=True),
         "the ramp fed to the Karras formula"),
        (dict(sigma_schedule="linear"),),
    ),
)
