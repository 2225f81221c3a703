"""The k-diffusion family's new samplers (`aj.Heun`, `aj.KDPM2`, `aj.KDPM2Ancestral`,
`aj.LMS`, `aj.EulerChurn`) beyond parity: the exact (DTO) gradient equals central
finite differences of diffusers' own pipeline loop (float64), and a network
computing in bfloat16 on their grids stays within bfloat16 accuracy with distinct
timesteps. (Orders: `test_diffusers_euler_orders.py`.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adjoint_jax as aj

from .diffusers64_euler import (
    EULER64,
    FLOW_HEUN64,
    HEUN64,
    KDPM2_64,
    KDPM2A64,
    LMS64,
    MU,
    NOISE,
    SD,
    Z,
    config_of,
    gaussian,
    log_table,
    net_timesteps,
    run_pipeline,
)


pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
]

W = np.array([[1.0, -2.0, 0.5], [1.5, 0.3, -0.7]])


def _loss(x, lib=np):
    return lib.sum(W * lib.sin(x)) + 0.5 * lib.sum(x**2)


def _noise_level(tau, logs, flow, lib):
    """ᾱ and the network input's scale at the timestep: the VP table's σ (log-linear
    in the index), or flow matching's σ = tau/1000 (input x/√((1−σ)² + σ²))."""
    if flow:
        sig = tau / 1000
        norm = (1 - sig) ** 2 + sig**2
        return (1 - sig) ** 2 / norm, norm**0.5
    s = lib.exp(
        lib.interp(
            tau, lib.arange(logs.shape[0], dtype=getattr(tau, "dtype", None)), logs
        )
    )
    return 1 / (1 + s * s), 1.0


def _torch_model(logs, kind, mu, flow):
    def f(x, tau):
        ab, scale = _noise_level(float(tau), logs, flow, np)
        return gaussian(ab, x / scale, kind, mu)

    return f


def _jax_model(kind, flow):
    def f(params, x, tau, cond):
        ab, scale = _noise_level(tau, params["logs"], flow, jnp)
        return gaussian(ab, x / scale, kind, params["mu"])

    return f


CASES = [  # (sampler name, scheduler, n, sampler replacing the setup's, step kwargs)
    ("Heun", lambda: HEUN64(**SD, use_karras_sigmas=True), 6, None, {}),
    ("Heun(space='t')", lambda: FLOW_HEUN64(shift=3.0), 6, None, {}),
    ("KDPM2", lambda: KDPM2_64(), 6, None, {}),
    ("KDPM2Ancestral", lambda: KDPM2A64(timestep_spacing="trailing"), 6, None, {}),
    ("LMS", lambda: LMS64(prediction_type="v_prediction"), 8, None, {}),
    ("EulerChurn", lambda: EULER64(), 6, aj.EulerChurn(s_churn=2.0), dict(s_churn=2.0)),
]


