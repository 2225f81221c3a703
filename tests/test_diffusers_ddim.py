"""`DDIMScheduler`, `DDPMScheduler` and `CogVideoXDDIMScheduler` with diffusers' own
defaults (`clip_sample=True`), `thresholding`, DDPM's `variance_type`, custom DDPM
timesteps and CogVideoX's SNR shift: `aj.from_diffusers` against the real diffusers
in float64 (tests/diffusers64*.py), at two step counts each, deterministic and with
the same noises. Gradients, order, bfloat16 and refusals: test_diffusers_ddim_grads.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adjoint_jax as aj

from .diffusers64 import DDIM64, DDPM64
from .diffusers64_ddim import (
    COGVIDEOX64,
    NOISE,
    SD,
    TOL,
    X_T,
    config_of,
    jax_model,
    run_ddim,
    run_ddpm,
    run_ours,
    torch_model,
)


pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning"
)


# ---- parity ----------------------------------------------------------------------
# (id, scheduler class, config, step counts, η, use_clipped_model_output, expected
# sampler fields besides η)
CASES = [
    ("ddim-defaults-clip", DDIM64, {}, (10, 50), 0.0, False, dict(clip_sample=1.0)),
    # 'trailing' with N ∤ T: each step lands one timestep off the next (`targets`).
    (
        "ddim-trailing-uneven-clip-eta0.5",
        DDIM64,
        dict(SD, timestep_spacing="trailing"),
        (7, 30),
        0.5,
        False,
        dict(clip_sample=1.0),
    ),
    (
        "ddim-clip1.2-v-eta0.5",
        DDIM64,
        dict(SD, steps_offset=1, clip_sample_range=1.2, prediction_type="v_prediction"),
        (8, 20),
        0.5,
        False,
        dict(clip_sample=1.2),
    ),
    (
        "ddim-threshold-sample-alpha0",
        DDIM64,
        dict(
            thresholding=True,
            dynamic_thresholding_ratio=0.9,
            sample_max_value=1.3,
            prediction_type="sample",
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        (7, 25),
        0.0,
        False,
        dict(thresholding=(0.9, 1.3)),
    ),
    (
        "ddim-clip-clipped-eps-zero-snr-v-trailing",
        DDIM64,
        dict(
            SD,
            rescale_betas_zero_snr=True,
            prediction_type="v_prediction",
            timestep_spacing="trailing",
        ),
        # η = 0.8: at η = 1 the first step (from ᾱ = 0) has direction coefficient
        # √(1 − ᾱ_prev − std²) = √0, which diffusers computes as √(1.1e-16) = 1e-8 at
        # N = 20 (round-off; 5e-10 in the final latents); ours is 0.
        (10, 20),
        0.8,
        True,
        dict(clip_sample=1.0, clipped_eps=True),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_ddim_parity(case):
    _, cls, kw, ns, eta, clipped, fields = case
    for n in ns:
        sched = cls(**kw)
        sched.set_timesteps(n)
        kind = sched.config.prediction_type
        noise = NOISE[:n] if eta > 0 else None
        ref = run_ddim(
            sched,
            torch_model(sched, kind),
            X_T,
            noise=noise,
            eta=eta,
            use_clipped_model_output=clipped,
        ).numpy()
        setup = aj.from_diffusers(
            config_of(sched), n, model=jax_model(sched, kind), eta=eta
        )
        if clipped:  # a `step` argument: set on the sampler
            setup = setup._replace(
                sampler=dataclasses.replace(setup.sampler, clipped_eps=True)
            )
        targets = setup.sampler.targets
        if targets is not None:  # 'trailing' with N not dividing T
            # Each step goes where diffusers' does: timestep n − T // N.
            prev = sched.timesteps.numpy() - 1000 // n
            np.testing.assert_allclose(targets[:-1], (prev[:-1] + 1) / 1000, atol=0)
            assert np.any(prev[:-1] != sched.timesteps.numpy()[1:])
        assert dataclasses.replace(setup.sampler, targets=None) == aj.DDIM(
            eta, **fields
        )
        ours = run_ours(setup, None if noise is None else jnp.asarray(noise))
        np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)
        # The clipping or thresholding is active: without it diffusers differs.
        free = cls(**kw | dict(clip_sample=False, thresholding=False))
        free.set_timesteps(n)
        plain = run_ddim(
            free, torch_model(free, kind), X_T, noise=noise, eta=eta
        ).numpy()
        assert np.max(np.abs(plain - ref)) > 1e-3


def test_ddim_minimal_config_is_diffusers_default():
    """A config without `clip_sample` is read with diffusers' default (True)."""
    setup = aj.from_diffusers({"_class_name": "DDIMScheduler"}, 10)
    assert setup.sampler == aj.DDIM(clip_sample=1.0)
    setup = aj.from_diffusers({"_class_name": "DDPMScheduler"}, 10)
    assert setup.sampler == aj.DDIM(eta=1.0, clip_sample=1.0, clipped_eps=True)
    setup = aj.from_diffusers(
        {"_class_name": "DDIMScheduler", "clip_sample": False}, 10
    )
    assert setup.sampler == aj.DDIM()


