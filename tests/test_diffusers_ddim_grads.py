"""The DDIM family's gradients, order, bfloat16 model and refusals: `aj.DTO()`
through clipping/thresholding against torch's autograd through diffusers and
central differences of diffusers itself (float64); the order of DDIM with
clip_sample; a bfloat16 network on CogVideoX's grid; every refused option names
its key, and the continuous adjoints refuse a clipping sampler by name.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import adjoint_jax as aj

from .diffusers64 import DDIM64, DDPM64
from .diffusers64_ddim import (
    COGVIDEOX64,
    MU,
    NOISE,
    SD,
    SHAPE,
    X_T,
    config_of,
    gaussian_output,
    jax_model,
    run_ddim,
    run_ddpm,
    torch_model,
)
from .helpers import slope


pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning"
)


# ---- gradients -------------------------------------------------------------------
GRAD_CASES = [
    # DDIM with clip_sample, η = 0.5 and v-prediction.
    (
        "ddim-clip",
        DDIM64,
        dict(SD, steps_offset=1, prediction_type="v_prediction"),
        10,
        0.5,
    ),
    # DDPM with thresholding and the large variance (its final noise on).
    (
        "ddpm-threshold-fixed-large",
        DDPM64,
        dict(
            thresholding=True,
            dynamic_thresholding_ratio=0.9,
            sample_max_value=1.3,
            variance_type="fixed_large",
            timestep_spacing="trailing",
        ),
        7,
        None,
    ),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c[0])
def test_dto_gradient_matches_torch_autograd_and_finite_differences(case):
    """∂/∂μ and ∂/∂x_T of Σ w · x_0: `aj.DTO()` equals torch's autograd through
    diffusers (the same almost-everywhere derivative of the clamps and the quantile)
    to round-off, and central differences of diffusers itself to 1e-6."""
    _, cls, kw, n, eta = case
    sched = cls(**kw)
    sched.set_timesteps(n)
    kind = sched.config.prediction_type
    rng = np.random.default_rng(7)
    w, v = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    noise = NOISE[:n]

    def theirs(mu, x_T):
        model = torch_model(sched, kind, mu)
        if cls is DDPM64:
            x0 = run_ddpm(sched, model, x_T, noise)
        else:
            x0 = run_ddim(sched, model, x_T, noise=noise, eta=eta)
        return (torch.as_tensor(w) * x0).sum()

    mu_t = torch.tensor(MU, dtype=torch.float64, requires_grad=True)
    x_t = torch.tensor(X_T, requires_grad=True)
    theirs(mu_t, x_t).backward()

    setup = aj.from_diffusers(
        config_of(sched),
        n,
        model=jax_model(sched, kind),
        eta=0.0 if eta is None else eta,
    )

    def loss(mu, x_T):
        x0 = aj.sample(
            setup.model,
            mu,
            x_T,
            schedule=setup.schedule,
            ts=setup.ts,
            sampler=setup.sampler,
            noise=jnp.asarray(noise),
            adjoint=aj.DTO(),
        )
        return jnp.sum(jnp.asarray(w) * x0)

    g_mu, g_x = jax.grad(loss, argnums=(0, 1))(jnp.asarray(MU), jnp.asarray(X_T))
    np.testing.assert_allclose(float(g_mu), float(mu_t.grad), rtol=1e-10)
    np.testing.assert_allclose(
        np.asarray(g_x), x_t.grad.numpy(), rtol=1e-10, atol=1e-12
    )

    h = 1e-6
    with torch.no_grad():
        x_T = torch.tensor(X_T)
        fd_mu = (theirs(MU + h, x_T) - theirs(MU - h, x_T)) / (2 * h)
        fd_v = (
            theirs(MU, x_T + h * torch.tensor(v))
            - theirs(MU, x_T - h * torch.tensor(v))
        ) / (2 * h)
    np.testing.assert_allclose(float(g_mu), float(fd_mu), rtol=1e-6)
    np.testing.assert_allclose(float(np.vdot(g_x, v)), float(fd_v), rtol=1e-6)


def test_truncated_runs_a_clipping_sampler():
    sched = DDIM64()
    sched.set_timesteps(10)
    setup = aj.from_diffusers(config_of(sched), 10, model=jax_model(sched, "epsilon"))

    def loss(mu):  # DRaFT-K: the last 3 steps differentiated (in μ)
        return jnp.sum(
            aj.sample(
                setup.model,
                mu,
                jnp.asarray(X_T),
                schedule=setup.schedule,
                ts=setup.ts,
                sampler=setup.sampler,
                adjoint=aj.Truncated(last=3),
            )
            ** 2
        )

    g = float(jax.grad(loss)(jnp.asarray(MU)))
    assert np.isfinite(g) and g != 0


# ---- order -----------------------------------------------------------------------
def test_clipped_ddim_is_first_order():
    """DDIM with clip_sample converges at order 1 to the limit of its own (piecewise
    smooth, Lipschitz) dynamics: errors against N = 640 steps. (Dynamic thresholding
    has no such limit: see `aj.DDIM`'s docstring.)"""
    from adjoint_jax.bench import GaussianProblem

    one = GaussianProblem.make(4)  # per-pixel μ in [−1, 1], s in [0.2, 2]
    pb = GaussianProblem(
        one.schedule, jnp.stack([one.mu, -one.mu]), jnp.stack([one.s, one.s[::-1]])
    )
    x_T = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4)))

    def run(n, sampler=aj.DDIM(clip_sample=1.0)):
        ts = aj.time_grid(pb.schedule, n, t_end=1e-3)
        return np.asarray(
            aj.sample(
                pb.model, pb.params, x_T, schedule=pb.schedule, ts=ts, sampler=sampler
            )
        )

    ref = run(640)
    ns = [10, 20, 40]
    outs = [run(n) for n in ns]
    # The clipping is active: the unclipped sampler ends elsewhere.
    assert np.max(np.abs(run(10, aj.DDIM()) - outs[0])) > 1e-2
    errs = [np.linalg.norm(o - ref) for o in outs]
    assert abs(slope(ns, errs) - 1.0) < 0.25, (slope(ns, errs), errs)