@pytest.mark.parametrize(
    "name,make,n,sampler,step_kw", CASES, ids=[c[0] for c in CASES]
)
def test_dto_gradient_matches_diffusers_finite_differences(
    name, make, n, sampler, step_kw
):
    """∂L/∂μ (μ the data mean, a parameter of the network) and ∂L/∂z of
    L(final latents): `jax.grad` through `aj.sample` against central differences of
    diffusers' loop in float64."""
    sched = make()
    sched.set_timesteps(n)
    flow = "FlowMatch" in type(sched).__name__
    kind = "flow" if flow else sched.config.prediction_type
    logs = np.zeros(1) if flow else log_table(sched)
    setup = aj.from_diffusers(config_of(sched), n, model=_jax_model(kind, flow))
    if sampler is not None:
        setup = setup._replace(sampler=sampler)
    steps = len(setup.ts) - 1
    noise = jnp.asarray(NOISE[:steps]) if setup.sampler.is_sde else None
    draws = getattr(setup.sampler, "churn_steps", None)
    bank = NOISE if draws is None else NOISE[draws(setup.schedule, setup.ts)]

    def ours(mu, z):
        x = aj.sample(
            setup.model,
            {"logs": jnp.asarray(logs), "mu": mu},
            setup.initial(z),
            schedule=setup.schedule,
            ts=setup.ts,
            sampler=setup.sampler,
            noise=noise,
            adjoint=aj.DTO(),
        )
        return _loss(setup.final(x), jnp)

    g_mu, g_z = jax.grad(ours, argnums=(0, 1))(jnp.asarray(MU), jnp.asarray(Z))

    def theirs(mu, z):
        sched.set_timesteps(n)
        out, _, _ = run_pipeline(
            sched, _torch_model(logs, kind, mu, flow), z, bank, **step_kw
        )
        return _loss(out)

    d = 1e-6
    fd_mu = (theirs(MU + d, Z) - theirs(MU - d, Z)) / (2 * d)
    # (central differences carry ~1e-10 of round-off: L ~ 1, d = 1e-6)
    np.testing.assert_allclose(float(g_mu), fd_mu, rtol=1e-7, atol=1e-9)
    direction = np.random.default_rng(3).standard_normal(Z.shape)
    fd_z = (theirs(MU, Z + d * direction) - theirs(MU, Z - d * direction)) / (2 * d)
    np.testing.assert_allclose(
        float(np.vdot(np.asarray(g_z), direction)), fd_z, rtol=1e-7, atol=1e-9
    )


@pytest.mark.parametrize(
    "make,n",
    [
        (lambda: KDPM2_64(), 7),
        (lambda: FLOW_HEUN64(shift=3.0), 7),
        (lambda: HEUN64(beta_schedule="exp", timestep_spacing="leading"), 7),
    ],
    ids=["KDPM2 midpoint table", "FlowMatchHeun", "Heun beta_schedule exp"],
)
def test_bfloat16_network(make, n):
    """A network computing in bfloat16 under a float32 state: the float64 grid and
    the float32 timesteps it is called with stay distinct and equal to diffusers'
    (to float32 accuracy), and x_0 is within bfloat16 accuracy of float64's."""
    sched = make()
    sched.set_timesteps(n)
    flow = "FlowMatch" in type(sched).__name__
    kind = "flow" if flow else "epsilon"
    logs = np.zeros(1) if flow else log_table(sched)
    f64 = _jax_model(kind, flow)

    def bf16(params, x, tau, cond):
        assert tau.dtype == jnp.float32
        ab, scale = _noise_level(tau, params["logs"], flow, jnp)
        xb = (x / scale).astype(jnp.bfloat16)
        return gaussian(
            ab.astype(jnp.bfloat16), xb, kind, params["mu"].astype(jnp.bfloat16)
        )

    outs = []
    for model, dtype in ((f64, jnp.float64), (bf16, jnp.float32)):
        setup = aj.from_diffusers(config_of(sched), n, model=model)
        params = {"logs": jnp.asarray(logs, dtype), "mu": jnp.asarray(MU, dtype)}
        x = aj.sample(
            setup.model,
            params,
            setup.initial(jnp.asarray(Z, dtype)),
            schedule=setup.schedule,
            ts=setup.ts,
            sampler=setup.sampler,
        )
        assert x.dtype == dtype and np.all(np.isfinite(np.asarray(x)))
        outs.append(np.asarray(setup.final(x), np.float64))
    assert np.max(np.abs(outs[1] - outs[0])) < 3e-2
    taus = net_timesteps(setup, np.asarray(setup.ts[:-1], np.float32))
    assert taus.dtype == np.float32 and np.all(np.diff(taus) < 0)
    own = sched.timesteps.numpy()
    main = own if len(own) == n else np.concatenate([own[:1], own[2::2]])
    np.testing.assert_allclose(taus, main, rtol=2e-5, atol=2e-3)