# (id, config, step counts or custom timestep lists, expected sampler fields)
DDPM_CASES = [
    ("ddpm-defaults-clip", {}, (10, 30), dict(clip_sample=1.0, clipped_eps=True)),
    (
        "ddpm-fixed-large-threshold-v-trailing",
        dict(
            variance_type="fixed_large",
            thresholding=True,
            dynamic_thresholding_ratio=0.95,
            sample_max_value=1.4,
            prediction_type="v_prediction",
            timestep_spacing="trailing",
        ),
        (7, 20),
        dict(thresholding=(0.95, 1.4), clipped_eps=True, variance="fixed_large"),
    ),
    (
        "ddpm-fixed-small-log-clip1.5-sample-linspace",
        dict(
            SD,
            variance_type="fixed_small_log",
            clip_sample_range=1.5,
            prediction_type="sample",
            timestep_spacing="linspace",
        ),
        (9, 20),
        dict(clip_sample=1.5, clipped_eps=True),
    ),
    (
        "ddpm-custom-timesteps-clip",
        {},
        ([900, 700, 500, 301, 100, 0], [999, 640, 400, 123, 7, 2, 0]),
        dict(clip_sample=1.0, clipped_eps=True),
    ),
    (
        "ddpm-custom-timesteps-fixed-large-final-noise",
        dict(variance_type="fixed_large"),
        # The last timestep > 0: noise on the step to ᾱ = 1 (final_noise); = 0: none.
        ([999, 750, 400, 120, 37], [850, 500, 250, 100, 50, 0]),
        dict(clip_sample=1.0, clipped_eps=True, variance="fixed_large"),
    ),
]


@pytest.mark.parametrize("case", DDPM_CASES, ids=lambda c: c[0])
def test_ddpm_parity(case):
    _, kw, runs, fields = case
    for run in runs:
        sched = DDPM64(**kw)
        if isinstance(run, int):
            sched.set_timesteps(run)
            args = dict(num_steps=run)
        else:
            sched.set_timesteps(timesteps=run)
            args = dict(timesteps=run)
        n = len(sched.timesteps)
        kind = sched.config.prediction_type
        ref = run_ddpm(sched, torch_model(sched, kind), X_T, NOISE[:n]).numpy()
        setup = aj.from_diffusers(
            config_of(sched), model=jax_model(sched, kind), **args
        )
        if fields.get("variance") == "fixed_large":
            fields = fields | dict(final_noise=bool(sched.timesteps[-1] > 0))
        assert setup.sampler == aj.DDIM(eta=1.0, **fields)
        np.testing.assert_allclose(
            run_ours(setup, jnp.asarray(NOISE[:n])), ref, rtol=0, atol=TOL
        )


def test_ddpm_fixed_small_final_noise_quirk():
    """With 'trailing' the last timestep is > 0 and diffusers adds noise on the step
    to ᾱ = 1 with its variance 0 clamped to 1e-20 (std 1e-10); the plan reproduces it
    (`variance='fixed_small', final_noise=True`), 1e-10 ξ from the exact posterior."""
    n = 10
    sched = DDPM64(timestep_spacing="trailing")
    sched.set_timesteps(n)
    assert int(sched.timesteps[-1]) > 0
    ref = run_ddpm(sched, torch_model(sched, "epsilon"), X_T, NOISE[:n]).numpy()
    setup = aj.from_diffusers(config_of(sched), n, model=jax_model(sched, "epsilon"))
    noise = jnp.asarray(NOISE[:n])
    quirk = aj.DDIM(
        eta=1.0,
        clip_sample=1.0,
        clipped_eps=True,
        variance="fixed_small",
        final_noise=True,
    )
    assert setup.sampler == quirk
    np.testing.assert_allclose(run_ours(setup, noise), ref, rtol=0, atol=1e-13)
    exact = aj.DDIM(eta=1.0, clip_sample=1.0, clipped_eps=True)
    plain = run_ours(setup._replace(sampler=exact), noise)
    np.testing.assert_allclose(plain + 1e-10 * NOISE[n - 1], ref, rtol=0, atol=1e-13)


COG_CASES = [
    # CogVideoX-2b's scheduler: v-prediction, trailing, zero terminal SNR on the
    # shifted ᾱ.
    (
        "cogvideox-2b",
        dict(
            prediction_type="v_prediction",
            timestep_spacing="trailing",
            rescale_betas_zero_snr=True,
            clip_sample=False,
            snr_shift_scale=3.0,
        ),
        (9, 50),
        0.0,
    ),
    # Its defaults (ε, leading, clip_sample=True and η, both ignored by its step).
    ("cogvideox-defaults-eta-ignored", {}, (7, 20), 0.7),
    (
        "cogvideox-5b-shift1-offset",
        dict(
            prediction_type="v_prediction",
            snr_shift_scale=1.0,
            steps_offset=1,
            set_alpha_to_one=False,
        ),
        (8, 25),
        0.0,
    ),
]


@pytest.mark.parametrize("case", COG_CASES, ids=lambda c: c[0])
def test_cogvideox_parity(case):
    _, kw, ns, eta = case
    for n in ns:
        sched = COGVIDEOX64(**kw)
        sched.set_timesteps(n)
        kind = sched.config.prediction_type
        ref = run_ddim(sched, torch_model(sched, kind), X_T, eta=eta).numpy()
        setup = aj.from_diffusers(
            config_of(sched), n, model=jax_model(sched, kind), eta=eta
        )
        assert dataclasses.replace(setup.sampler, targets=None) == aj.DDIM()
        # The schedule is the shifted (and rescaled) ᾱ at the knots t = (n + 1)/T.
        ab = sched.alphas_cumprod.numpy()
        knots = jnp.asarray((np.arange(1000) + 1) / 1000)
        ours_ab = np.asarray(jax.vmap(setup.schedule.alpha)(knots)) ** 2
        np.testing.assert_allclose(ours_ab, ab, rtol=0, atol=1e-14)
        np.testing.assert_allclose(run_ours(setup), ref, rtol=0, atol=TOL)