# ---- bfloat16 model on the CogVideoX grid ----------------------------------------
def test_cogvideox_grid_with_bfloat16_model():
    n = 50
    sched = COGVIDEOX64(
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
    )
    sched.set_timesteps(n)
    bf16 = jnp.bfloat16
    ab16 = jnp.asarray(sched.alphas_cumprod.numpy()).astype(bf16)

    def net16(params, x, t, cond):  # computes in bfloat16, ᾱ rounded to bfloat16
        assert jnp.issubdtype(t.dtype, jnp.integer)
        out = gaussian_output(
            "v_prediction", ab16[t], x.astype(bf16), params.astype(bf16)
        )
        assert out.dtype == bf16
        return out

    ref = run_ddim(sched, torch_model(sched, "v_prediction"), X_T).numpy()
    setup = aj.from_diffusers(config_of(sched), n, model=net16)
    assert setup.ts.dtype == jnp.float64
    out = np.asarray(
        aj.sample(
            setup.model,
            jnp.asarray(MU, jnp.float32),
            jnp.asarray(X_T, jnp.float32),
            schedule=setup.schedule,
            ts=setup.ts,
            sampler=setup.sampler,
        )
    )
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, rtol=0, atol=5e-2)
    # The network receives diffusers' own integer timesteps, distinct, from the
    # float64 grid and from the grid rounded to float32.
    stamp = setup.model.model.timestep
    for ts in (setup.ts[:-1], setup.ts[:-1].astype(jnp.float32)):
        steps = np.asarray(jax.vmap(lambda t: stamp(setup.schedule, t))(ts))
        np.testing.assert_array_equal(steps, sched.timesteps.numpy())


# ---- refusals --------------------------------------------------------------------
@pytest.mark.parametrize("value", ["learned", "learned_range", "fixed_large_log"])
def test_ddpm_variance_type_refused(value):
    with pytest.raises(ValueError, match="variance_type"):
        aj.from_diffusers({"_class_name": "DDPMScheduler", "variance_type": value}, 10)


def test_fixed_large_log_is_nan_in_diffusers():
    """Why 'fixed_large_log' is refused rather than reproduced."""
    sched = DDPM64(variance_type="fixed_large_log", clip_sample=False)
    sched.set_timesteps(5)
    out = run_ddpm(sched, torch_model(sched, "epsilon"), X_T, NOISE[:5]).numpy()
    assert np.all(np.isnan(out))


@pytest.mark.parametrize(
    "config,kw,match",
    [
        ({"_class_name": "DDIMScheduler"}, dict(timesteps=[999, 500, 0]), "timesteps"),
        (
            {"_class_name": "CogVideoXDDIMScheduler"},
            dict(timesteps=[999, 0]),
            "timesteps",
        ),
        ({"_class_name": "DDIMScheduler"}, dict(sigmas=[1.0, 0.5]), "sigmas"),
        (
            {"_class_name": "DDPMScheduler"},
            dict(num_steps=3, timesteps=[999, 0]),
            "timesteps",
        ),
        ({"_class_name": "DDPMScheduler"}, dict(timesteps=[500, 700, 0]), "timesteps"),
        ({"_class_name": "DDPMScheduler"}, dict(timesteps=[1000, 10]), "timesteps"),
        ({"_class_name": "DDPMScheduler"}, dict(timesteps=[900.5, 10]), "timesteps"),
        (
            {"_class_name": "DDIMScheduler", "clip_sample_range": 0.0},
            {},
            "clip_sample_range",
        ),
        (
            {
                "_class_name": "DDPMScheduler",
                "thresholding": True,
                "dynamic_thresholding_ratio": 1.5,
            },
            {},
            "dynamic_thresholding_ratio",
        ),
        (
            {
                "_class_name": "DDIMScheduler",
                "thresholding": True,
                "sample_max_value": 0.0,
            },
            {},
            "sample_max_value",
        ),
        # diffusers' DDIM supports 'leading' and 'trailing' only.
        (
            {"_class_name": "CogVideoXDDIMScheduler", "timestep_spacing": "linspace"},
            dict(num_steps=7),
            "timestep_spacing",
        ),
        # The last step ᾱ_0 → ᾱ_0 only clips x̂_0: a step of zero length.
        (
            {"_class_name": "DDIMScheduler", "set_alpha_to_one": False},
            dict(num_steps=10),
            "set_alpha_to_one",
        ),
        (
            {
                "_class_name": "DDIMScheduler",
                "set_alpha_to_one": False,
                "thresholding": True,
            },
            dict(num_steps=10),
            "thresholding",
        ),
    ],
)
def test_refused_arguments_name_the_key(config, kw, match):
    kw = (
        {"num_steps": None} | kw
        if "num_steps" in kw or "timesteps" in kw
        else {"num_steps": 10} | kw
    )
    with pytest.raises(ValueError, match=match):
        aj.from_diffusers(config, **kw)


