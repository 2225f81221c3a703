"""Parity with HuggingFace diffusers (the real package, pinned in the `test` extra).

Both sides run in float64 (diffusers' float32 casts removed by `tests/diffusers64`)
on an analytic model: the data are N(μ, s²) elementwise, so the exact ε, v and
flow-matching velocity are closed-form functions of (x, ᾱ). adjoint_jax is driven
only through its diffusers companions (`aj.from_diffusers`: schedule, grid, sampler
and model adapter from the config), as a user would drive it.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import adjoint_jax as aj

from .diffusers64 import DDIM64, DDPM64, DPM64, FLOW64, run_flow, run_vp


pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

MU, S = 0.7, 0.5
TOL = 1e-10
X_T = np.random.default_rng(0).standard_normal((2, 3))
NOISE = np.random.default_rng(1).standard_normal((64, 2, 3))

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _gaussian(ab):
    """E[ε | x] and E[x_0 | x] under x = √ᾱ x_0 + √(1 − ᾱ) ε, x_0 ~ N(μ, s²)."""
    a, sig = ab**0.5, (1 - ab) ** 0.5

    def post(x):
        d = a * a * S * S + sig * sig
        eps = sig * (x - a * MU) / d
        x0 = MU + a * S * S * (x - a * MU) / d
        return eps, x0

    return post


def _torch_model(alphas_cumprod, kind="epsilon"):
    """diffusers' side: model(x, integer timestep) in float64."""
    ab = alphas_cumprod.to(torch.float64)

    def f(x, n):
        eps, x0 = _gaussian(ab[n])(x)
        if kind == "epsilon":
            return eps
        a, sig = ab[n] ** 0.5, (1 - ab[n]) ** 0.5
        return a * eps - sig * x0  # v_prediction

    return f


def _jax_model(alphas_cumprod, kind="epsilon"):
    """adjoint_jax's side: the same network as a diffusers pipeline calls it,
    `model(params, x, timestep, cond)`, timestep an integer array."""
    ab = jnp.asarray(alphas_cumprod.numpy())

    def f(params, x, n, cond):
        del params, cond
        assert jnp.issubdtype(n.dtype, jnp.integer)
        eps, x0 = _gaussian(ab[n])(x)
        if kind == "epsilon":
            return eps
        a, sig = ab[n] ** 0.5, (1 - ab[n]) ** 0.5
        return a * eps - sig * x0

    return f


def _ours(config, n, model, noise=None, eta=0.0):
    setup = aj.from_diffusers(config, n, model=model, eta=eta)
    out = aj.sample(
        setup.model, None, jnp.asarray(X_T), schedule=setup.schedule, ts=setup.ts,
        sampler=setup.sampler, noise=noise,
    )
    return np.asarray(out), setup


# check → largest |ours − diffusers| seen (`python benchmarks/diffusers_parity.py`
# prints it: the README's parity table).
MAX_DIFF: dict[str, float] = {}


def _agree(check, ours, ref, atol=TOL):
    diff = float(np.max(np.abs(np.asarray(ours) - np.asarray(ref))))
    MAX_DIFF[check] = max(MAX_DIFF.get(check, 0.0), diff)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=atol)


def _config(scheduler):
    return dict(scheduler.config) | {"_class_name": type(scheduler).__mro__[1].__name__}


