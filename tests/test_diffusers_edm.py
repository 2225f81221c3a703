"""Parity of `aj.from_diffusers` with diffusers' EDM schedulers in float64
(`tests/diffusers64_dpm.py`): `EDMDPMSolverMultistepScheduler` (Playground v2.5)
and `EDMEulerScheduler`, option by option at two step counts (8 and 20), the SDE
variant with the same noises; the refusals, by name.

The network is EDM's raw F(c_in y, c_noise) of Gaussian data N(μ, s²): it recovers
σ = e^{4 c_noise} and y from its inputs and returns the F whose preconditioned
output c_skip y + c_out F is the exact E[x_0 | y] — so the pipeline's scalings
(init_noise_sigma, c_in, c_noise, c_skip, c_out, the final y = x/α) all show.
"""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import adjoint_jax as aj

from .diffusers64_dpm import EDMDPM64, EDMEULER64, run_edm


pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning",
    "ignore::FutureWarning",
)

MU, S, SIGMA_DATA = 0.7, 0.5, 0.5
TOL = 1e-10
Z = np.random.default_rng(0).standard_normal((2, 3, 4))
NOISE = np.random.default_rng(1).standard_normal((24, 2, 3, 4))
NS = (8, 20)
MAX_DIFF: dict[str, float] = {}


def edm_raw(u, c_noise, kind, log):
    sig = (4 * c_noise).exp() if log is torch else jnp.exp(4 * c_noise)
    y = u * (sig**2 + SIGMA_DATA**2) ** 0.5
    x0 = MU + S * S * (y - MU) / (S * S + sig * sig)
    c_skip = SIGMA_DATA**2 / (sig**2 + SIGMA_DATA**2)
    c_out = sig * SIGMA_DATA / (sig**2 + SIGMA_DATA**2) ** 0.5
    return (x0 - c_skip * y) / (c_out if kind == "epsilon" else -c_out)


class EDMNet(eqx.Module):
    kind: str = eqx.field(static=True)

    def __call__(self, params, u, c_noise, cond):
        return edm_raw(u, c_noise, self.kind, jnp)


def _sample(model, schedule, ts, sampler, x_T, noise):
    return aj.sample(model, None, x_T, schedule=schedule, ts=ts, sampler=sampler,
                     noise=noise)


def agree(case, cls, kw, n, *, noisy=False, ramp=None):
    kind = kw.get("prediction_type", "epsilon")
    noise = NOISE if noisy else None
    sched = cls(**kw)
    if ramp is None:
        sched.set_timesteps(n)
    else:
        sched.set_timesteps(sigmas=torch.as_tensor(ramp))
    ref = run_edm(sched, lambda u, t: edm_raw(u, t.to(torch.float64), kind, torch), Z,
                  noise)
    config = dict(sched.config) | {"_class_name": cls.__mro__[1].__name__}
    setup = aj.from_diffusers(config, n, model=EDMNet(kind), sigmas=ramp)
    steps = len(setup.ts) - 1
    out = _sample(setup.model, setup.schedule, setup.ts, setup.sampler,
                  setup.initial(jnp.asarray(Z)),
                  None if noise is None else jnp.asarray(noise[:steps]))
    diff = float(np.max(np.abs(np.asarray(setup.final(out)) - ref)))
    MAX_DIFF[case] = max(MAX_DIFF.get(case, 0.0), diff)
    assert diff < TOL, (case, n, diff)
    return setup


DPM_CASES = {
    "karras (Playground v2.5)": ({}, False),
    "exponential, v_prediction": (dict(sigma_schedule="exponential",
                                       prediction_type="v_prediction"), False),
    "sigma_min, rho 5, heun, euler_at_final":
        (dict(final_sigmas_type="sigma_min", rho=5.0, solver_type="heun",
              euler_at_final=True), False),
    "order 3, lower_order_final=False, sigma_data 0.7": (dict(solver_order=3,
                                                              lower_order_final=False,
                                                              sigma_data=0.7), False),
    "sde-dpmsolver++, order 2": (dict(algorithm_type="sde-dpmsolver++"), True),
    "sde-dpmsolver++ heun, sigma_max 40, thresholding": (dict(
        algorithm_type="sde-dpmsolver++", solver_type="heun", sigma_max=40.0,
        thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5), True),
    "order 1, sigma_min 0.01": (dict(solver_order=1, sigma_min=0.01), False),
}


