"""Parity of `aj.from_diffusers` with diffusers' `EulerDiscreteScheduler` and
`EulerAncestralDiscreteScheduler` (float64-patched, `tests/diffusers64_euler.py`),
driven as a pipeline drives them: latents = z · init_noise_sigma, the network called
on `scale_model_input(latents, t)` with the scheduler's timestep, the same normals
per step. The network is the analytic posterior of Gaussian data N(μ, s²) at the
noise level its timestep names (log σ interpolated in the training table, or
σ = e^{4τ} for continuous timesteps): any smooth function of (x, timestep) would do.
The harness (`compare`, the models) is in `tests/diffusers64_euler.py`.
"""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import adjoint_jax as aj

from .diffusers64_euler import (
    EULER64,
    NS,
    SD,
    Z,
    compare,
    config_of,
    gaussian,
    jax_model,
    log_table,
    net_timesteps,
)


pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
]

# ---- EulerDiscreteScheduler: aj.DPMSolver1() on its σ-grid ---------------------------
# Every case runs at two step counts, mostly NS = (7, 20): the compiled loops are
# shared between cases whose network adapter has the same structure.
EULER_CASES = [  # (name, config, step counts)
    ("linspace", {}, NS),
    (
        "leading, steps_offset, scaled_linear (SD)",
        dict(SD, timestep_spacing="leading", steps_offset=1),
        NS,
    ),
    ("trailing", dict(timestep_spacing="trailing"), NS),
    (
        "Karras, leading (SDXL)",
        dict(SD, use_karras_sigmas=True, timestep_spacing="leading"),
        NS,
    ),
    (
        "log_linear + Karras, trailing",
        dict(
            SD,
            interpolation_type="log_linear",
            use_karras_sigmas=True,
            timestep_spacing="trailing",
        ),
        NS,
    ),
    # diffusers' last step goes σ_min → σ_min: dropped, so N − 1 steps.
    (
        "exponential, final sigma_min (identity last step), sample",
        dict(
            use_exponential_sigmas=True,
            final_sigmas_type="sigma_min",
            prediction_type="sample",
        ),
        (8, 21),
    ),
    (
        "beta, sigma_min below the table, sigma_max",
        dict(use_beta_sigmas=True, sigma_min=0.004, sigma_max=10.0),
        NS,
    ),
    (
        "log_linear (timesteps paired by position)",
        dict(interpolation_type="log_linear"),
        NS,
    ),
    (
        "zero-SNR v-prediction trailing",
        dict(
            SD,
            rescale_betas_zero_snr=True,
            prediction_type="v_prediction",
            timestep_spacing="trailing",
        ),
        NS,
    ),
    (
        "continuous timesteps, v-prediction",
        dict(timestep_type="continuous", prediction_type="v_prediction"),
        NS,
    ),
    # With log_linear the loop takes one step more (to the final σ).
    (
        "continuous timesteps, v-prediction, log_linear",
        dict(
            timestep_type="continuous",
            prediction_type="v_prediction",
            interpolation_type="log_linear",
        ),
        (6, 19),
    ),
]


@pytest.mark.parametrize("name,kw,ns", EULER_CASES, ids=[c[0] for c in EULER_CASES])
def test_euler(name, kw, ns):
    continuous = kw.get("timestep_type") == "continuous"
    for n in ns:
        setup, seen, _ = compare(
            f"Euler: {name}", EULER64(**kw), n, continuous=continuous
        )
        assert setup.sampler == aj.DPMSolver1()
        if "final_sigmas_type" in kw:
            assert float(setup.ts[-1]) == 1 / 1000 and len(setup.ts) == n
        if "log_linear" in kw and continuous:
            assert len(seen) == n + 1


AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.555, 0.113, 0.0]
AYS_SD15_TIMESTEPS = [999, 850, 645, 455, 233, 124, 24]


def test_euler_pipeline_sigmas_and_timesteps():
    """set_timesteps(sigmas=) (7 steps of Align Your Steps' SDXL sigmas; 20 log-uniform
    ones ending above 0: the network then gets `_sigma_to_t`) and
    set_timesteps(timesteps=) (it gets exactly the given values)."""
    for sig in (AYS_SDXL, list(np.geomspace(12.0, 0.05, 20)) + [0.0]):
        compare("Euler: pipeline sigmas", EULER64(**SD), None, sigmas=sig)
    for steps in (AYS_SD15_TIMESTEPS, list(np.linspace(995.5, 3.25, 20))):
        compare("Euler: pipeline timesteps", EULER64(), None, timesteps=steps)


def test_euler_scales():
    sched = EULER64(final_sigmas_type="sigma_min")
    sched.set_timesteps(10)
    setup = aj.from_diffusers(config_of(sched), 10)
    assert setup.final_scale == pytest.approx(
        float((sched.sigmas[-1] ** 2 + 1) ** 0.5), abs=1e-15
    )
    assert setup.init_scale == pytest.approx(
        float(sched.init_noise_sigma / (sched.sigmas[0] ** 2 + 1) ** 0.5), abs=1e-15
    )