@pytest.mark.parametrize("n", [20, 50])
def test_ddim_to_alpha_one(n):
    sched = DDIM64(**SD, steps_offset=1, clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(n)
    ref = run_vp(sched, _torch_model(sched.alphas_cumprod), X_T)
    ours, setup = _ours(_config(sched), n, _jax_model(sched.alphas_cumprod))
    assert float(setup.ts[-1]) == 0.0 and len(setup.ts) == n + 1
    _agree("DDIM to alpha=1, N=20/50", ours, ref, atol=TOL)


@pytest.mark.parametrize("n", [10, 25])
def test_dpm_solver_pp_default(n):
    sched = DPM64()  # dpmsolver++, order 2, midpoint, lower_order_final, σ_last = 0
    sched.set_timesteps(n)
    ref = run_vp(sched, _torch_model(sched.alphas_cumprod), X_T)
    ours, setup = _ours(_config(sched), n, _jax_model(sched.alphas_cumprod))
    assert setup.sampler == aj.DPMSolverPP()
    assert float(setup.ts[-1]) == 0.0
    _agree("DPMSolverPP() = default DPMSolverMultistepScheduler, N=10/25", ours, ref, atol=TOL)


@pytest.mark.parametrize("n", [8, 20])
def test_dpm_solver_pp_order3_heun_to_sigma_min(n):
    sched = DPM64(
        **SD, solver_order=3, solver_type="heun", lower_order_final=False,
        final_sigmas_type="sigma_min",
    )
    sched.set_timesteps(n)
    ref = run_vp(sched, _torch_model(sched.alphas_cumprod), X_T)
    ours, setup = _ours(_config(sched), n, _jax_model(sched.alphas_cumprod))
    assert setup.sampler == aj.DPMSolverPP(3, "heun", lower_order_final=False)
    assert float(setup.ts[-1]) == 1 / 1000
    _agree("DPMSolverPP(3, heun, lower_order_final=False) to sigma_min, N=8/20", ours, ref, atol=TOL)


def test_dpm_solver_pp_order3_trailing_lower_order_final():
    sched = DPM64(**SD, solver_order=3, timestep_spacing="trailing")
    sched.set_timesteps(12)
    ref = run_vp(sched, _torch_model(sched.alphas_cumprod), X_T)
    ours, _ = _ours(_config(sched), 12, _jax_model(sched.alphas_cumprod))
    _agree("DPMSolverPP(3), trailing, N=12", ours, ref, atol=TOL)


@pytest.mark.parametrize("eta", [1.0, 0.4])
def test_ddim_eta_with_variance_noise(eta):
    n = 20
    sched = DDIM64(**SD, steps_offset=1, clip_sample=False)
    sched.set_timesteps(n)
    ref = run_vp(sched, _torch_model(sched.alphas_cumprod), X_T, noise=NOISE, eta=eta)
    ours, setup = _ours(
        _config(sched), n, _jax_model(sched.alphas_cumprod), noise=jnp.asarray(NOISE[:n]),
        eta=eta,
    )
    assert setup.sampler == aj.DDIM(eta=eta)
    _agree("DDIM(eta=1 / 0.4) with variance_noise", ours, ref, atol=TOL)


def _run_ddpm(sched, noise):
    """DDPMScheduler draws its noise inside `step`; feed it `noise[i]` at step i."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    bank = iter(torch.as_tensor(noise))
    original = ddpm_module.randn_tensor
    ddpm_module.randn_tensor = lambda shape, generator=None, device=None, dtype=None: (
        next(bank).to(dtype)
    )
    try:
        return run_vp(sched, _torch_model(sched.alphas_cumprod), X_T)
    finally:
        ddpm_module.randn_tensor = original


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddpm_posterior_is_ddim_eta_one(spacing):
    n = 25
    sched = DDPM64(clip_sample=False, timestep_spacing=spacing)
    sched.set_timesteps(n)
    ref = _run_ddpm(sched, NOISE)
    ours, setup = _ours(
        _config(sched), n, _jax_model(sched.alphas_cumprod), noise=jnp.asarray(NOISE[:n])
    )
    if spacing == "trailing":
        # The last timestep is 39, not 0, so diffusers adds noise on the step to
        # ᾱ = 1, whose variance 0 it clamps to 1e-20: a standard deviation of 1e-10.
        assert int(sched.timesteps[-1]) > 0
        assert setup.sampler == aj.DDIM(1.0, variance="fixed_small", final_noise=True)
    else:
        assert setup.sampler == aj.DDIM(eta=1.0)
    _agree("DDPMScheduler = DDIM(eta=1), same noises", ours, ref, atol=1e-13)


def test_flow_match_euler_from_sigma_one():
    n = 12
    sched = FLOW64(shift=1.0)
    sched.set_timesteps(n)

    def velocity(x, timestep):  # x_σ = (1 − σ) x_0 + σ ε, u = ε − x_0
        sig = timestep / 1000
        eps, x0 = _gaussian((1 - sig) ** 2 / ((1 - sig) ** 2 + sig**2))(
            x / ((1 - sig) ** 2 + sig**2) ** 0.5
        )
        return eps - x0

    ref = run_flow(sched, lambda x, t: velocity(x, t.to(torch.float64)), X_T)

    def model(params, x, timestep, cond):
        return velocity(x, timestep)

    ours, setup = _ours(_config(sched), n, model)
    assert float(setup.ts[0]) == 1.0 and float(setup.ts[-1]) == 0.0
    np.testing.assert_allclose(np.asarray(setup.ts), sched.sigmas.numpy(), rtol=0, atol=1e-15)
    _agree("FlowMatchEuler shift 1, sigma 1 -> 0", ours, ref, atol=TOL)


def test_flow_match_euler_shift_three():
    sched = FLOW64(shift=3.0)
    sched.set_timesteps(10)
    ts = aj.diffusers_timesteps(_config(sched), 10)
    np.testing.assert_allclose(np.asarray(ts), sched.sigmas.numpy(), rtol=0, atol=1e-15)


def test_rescale_betas_zero_snr():
    sched = DDIM64(**SD, rescale_betas_zero_snr=True, clip_sample=False)
    schedule = aj.diffusers_schedule(dict(sched.config))
    ab = sched.alphas_cumprod.numpy()
    knots = (np.arange(1000) + 1) / 1000
    ours = np.asarray(jax.vmap(schedule.alpha)(jnp.asarray(knots))) ** 2
    _agree("rescale_betas_zero_snr alphas (1000)", ours, ab, atol=1e-14)
    assert float(schedule.alpha(jnp.asarray(1.0))) == 0.0 == ab[-1]
    assert schedule.alpha_zero_time == 1.0


def test_zero_snr_v_prediction_trailing_from_alpha_zero():
    """The Lin et al. recipe: zero terminal SNR, v-prediction, trailing spacing; the
    first step starts at ᾱ = 0 (x̂_0 from the v-model)."""
    n = 10
    sched = DDIM64(
        **SD, rescale_betas_zero_snr=True, clip_sample=False, prediction_type="v_prediction",
        timestep_spacing="trailing",
    )
    sched.set_timesteps(n)
    assert float(sched.alphas_cumprod[sched.timesteps[0]]) == 0.0
    ref = run_vp(sched, _torch_model(sched.alphas_cumprod, "v_prediction"), X_T)
    ours, setup = _ours(
        _config(sched), n, _jax_model(sched.alphas_cumprod, "v_prediction")
    )
    assert float(setup.ts[0]) == 1.0
    _agree("zero-SNR v-prediction trailing, from alpha=0", ours, ref, atol=TOL)


GRID_CASES = [
    (DDIM64, dict(timestep_spacing="leading", steps_offset=1), 50),
    (DDIM64, dict(timestep_spacing="leading"), 7),
    (DDIM64, dict(timestep_spacing="trailing"), 20),
    (DDPM64, dict(timestep_spacing="leading", steps_offset=1), 30),
    (DDPM64, dict(timestep_spacing="trailing"), 7),
    (DDPM64, dict(timestep_spacing="linspace"), 13),
    (DPM64, dict(timestep_spacing="linspace"), 10),
    (DPM64, dict(timestep_spacing="leading", steps_offset=1), 25),
    (DPM64, dict(timestep_spacing="trailing"), 7),
    (DPM64, dict(timestep_spacing="linspace", final_sigmas_type="sigma_min"), 20),
]


@pytest.mark.parametrize("cls,kw,n", GRID_CASES)
def test_grid_companion_reproduces_set_timesteps(cls, kw, n):
    sched = cls(**kw, **({} if cls is DPM64 else {"clip_sample": False}))
    sched.set_timesteps(n)
    ts = np.asarray(aj.diffusers_timesteps(_config(sched), n))
    steps = sched.timesteps.numpy()
    np.testing.assert_array_equal(np.round(ts[:-1] * 1000 - 1).astype(int), steps)
    np.testing.assert_allclose(ts[:-1], (steps + 1) / 1000, rtol=0, atol=0)
    if cls is DPM64:
        # The last σ of the scheduler is the grid's end.
        sig_last = float(sched.sigmas[-1])
        ab_end = 1.0 if ts[-1] == 0 else float(sched.alphas_cumprod[0])
        assert sig_last == pytest.approx(((1 - ab_end) / ab_end) ** 0.5, abs=1e-15)


def test_ddim_linspace_spacing_refused():
    sched = DDIM64(timestep_spacing="linspace", clip_sample=False)
    with pytest.raises(ValueError, match="timestep_spacing='linspace'"):
        aj.diffusers_timesteps(_config(sched), 7)


@pytest.mark.parametrize(
    "name,key,value",
    [
        ("DPMSolverMultistepScheduler", "variance_type", "learned"),
        ("DPMSolverMultistepScheduler", "algorithm_type", "unipc"),
        ("DPMSolverMultistepScheduler", "rescale_betas_zero_snr", True),
        ("FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting", True),
    ],
)
def test_config_keys_that_change_numbers_are_refused(name, key, value):
    config = {"_class_name": name, key: value}
    with pytest.raises(ValueError, match=key):
        aj.from_diffusers(config, 10)


def test_unknown_config_key_warns():
    with pytest.warns(UserWarning, match="not_a_key"):
        aj.diffusers_timesteps(
            {"_class_name": "DPMSolverMultistepScheduler", "not_a_key": 1}, 10
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aj.diffusers_timesteps(_config(DPM64()), 10)
        # Keys another scheduler class takes, carried over by
        # `Cls.from_config(pipe.scheduler.config)`, are ignored as diffusers ignores
        # them (SDXL's Euler config read as DPM-Solver++).
        carried = dict(clip_sample=False, interpolation_type="linear",
                       skip_prk_steps=True, set_alpha_to_one=False)
        aj.diffusers_timesteps(_config(DPM64()) | carried, 10)


def test_discrete_timestep_rounds_in_float32():
    def net(params, x, n, cond):
        assert n.dtype == jnp.int32
        return n

    adapted = aj.discrete_timestep_model(net, 1000)
    knots = jnp.asarray((np.arange(1000) + 1) / 1000, jnp.float32)
    n = jax.vmap(lambda t: adapted(None, t, t, None))(knots)
    np.testing.assert_array_equal(np.asarray(n), np.arange(1000))
    # Truncation would have mapped some knots to the timestep below.
    assert np.any(np.asarray(knots * 1000 - 1).astype(int) != np.arange(1000))
