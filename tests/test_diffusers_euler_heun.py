"""Parity of `aj.from_diffusers` with diffusers' Heun schedulers (float64-patched):
`HeunDiscreteScheduler` (`aj.Heun()`) and `FlowMatchHeunDiscreteScheduler`
(`aj.Heun(space="t")`); and the refusals of the two-evaluation k-diffusion
schedulers (KDPM2's parity: `test_diffusers_euler_kdpm2.py`). Harness:
`tests/diffusers64_euler.py`."""

import jax.numpy as jnp
import numpy as np
import pytest

import adjoint_jax as aj

from .diffusers64_euler import (
    FLOW_HEUN64,
    HEUN64,
    NS,
    SD,
    Z,
    agree,
    compare,
    config_of,
    gaussian,
    heun_points,
    jax_model,
    log_table,
    run_pipeline,
    torch_model,
)


pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
]


# ---- HeunDiscreteScheduler -----------------------------------------------------------
HEUN_CASES = [  # (name, config, pipeline timesteps or None)
    ("linspace", {}, None),
    (
        "leading, steps_offset, beta_schedule 'exp'",
        dict(timestep_spacing="leading", steps_offset=1, beta_schedule="exp"),
        None,
    ),
    ("trailing, scaled_linear", dict(SD, timestep_spacing="trailing"), None),
    (
        "Karras, v-prediction",
        dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"),
        None,
    ),
    ("exponential", dict(use_exponential_sigmas=True), None),
    ("beta", dict(SD, use_beta_sigmas=True), None),
    ("pipeline timesteps, sample", dict(prediction_type="sample"), "given"),
    (
        "clip_sample, clip_sample_range 0.9",
        dict(clip_sample=True, clip_sample_range=0.9),
        None,
    ),
]
GIVEN = {7: [999, 901.5, 700, 512, 300, 120, 15], 20: list(np.linspace(980, 4.5, 20))}


@pytest.mark.parametrize("name,kw,given", HEUN_CASES, ids=[c[0] for c in HEUN_CASES])
def test_heun(name, kw, given):
    for n in NS:
        steps = GIVEN[n] if given else None
        setup, seen, _ = compare(
            f"Heun: {name}",
            HEUN64(**kw),
            None if given else n,
            timesteps=steps,
            eval_times=heun_points,
        )
        clip = 0.9 if kw.get("clip_sample") else None
        assert setup.sampler == aj.Heun(clip_sample=clip) and len(seen) == 2 * n - 1


def _velocity(x, tau):
    """The exact flow-matching velocity of N(μ, s²) data at σ = tau/1000 (x is the
    flow latent (1 − σ) x_0 + σ ε)."""
    sig = tau / 1000
    a = 1 - sig
    norm = a * a + sig * sig
    return gaussian(a * a / norm, x / norm**0.5, "flow")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_heun(shift):
    for n in NS:
        sched = FLOW_HEUN64(shift=shift)
        sched.set_timesteps(n)
        ref, seen, _ = run_pipeline(sched, lambda x, t: _velocity(x, float(t)), Z)
        setup = aj.from_diffusers(
            config_of(sched), n, model=lambda p, x, t, c: _velocity(x, t)
        )
        assert setup.sampler == aj.Heun(space="t") and float(setup.ts[0]) == 1.0
        np.testing.assert_allclose(
            np.asarray(setup.ts[:-1]), np.asarray(seen[::2]) / 1000, rtol=0, atol=1e-15
        )
        x = aj.sample(
            setup.model,
            None,
            setup.initial(jnp.asarray(Z)),
            schedule=setup.schedule,
            ts=setup.ts,
            sampler=setup.sampler,
        )
        agree(f"FlowMatchHeun: shift {shift}", setup.final(x), ref)


GAPS: dict[str, float] = {}