# ---- bfloat16 network on the σ-grids -------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        dict(SD, use_karras_sigmas=True),
        dict(interpolation_type="log_linear"),
        dict(use_beta_sigmas=True, sigma_min=0.004),
    ],
    ids=["karras", "log_linear", "beta-widened"],
)
def test_bfloat16_network_on_sigma_grids(kw):
    """A network computing in bfloat16 under a float32 state: the grid (float64 NumPy)
    and the timesteps it is called with (float32) stay distinct and equal diffusers'
    to float32 accuracy; the result is within bfloat16 accuracy of float64's."""
    n = 7
    sched = EULER64(**kw)
    sched.set_timesteps(n)
    setup = aj.from_diffusers(config_of(sched), n, model=jax_model("epsilon"))
    logs = log_table(sched)
    f64 = setup.final(
        aj.sample(
            setup.model,
            jnp.asarray(logs),
            setup.initial(jnp.asarray(Z)),
            schedule=setup.schedule,
            ts=setup.ts,
            sampler=setup.sampler,
        )
    )

    def bf16(params, x, tau, cond):
        assert tau.dtype == jnp.float32
        out = inner(params.astype(jnp.float32), x.astype(jnp.bfloat16), tau, cond)
        return out.astype(jnp.bfloat16)

    def inner(logs, x, tau, cond):
        s = jnp.exp(jnp.interp(tau, jnp.arange(logs.shape[0], dtype=tau.dtype), logs))
        return gaussian((1 / (1 + s * s)).astype(x.dtype), x, "epsilon")

    setup16 = aj.from_diffusers(config_of(sched), n, model=bf16)
    x = aj.sample(
        setup16.model,
        jnp.asarray(logs, jnp.float32),
        setup16.initial(jnp.asarray(Z, jnp.float32)),
        schedule=setup16.schedule,
        ts=setup16.ts,
        sampler=setup16.sampler,
    )
    assert x.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(x)))
    assert np.max(np.abs(np.asarray(setup16.final(x)) - np.asarray(f64))) < 3e-2
    taus = net_timesteps(setup16, np.asarray(setup16.ts[:-1], np.float32))
    assert taus.dtype == np.float32 and np.all(np.diff(taus) < 0)
    np.testing.assert_allclose(taus, sched.timesteps.numpy(), rtol=2e-5, atol=2e-3)


# ---- refusals ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,config,kw,key",
    [
        (
            "EulerDiscreteScheduler",
            dict(rescale_betas_zero_snr=True),
            {},
            "rescale_betas_zero_snr",
        ),
        (
            "EulerAncestralDiscreteScheduler",
            dict(prediction_type="sample"),
            {},
            "prediction_type",
        ),
        (
            "EulerDiscreteScheduler",
            dict(SD, use_karras_sigmas=True, sigma_max=80.0),
            {},
            "sigma_max",
        ),
        (
            "EulerDiscreteScheduler",
            dict(interpolation_type="cubic"),
            {},
            "interpolation_type",
        ),
        (
            "EulerDiscreteScheduler",
            dict(final_sigmas_type="one"),
            {},
            "final_sigmas_type",
        ),
        ("EulerDiscreteScheduler", {}, dict(eta=0.5), "eta"),
        ("EulerDiscreteScheduler", {}, dict(mu=0.5), "mu"),
        ("EulerAncestralDiscreteScheduler", {}, dict(sigmas=[1.0, 0.0]), "sigmas"),
        (
            "EulerDiscreteScheduler",
            dict(use_karras_sigmas=True),
            dict(timesteps=[900, 500]),
            "timesteps",
        ),
        ("LMSDiscreteScheduler", dict(beta_schedule="exp"), {}, "beta_schedule"),
    ],
)
def test_refusals_name_the_key(name, config, kw, key):
    n = None if ("sigmas" in kw or "timesteps" in kw) else 10
    with pytest.raises(ValueError, match=key):
        aj.from_diffusers({"_class_name": name, **config}, n, **kw)


def test_zero_snr_accepted_where_the_table_stays_monotone():
    # Linear betas: ᾱ_998 ≈ 4e-9 < 2⁻²⁴ (refused above); scaled_linear: ᾱ_998 ≈ 1e-7.
    ab = EULER64(**SD, rescale_betas_zero_snr=True).alphas_cumprod.numpy()
    assert ab[-2] > ab[-1] == 2.0**-24
    aj.from_diffusers(
        {"_class_name": "EulerDiscreteScheduler", **SD, "rescale_betas_zero_snr": True},
        10,
    )


def test_keys_other_schedulers_carry_are_ignored_like_diffusers_ignores_them():
    """`from_config` keeps a pipeline's other keys (DDIM's clip_sample, …): no warning,
    and a key that is not the class's own parameter (Euler a has no Karras σ) changes
    nothing, as in diffusers."""
    ddim = dict(
        SD,
        clip_sample=False,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        sample_max_value=1.0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in (
            "EulerDiscreteScheduler",
            "EulerAncestralDiscreteScheduler",
            "HeunDiscreteScheduler",
            "KDPM2DiscreteScheduler",
            "LMSDiscreteScheduler",
        ):
            aj.from_diffusers({"_class_name": name, **ddim}, 10)
    a = aj.from_diffusers(
        {
            "_class_name": "EulerAncestralDiscreteScheduler",
            "use_karras_sigmas": True,
            "timestep_type": "continuous",
        },
        10,
    )
    b = aj.from_diffusers({"_class_name": "EulerAncestralDiscreteScheduler"}, 10)
    np.testing.assert_array_equal(np.asarray(a.ts), np.asarray(b.ts))