@pytest.mark.parametrize("case", list(DPM_CASES))
def test_edm_dpm_parity(case):
    kw, noisy = DPM_CASES[case]
    for n in NS:
        agree(f"EDMDPMSolverMultistep {case}", EDMDPM64, kw, n, noisy=noisy)


EULER_CASES = {
    "karras": {},
    "exponential, v_prediction": dict(sigma_schedule="exponential",
                                      prediction_type="v_prediction"),
    "sigma_min (identity last step dropped), rho 3": dict(final_sigmas_type="sigma_min",
                                                          rho=3.0),
}


@pytest.mark.parametrize("case", list(EULER_CASES))
def test_edm_euler_parity(case):
    for n in NS:
        setup = agree(f"EDMEuler {case}", EDMEULER64, EULER_CASES[case], n)
        assert setup.sampler == aj.DPMSolver1()


def test_edm_euler_pipeline_ramp():
    """`set_timesteps(sigmas=)` takes the ramp fed to the Karras formula (beyond
    [0, 1] the σ leave [σ_min, σ_max]: the schedule's range widens)."""
    for ramp in ([0.0, 0.1, 0.3, 0.6, 0.8, 1.0],
                 [-0.05, 0.1, 0.25, 0.5, 0.7, 0.85, 0.95, 1.02]):
        setup = agree("EDMEuler pipeline ramp", EDMEULER64, {}, None,
                      ramp=np.asarray(ramp))
    assert setup.schedule.t_max > 80.0 and setup.schedule.t_min < 0.002


def test_init_noise_sigma_and_schedule():
    """x_T = α(σ_0) √(σ_max² + 1) z (σ_max of the config, σ_0 the grid's first σ),
    on `aj.VarianceExploding(σ_min, σ_max)`."""
    cfg = {"_class_name": "EDMDPMSolverMultistepScheduler", "sigma_max": 40.0}
    setup = aj.from_diffusers(cfg, 8, model=EDMNet("epsilon"))
    assert setup.schedule == aj.VarianceExploding(0.002, 40.0)
    assert float(setup.ts[0]) == 40.0
    assert setup.init_scale == pytest.approx(1.0, abs=1e-15)
    assert setup.final_scale == 1.0 and float(setup.ts[-1]) == 0.0
    ramp = aj.from_diffusers({"_class_name": "EDMEulerScheduler"}, None,
                             sigmas=[0.5, 0.75, 1.0])
    assert ramp.init_scale == pytest.approx((80.0**2 + 1) ** 0.5
                                            / (float(ramp.ts[0]) ** 2 + 1) ** 0.5)


@pytest.mark.parametrize(
    "name,kw,key,n",
    [
        ("EDMDPMSolverMultistepScheduler", dict(prediction_type="sample"),
         "prediction_type", 8),
        ("EDMEulerScheduler", dict(sigma_schedule="linear"), "sigma_schedule", 8),
        ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver"),
         "algorithm_type", 8),
        ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++",
                                                solver_order=3), "solver_order", 8),
        ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++",
                                                final_sigmas_type="sigma_min"),
         "final_sigmas_type", 8),
        ("EDMDPMSolverMultistepScheduler", dict(final_sigmas_type="last"),
         "final_sigmas_type", 8),
    ],
)
def test_edm_refusals_name_the_key(name, kw, key, n):
    with pytest.raises(ValueError, match=key):
        aj.from_diffusers({"_class_name": name} | kw, n)


def test_edm_dpm_takes_no_sigmas():
    with pytest.raises(ValueError, match="sigmas"):
        aj.from_diffusers({"_class_name": "EDMDPMSolverMultistepScheduler"}, None,
                          sigmas=[0.0, 0.5, 1.0])


def test_full_edm_configs_are_known():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for cls in (EDMDPM64, EDMEULER64):
            config = dict(cls().config) | {"_class_name": cls.__mro__[1].__name__}
            aj.from_diffusers(config, 8)