def test_zero_length_last_step_measured():
    """The refused `set_alpha_to_one=False` + clipping case differs from dropping
    that step by ~3e-3 here (the figure quoted in its error)."""
    sched = DDIM64(set_alpha_to_one=False)
    sched.set_timesteps(7)
    model = torch_model(sched, "epsilon")
    ref = run_ddim(sched, model, X_T).numpy()
    cut = torch.as_tensor(X_T)  # the same loop without its last step
    for t in sched.timesteps[:-1]:
        cut = sched.step(model(cut, int(t)), t, cut).prev_sample
    assert 1e-3 < np.max(np.abs(cut.numpy() - ref)) < 1e-2


@pytest.mark.parametrize(
    "adjoint",
    [
        aj.AdjointDEIS(),
        aj.RecordedAdjoint(),
        aj.InterpolatedAdjoint(every=2),
        aj.AdjointDPM(),
        aj.ReversibleAdjoint(),
    ],
    ids=repr,
)
def test_continuous_adjoints_refuse_clipping(adjoint):
    for sampler, key in (
        (aj.DDIM(clip_sample=1.0), "clip_sample"),
        (aj.DDIM(0.5, thresholding=(0.995, 1.0)), "thresholding"),
        (
            aj.DDIM(1.0, clip_sample=1.0, clipped_eps=True, variance="fixed_large"),
            "clip_sample",
        ),
        (aj.DDIM(targets=(0.5, 0.0)), "targets"),
    ):
        with pytest.raises(ValueError, match=key):
            adjoint.check_sampler(sampler)
    # aj.sample refuses before running anything.
    sched = DDIM64()
    sched.set_timesteps(5)
    setup = aj.from_diffusers(config_of(sched), 5, model=jax_model(sched, "epsilon"))
    with pytest.raises(ValueError, match="clip_sample"):
        aj.sample(
            setup.model,
            jnp.asarray(MU),
            jnp.asarray(X_T),
            schedule=setup.schedule,
            ts=setup.ts,
            sampler=setup.sampler,
            adjoint=adjoint,
        )
    if isinstance(adjoint, (aj.AdjointDEIS, aj.RecordedAdjoint)):
        # DDPM's large variance without clipping is a smooth SDE sampler: accepted.
        adjoint.check_sampler(
            aj.DDIM(eta=1.0, variance="fixed_large", final_noise=True)
        )


def test_mccallum_foster_refuses_clipping():
    pb_sched = aj.VPLinear()
    ts = aj.time_grid(pb_sched, 4, t_end=1e-3)
    with pytest.raises(ValueError, match="clip_sample"):
        aj.sample(
            lambda p, x, t, c: x,
            None,
            jnp.ones((2, 3)),
            schedule=pb_sched,
            ts=ts,
            sampler=aj.McCallumFoster(aj.DDIM(clip_sample=1.0)),
        )


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(clip_sample=0.0), "clip_sample"),
        (dict(clip_sample=True), "clip_sample"),
        (dict(thresholding=0.995), "thresholding"),
        (dict(thresholding=(1.5, 1.0)), "thresholding"),
        (dict(clip_sample=1.0, thresholding=(0.9, 1.0)), "thresholding"),
        (dict(variance="learned"), "variance"),
        (dict(eta=0.5, variance="fixed_large"), "eta"),
        (dict(final_noise=True), "final_noise"),
    ],
)
def test_ddim_arguments_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        aj.DDIM(**kw)


def test_thresholding_needs_a_batch_axis():
    x0 = jnp.ones((4,))
    with pytest.raises(ValueError, match="thresholding"):
        aj.sample(
            lambda p, x, t, c: x,
            None,
            x0,
            schedule=aj.VPLinear(),
            ts=aj.time_grid(aj.VPLinear(), 2, t_end=1e-3),
            sampler=aj.DDIM(thresholding=(0.9, 1.0)),
        )