def test_heun_spaces_differ():
    """One Heun does not serve both schedulers: Heun's rule is not invariant under
    y = x/α, so on each scheduler's grid the other space misses diffusers by far more
    than round-off (`GAPS`: 1e-3–1e-2 here)."""
    n = 7
    sched = HEUN64(**SD)
    sched.set_timesteps(n)
    ref, _, _ = run_pipeline(sched, torch_model(sched, "epsilon"), Z)
    setup = aj.from_diffusers(config_of(sched), n, model=jax_model("epsilon"))

    def run(sampler, x, ts, st=setup):
        return aj.sample(
            st.model,
            jnp.asarray(log_table(sched)),
            x,
            schedule=st.schedule,
            ts=ts,
            sampler=sampler,
        )

    x_T = setup.initial(jnp.asarray(Z))
    agree(
        "Heun: linspace, scaled_linear", setup.final(run(aj.Heun(), x_T, setup.ts)), ref
    )
    GAPS["HeunDiscrete by Heun(space='t')"] = float(
        np.max(
            np.abs(
                np.asarray(setup.final(run(aj.Heun(space="t"), x_T, setup.ts))) - ref
            )
        )
    )
    # The flow scheduler, its first step (from α = 0, where "ve" cannot start) by "t".
    flow = FLOW_HEUN64(shift=3.0)
    flow.set_timesteps(n)
    ref, _, _ = run_pipeline(flow, lambda x, t: _velocity(x, float(t)), Z)
    fs = aj.from_diffusers(config_of(flow), n, model=lambda p, x, t, c: _velocity(x, t))
    x_1 = run(aj.Heun(space="t"), jnp.asarray(Z), fs.ts[:2], fs)
    GAPS["FlowMatchHeun by Heun() after step 1"] = float(
        np.max(np.abs(np.asarray(run(aj.Heun(), x_1, fs.ts[1:], fs)) - ref))
    )
    agree("FlowMatchHeun: shift 3.0", run(aj.Heun(space="t"), x_1, fs.ts[1:], fs), ref)
    assert min(GAPS.values()) > 1e-4, GAPS


# ---- refusals ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,config,n,kw,key",
    [
        (
            "HeunDiscreteScheduler",
            dict(use_karras_sigmas=True),
            None,
            dict(timesteps=[900, 500]),
            "timesteps",
        ),
        ("HeunDiscreteScheduler", {}, 10, dict(sigmas=[1.0, 0.0]), "sigmas"),
        ("FlowMatchHeunDiscreteScheduler", {}, 10, dict(mu=0.5), "mu"),
        (
            "KDPM2DiscreteScheduler",
            dict(prediction_type="sample"),
            10,
            {},
            "prediction_type",
        ),
        (
            "KDPM2AncestralDiscreteScheduler",
            dict(prediction_type="sample"),
            10,
            {},
            "prediction_type",
        ),
        # Fractional linspace timesteps (999/6) and rounded Karras ones: the ancestral
        # network is called twice at each σ with two different timesteps.
        ("KDPM2AncestralDiscreteScheduler", {}, 7, {}, "timestep_spacing"),
        (
            "KDPM2AncestralDiscreteScheduler",
            dict(use_karras_sigmas=True, timestep_spacing="leading"),
            7,
            {},
            "use_karras_sigmas",
        ),
        ("KDPM2DiscreteScheduler", {}, 10, dict(timesteps=[900, 500]), "timesteps"),
    ],
)
def test_refusals_name_the_key(name, config, n, kw, key):
    with pytest.raises(ValueError, match=key):
        aj.from_diffusers({"_class_name": name, **config}, n, **kw)


def test_kdpm2_ancestral_linspace_with_integer_timesteps_is_accepted():
    # linspace with N − 1 dividing 999 (N = 10: 111 apart) has integer timesteps.
    setup = aj.from_diffusers({"_class_name": "KDPM2AncestralDiscreteScheduler"}, 10)
    assert setup.sampler == aj.KDPM2Ancestral()
