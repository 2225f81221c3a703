"""`FlowMatchEulerDiscreteScheduler` in full against the real diffusers (float64,
`tests/diffusers64`): every option that changes the numbers, as the pipelines pass
them (FLUX.1-dev's `sigmas` + `mu`, FLUX.1-schnell's and HunyuanVideo's `sigmas`,
LTX-Video's dynamic shift with `shift_terminal`, SD3's `shift`, custom
`timesteps`, Karras / exponential / beta σ, `invert_sigmas` (LongCat-Audio),
`stochastic_sampling` with the same noises (Stable Audio 3), `num_train_timesteps`),
at two step counts each; a bfloat16 network on every new grid; the refusals.

The data are N(μ, s²) elementwise, so the exact flow velocity is closed form on
both sides. adjoint_jax is driven only through `aj.from_diffusers`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import adjoint_jax as aj

from .diffusers64 import FLOW64
from .diffusers64_flow_lcm import run_loop


pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

MU, S = 0.7, 0.5
TOL = 1e-10
X_T = np.random.default_rng(0).standard_normal((2, 3))
NOISE = np.random.default_rng(1).standard_normal((64, 2, 3))
NAME = "FlowMatchEulerDiscreteScheduler"


def _velocity(x, sig):
    """u = ε − x_0 of the exact posterior under x = (1 − σ) x_0 + σ ε (any array
    module: NumPy, torch or jax)."""
    norm = ((1 - sig) ** 2 + sig**2) ** 0.5
    a, s = (1 - sig) / norm, sig / norm
    xx = x / norm
    d = a * a * S * S + s * s
    return s * (xx - a * MU) / d - (MU + a * S * S * (xx - a * MU) / d)


def _models(invert: bool, bf16: bool = False):
    """(diffusers' model(x, timestep), adjoint_jax's model(params, x, timestep,
    cond)): the velocity at σ = timestep / 1000, or with `invert_sigmas` at
    σ = 1 − timestep / 1000 and negated (the network's time runs from data to
    noise and it predicts the velocity towards the data)."""
    sign = -1.0 if invert else 1.0

    def sigma(timestep):
        return 1 - timestep / 1000 if invert else timestep / 1000

    def torch_model(x, t):
        return sign * _velocity(x, sigma(t.to(torch.float64)))

    def jax_model(params, x, t, cond):
        del params, cond
        if bf16:  # the network computes in bfloat16 (and returns bfloat16)
            return sign * _velocity(
                x.astype(jnp.bfloat16), sigma(t).astype(jnp.bfloat16)
            )
        return sign * _velocity(x, sigma(t))

    return torch_model, jax_model


def _config(sched):
    return dict(sched.config) | {"_class_name": NAME}


def _linspace_sigmas(n):  # FLUX, LTX-Video, LongCat-Audio
    return dict(sigmas=list(np.linspace(1.0, 1 / n, n)))


# id → (config, set_timesteps arguments for n steps)
CASES = {
    "sd3-shift3": (dict(shift=3.0), lambda n: {}),
    "flux-dev-mu": (
        dict(use_dynamic_shifting=True, shift=3.0),
        lambda n: dict(mu=0.93, **_linspace_sigmas(n)),
    ),
    "dynamic-linear-no-sigmas": (
        dict(use_dynamic_shifting=True, time_shift_type="linear"),
        lambda n: dict(mu=1.6),
    ),
    "flux-schnell-sigmas": (dict(shift=1.0), _linspace_sigmas),
    "hunyuan-video-sigmas": (
        dict(shift=7.0),
        lambda n: dict(sigmas=list(np.linspace(1.0, 0.0, n + 1)[:-1])),
    ),
    "ltx-mu-shift-terminal": (
        dict(use_dynamic_shifting=True, shift_terminal=0.1),
        lambda n: dict(mu=1.4, **_linspace_sigmas(n)),
    ),
    "timesteps": (
        dict(shift=3.0),
        lambda n: dict(timesteps=list(np.linspace(1000, 60, n))),
    ),
    "timesteps-and-sigmas": (
        dict(shift=2.0),
        lambda n: dict(
            timesteps=list(np.linspace(990, 20, n)),
            sigmas=list(np.linspace(1.0, 0.05, n)),
        ),
    ),
    "karras": (dict(shift=3.0, use_karras_sigmas=True), lambda n: {}),
    "exponential": (dict(shift=3.0, use_exponential_sigmas=True), lambda n: {}),
    "beta": (dict(shift=3.0, use_beta_sigmas=True), lambda n: {}),
    "karras-dynamic-mu": (
        dict(use_dynamic_shifting=True, use_karras_sigmas=True),
        lambda n: dict(mu=1.1, **_linspace_sigmas(n)),
    ),
    "invert-sigmas": (dict(shift=1.0, invert_sigmas=True), _linspace_sigmas),
    "invert-sigmas-shift": (dict(shift=3.0, invert_sigmas=True), lambda n: {}),
    "num-train-timesteps-500": (dict(shift=3.0, num_train_timesteps=500), lambda n: {}),
    # A last σ below aj.FlowMatching()'s default t_min = 1e-4.
    "sigmas-below-1e-4": (
        dict(shift=1.0), lambda n: dict(sigmas=list(np.geomspace(1.0, 2e-5, n)))),
    "stochastic": (dict(shift=3.0, stochastic_sampling=True), lambda n: {}),
    "stochastic-flux-mu": (
        dict(use_dynamic_shifting=True, stochastic_sampling=True),
        lambda n: dict(mu=0.93, **_linspace_sigmas(n)),
    ),
}

# (id, n) → max |ours − diffusers|, for the report.
MAX_DIFF: dict[tuple[str, int], float] = {}


def _diffusers(case, n):
    config, args = CASES[case]
    sched = FLOW64(**config)
    sched.set_timesteps(n, **args(n))
    return sched, args(n)


def _ours(sched, n, args, model, x_T, noise=None, **kw):
    setup = aj.from_diffusers(_config(sched), n, model=model, **args)
    out = aj.sample(
        setup.model,
        None,
        setup.initial(jnp.asarray(x_T)),
        schedule=setup.schedule,
        ts=setup.ts,
        sampler=setup.sampler,
        noise=noise,
        **kw,
    )
    return np.asarray(setup.final(out)), setup


@pytest.mark.filterwarnings("ignore:.*timesteps.*")
@pytest.mark.parametrize("n", [7, 24])
@pytest.mark.parametrize("case", list(CASES))
def test_parity(case, n):
    sched, args = _diffusers(case, n)
    config = CASES[case][0]
    invert, stochastic = (
        config.get("invert_sigmas", False),
        config.get("stochastic_sampling", False),
    )
    torch_model, jax_model = _models(invert)
    ref, draws = run_loop(sched, torch_model, X_T, noise=NOISE if stochastic else None)
    noise = jnp.asarray(NOISE[:n]) if stochastic else None
    ours, setup = _ours(sched, n, args, jax_model, X_T, noise)
    # The grid: diffusers' σ (in σ = t; 1 − its σ with invert_sigmas), then 0.
    sig = sched.sigmas.numpy()
    sig = np.concatenate([1 - sig[:-1], [0.0]]) if invert else sig
    np.testing.assert_allclose(np.asarray(setup.ts), sig, rtol=0, atol=1e-15)
    assert setup.sampler == (aj.LCM() if stochastic else aj.DPMSolver1())
    assert draws == (n if stochastic else 0)
    diff = float(np.max(np.abs(ours - ref)))
    MAX_DIFF[case, n] = diff
    assert diff < TOL, diff


def test_pipeline_grids_were_not_reproducible_before():
    """The cases `sigmas=` fixes: FLUX.1-schnell's and HunyuanVideo's grids differ
    from the scheduler's own linspace by 6e-2 and 4.5e-3 (the size of the error of
    a reproduction without `sigmas`)."""
    gaps = {}
    for case in ("flux-schnell-sigmas", "hunyuan-video-sigmas"):
        sched, args = _diffusers(case, 4 if case.startswith("flux") else 30)
        n = len(sched.timesteps)
        own = aj.diffusers_timesteps(_config(sched), n)
        given = aj.diffusers_timesteps(_config(sched), None, **args)
        np.testing.assert_allclose(
            np.asarray(given), sched.sigmas.numpy(), rtol=0, atol=1e-15
        )
        gaps[case] = float(np.max(np.abs(np.asarray(own) - np.asarray(given))))
    assert gaps["flux-schnell-sigmas"] > 5e-2 and gaps["hunyuan-video-sigmas"] > 4e-3, (
        gaps
    )


def test_given_timesteps_reach_the_network():
    """With `timesteps=` the network gets them as given (not 1000 σ)."""
    sched, args = _diffusers("timesteps-and-sigmas", 6)
    seen = []

    def model(params, x, t, cond):
        jax.debug.callback(lambda v: seen.append(float(v)), t)
        return _velocity(x, jnp.asarray(0.5))

    _ours(sched, None, args, model, X_T)
    np.testing.assert_allclose(seen, sched.timesteps.numpy(), rtol=0, atol=1e-12)


BF16_CASES = [
    "flux-dev-mu",
    "ltx-mu-shift-terminal",
    "karras",
    "exponential",
    "beta",
    "hunyuan-video-sigmas",
    "timesteps",
    "invert-sigmas",
]


@pytest.mark.filterwarnings("ignore:.*timesteps.*")
@pytest.mark.parametrize("case", BF16_CASES)
def test_bfloat16_network(case):
    """A network computing in bfloat16 under a float32 state: the grid and the
    timesteps it is called with are float64 numbers rounded once to float32 (none
    collide; each is diffusers' own to float32 precision) and x_0 is float64's to
    bfloat16 accuracy."""
    n = 24
    sched, args = _diffusers(case, n)
    invert = CASES[case][0].get("invert_sigmas", False)
    _, model64 = _models(invert)
    _, model16 = _models(invert, bf16=True)
    seen = []

    def recording(params, x, t, cond):
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), t)
        return model16(params, x, t, cond)

    ref, _ = _ours(sched, n, args, model64, X_T)
    out, _ = _ours(sched, n, args, recording, X_T.astype(np.float32))
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    seen = np.array(seen)
    assert seen.dtype == np.float32 and len(np.unique(seen)) == n
    want = sched.timesteps.numpy()
    np.testing.assert_allclose(seen, want, rtol=2e-7, atol=1e-4)
    err = float(np.max(np.abs(out - ref)))
    assert err < 5e-3, err  # measured 8e-4 – 1.5e-3


def test_step_churn_arguments_change_nothing():
    """diffusers' flow `step` takes `s_churn`, `s_tmin`, `s_tmax`, `s_noise` but does
    not use them: the results are identical, so there is nothing to reproduce."""
    torch_model, _ = _models(False)
    outs = []
    for kw in ({}, dict(s_churn=0.7, s_tmin=0.1, s_tmax=50.0, s_noise=1.3)):
        sched, _ = _diffusers("sd3-shift3", 7)
        outs.append(run_loop(sched, torch_model, X_T, **kw)[0])
    np.testing.assert_array_equal(outs[0], outs[1])


def test_mu_without_dynamic_shifting_is_ignored_as_by_diffusers():
    sched = FLOW64(shift=3.0)
    sched.set_timesteps(7, mu=2.0)
    ts = aj.diffusers_timesteps(_config(sched), 7, mu=2.0)
    np.testing.assert_allclose(np.asarray(ts), sched.sigmas.numpy(), rtol=0, atol=1e-15)


REFUSALS = [
    # (config, from_diffusers arguments, text the message must contain)
    (dict(use_dynamic_shifting=True), dict(num_steps=8), "`mu`"),
    (
        dict(stochastic_sampling=True, invert_sigmas=True),
        dict(num_steps=8),
        "stochastic_sampling",
    ),
    (dict(time_shift_type="cubic"), dict(num_steps=8), "time_shift_type"),
    (
        dict(use_karras_sigmas=True, use_beta_sigmas=True),
        dict(num_steps=8),
        "use_karras_sigmas",
    ),
    (dict(), dict(num_steps=8, sigmas=[1.0, 0.5]), "sigmas"),
    (dict(), dict(num_steps=2, sigmas=[1.0, 0.5], timesteps=[900.0]), "same length"),
    (dict(), dict(num_steps=8, eta=0.5), "eta"),
    (dict(), dict(num_steps=None, sigmas=[0.5, 0.7]), "decrease strictly"),
]


@pytest.mark.parametrize("config,kw,text", REFUSALS)
def test_refusals_name_the_option(config, kw, text):
    config = {"_class_name": NAME} | config
    num_steps = kw.pop("num_steps")
    with pytest.raises(ValueError, match=text.replace("`", "\\`")) as e:
        aj.from_diffusers(config, num_steps, **kw)
    if text == "stochastic_sampling":
        assert "invert_sigmas" in str(e.value)
