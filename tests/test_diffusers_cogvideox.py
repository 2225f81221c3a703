"""`CogVideoXDPMScheduler` (CogVideoX-5b's model-card scheduler) against the real
diffusers in float64 (tests/diffusers64_cogvideox.py), driven as
`CogVideoXPipeline` drives it (the old x̂_0 passed back, `timesteps[i − 1]`),
with the same noises: `aj.CogVideoXDPM` at two step counts per option; its DTO
gradient against central differences of diffusers; its order on the closed-form
Gaussian; a bfloat16 network; the refusals, each naming its key.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import adjoint_jax as aj
from adjoint_jax.bench import GaussianProblem

from .diffusers64_cogvideox import COGVIDEOX_DPM64, draws_for, run_cogvideox_dpm
from .diffusers64_ddim import (
    MU,
    NOISE,
    SHAPE,
    TOL,
    X_T,
    config_of,
    gaussian_output,
    jax_model,
    run_ours,
    torch_model,
)
from .helpers import slope


pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning"
)

_5B = dict(  # CogVideoX-5b's config (snr_shift_scale 1) with the model card's switch
    prediction_type="v_prediction", timestep_spacing="trailing",
    rescale_betas_zero_snr=True, clip_sample=False, snr_shift_scale=1.0,
)


def _diffusers(sched, n, kind, noise, used, mu=MU, x_T=X_T):
    """diffusers' latents and draw count, its draw used[i] being noise[i]."""
    draws = draws_for(np.asarray(noise), used, 2 * n)
    x, drawn = run_cogvideox_dpm(sched, torch_model(sched, kind, mu), x_T, draws)
    return x.numpy(), drawn


# ---- parity ----------------------------------------------------------------------
# (id, config, step counts, expected per count: (targets?, first_order_last, aj steps))
CASES = [
    # The shipped 5B set-up: ᾱ = 0 at the first timestep; 7 ∤ 1000 puts the steps
    # one timestep off the next (targets) and the last step on timestep 0 (second
    # order, with noise).
    ("cogvideox-5b", _5B, (7, 50), ((True, False, 7), (False, True, 50))),
    ("cogvideox-2b-shift3", _5B | dict(snr_shift_scale=3.0), (10, 25),
     ((False, True, 10), (False, True, 25))),
    # Its defaults: ε, 'leading', clip_sample=True (never applied by its step).
    ("defaults-eps-leading", {}, (7, 20), ((False, True, 7), (False, True, 20))),
    # The last step goes to ᾱ_0 (first order, with noise).
    ("sample-offset-alpha0", dict(prediction_type="sample", set_alpha_to_one=False,
                                  steps_offset=1), (8, 20),
     ((False, True, 8), (False, True, 20))),
    # Timestep 0 last: its ᾱ_0 → ᾱ_0 step is the identity, dropped. (Zero terminal
    # SNR with ε: 'leading' never reaches ᾱ = 0.)
    ("eps-zero-snr-alpha0-identity-dropped",
     dict(set_alpha_to_one=False, rescale_betas_zero_snr=True), (7, 12),
     ((False, False, 6), (False, False, 11))),
    ("linspace-cosine-shift2", dict(prediction_type="v_prediction",
                                    timestep_spacing="linspace",
                                    beta_schedule="squaredcos_cap_v2",
                                    snr_shift_scale=2.0), (6, 30),
     ((True, True, 6), (True, True, 30))),
    # 9 steps end on timestep 0 (second order); 16 below it, at ᾱ_0 (first order).
    ("linear-T500-trailing-alpha0", dict(prediction_type="v_prediction",
                                         beta_schedule="linear",
                                         num_train_timesteps=500,
                                         timestep_spacing="trailing",
                                         set_alpha_to_one=False), (9, 16),
     ((True, False, 9), (True, True, 16))),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_parity_with_diffusers(case):
    _, kw, ns, expected = case
    for n, (has_targets, first_last, steps) in zip(ns, expected):
        sched = COGVIDEOX_DPM64(**kw)
        sched.set_timesteps(n)
        kind = sched.config.prediction_type
        setup = aj.from_diffusers(
            config_of(sched), n, model=jax_model(sched, kind), eta=0.7
        )
        smp = setup.sampler
        assert isinstance(smp, aj.CogVideoXDPM)
        got = (smp.targets is not None, smp.first_order_last)
        assert got == (has_targets, first_last)
        assert len(setup.ts) - 1 == steps
        assert (setup.init_scale, setup.final_scale) == (1.0, 1.0)
        used = smp.used_draws(steps)
        ref, drawn = _diffusers(sched, n, kind, NOISE[:steps], used)
        # diffusers draws 2 per second-order step (1 on the others and on a dropped
        # identity step); every draw it uses is one of ours.
        assert drawn == 2 * n - 1 - int(first_last) - (n - steps), drawn
        assert used[-1] < drawn
        out = run_ours(setup, jnp.asarray(NOISE[:steps]))
        np.testing.assert_allclose(out, ref, rtol=0, atol=TOL)


def test_without_targets_it_is_sde_dpm_solver_pp():
    """On a grid, CogVideoXDPM is SDE-DPM-Solver++ 2M (midpoint) whose first and
    last steps are first order."""
    pb = GaussianProblem.make(4)
    ts = aj.time_grid(pb.schedule, 9, t_end=1e-3)
    noise = jnp.asarray(np.random.default_rng(2).standard_normal((9, 4)))
    x_T = jnp.array([0.3, -1.2, 2.0, 0.7])
    run = lambda smp: np.asarray(aj.sample(
        pb.model, pb.params, x_T, schedule=pb.schedule, ts=ts, sampler=smp, noise=noise
    ))
    ref = run(aj.SDEDPMSolverPP(orders=(1,) + (2,) * 7 + (1,)))
    np.testing.assert_allclose(run(aj.CogVideoXDPM()), ref, rtol=0, atol=1e-13)


# ---- gradient --------------------------------------------------------------------
def test_dto_gradient_matches_diffusers():
    """∂/∂μ and ∂/∂x_T of Σ w · x_0 on the 5B set-up at 7 steps (α = 0 start,
    targets, second-order last step, noise): `aj.DTO()` equals torch's autograd
    through diffusers to round-off and central differences of diffusers to 1e-6."""
    n = 7
    sched = COGVIDEOX_DPM64(**_5B)
    sched.set_timesteps(n)
    model = jax_model(sched, "v_prediction")
    setup = aj.from_diffusers(config_of(sched), n, model=model)
    used = setup.sampler.used_draws(n)
    rng = np.random.default_rng(7)
    w, v = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    draws = draws_for(NOISE, used, 2 * n)

    def theirs(mu, x_T):
        model = torch_model(sched, "v_prediction", mu)
        x0, _ = run_cogvideox_dpm(sched, model, x_T, draws)
        return (torch.as_tensor(w) * x0).sum()

    mu_t = torch.tensor(MU, dtype=torch.float64, requires_grad=True)
    x_t = torch.tensor(X_T, requires_grad=True)
    theirs(mu_t, x_t).backward()

    def loss(mu, x_T):
        x0 = aj.sample(setup.model, mu, x_T, schedule=setup.schedule, ts=setup.ts,
                       sampler=setup.sampler, noise=jnp.asarray(NOISE[:n]),
                       adjoint=aj.DTO())
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
        dv = h * torch.tensor(v)
        fd_v = (theirs(MU, x_T + dv) - theirs(MU, x_T - dv)) / (2 * h)
    np.testing.assert_allclose(float(g_mu), float(fd_mu), rtol=1e-6)
    np.testing.assert_allclose(float(np.vdot(g_x, v)), float(fd_v), rtol=1e-6)


# ---- order -----------------------------------------------------------------------
PB = GaussianProblem.make(4)
T0, T_END = PB.schedule.t_max, 1e-3


def _weak_error(sampler, n):
    """The sampler is affine in (x_T, ξ) on Gaussian data: its output's mean is the
    run from the mean x_T with ξ = 0, its variance (∂out/∂x_T)² v_T + Σ_i
    (∂out/∂ξ_i)². The error: that variance's distance to the data marginal's
    α² s² + σ² at the end (a weak error), and the mean's to α μ."""
    sch = PB.schedule
    ts = aj.time_grid(sch, n, t_end=T_END)
    v = lambda t: sch.alpha(t) ** 2 * PB.s**2 + sch.sigma(t) ** 2

    def out(x_T, noise):
        return aj.sample(PB.model, PB.params, x_T, schedule=sch, ts=ts,
                         sampler=sampler, noise=noise)

    mean_T = sch.alpha(T0) * PB.mu
    zeros = jnp.zeros((n, 4))
    g_x, g_n = jax.grad(lambda x, e: jnp.sum(out(x, e)), argnums=(0, 1))(mean_T, zeros)
    var = g_x**2 * v(T0) + jnp.sum(g_n**2, axis=0)
    mean_err = jnp.max(jnp.abs(out(mean_T, zeros) - sch.alpha(T_END) * PB.mu))
    return float(jnp.max(jnp.abs(var - v(T_END)))), float(mean_err)


def test_order_on_gaussian():
    ns = [20, 40, 80]
    errs, mean_errs = zip(*(_weak_error(aj.CogVideoXDPM(), n) for n in ns))
    assert max(mean_errs) < 1e-12, mean_errs  # the mean is exact (linear model)
    assert abs(slope(ns, errs) - 2.0) < 0.25, (slope(ns, errs), errs)


# ---- bfloat16 network --------------------------------------------------------------
def test_bfloat16_model_on_the_5b_grid():
    """A network computing in bfloat16 (ᾱ rounded to bfloat16 inside it) on the
    float64 grid: finite, within bfloat16 accuracy of diffusers' float64 result, and
    called with diffusers' own distinct integer timesteps."""
    n = 50
    sched = COGVIDEOX_DPM64(**_5B)
    sched.set_timesteps(n)
    bf16 = jnp.bfloat16
    ab16 = jnp.asarray(sched.alphas_cumprod.numpy()).astype(bf16)

    def net16(params, x, t, cond):
        assert jnp.issubdtype(t.dtype, jnp.integer)
        x, mu = x.astype(bf16), params.astype(bf16)
        out = gaussian_output("v_prediction", ab16[t], x, mu)
        assert out.dtype == bf16
        return out

    setup = aj.from_diffusers(config_of(sched), n, model=net16)
    assert setup.ts.dtype == jnp.float64
    used = setup.sampler.used_draws(n)
    ref, _ = _diffusers(sched, n, "v_prediction", NOISE[:n], used)
    out = np.asarray(aj.sample(
        setup.model, jnp.asarray(MU, jnp.float32), jnp.asarray(X_T, jnp.float32),
        schedule=setup.schedule, ts=setup.ts, sampler=setup.sampler,
        noise=jnp.asarray(NOISE[:n], jnp.float32),
    ))
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, rtol=0, atol=5e-2)
    stamp = setup.model.model.timestep
    for ts in (setup.ts[:-1], setup.ts[:-1].astype(jnp.float32)):
        steps = np.asarray(jax.vmap(lambda t: stamp(setup.schedule, t))(ts))
        np.testing.assert_array_equal(steps, sched.timesteps.numpy())


# ---- refusals ----------------------------------------------------------------------
_C = {"_class_name": "CogVideoXDPMScheduler"}


@pytest.mark.parametrize(
    "config,kw,match",
    [
        (_C | {"snr_shift_scale": 0.0}, {}, "snr_shift_scale"),
        (_C | {"snr_shift_scale": -1.0}, {}, "snr_shift_scale"),
        (_C | {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, {},
         "rescale_betas_zero_snr"),
        (_C | {"rescale_betas_zero_snr": True, "timestep_spacing": "linspace"}, {},
         "rescale_betas_zero_snr"),
        (_C | {"prediction_type": "flow"}, {}, "prediction_type"),
        (_C | {"prediction_type": "x0"}, {}, "prediction_type"),
        (_C | {"timestep_spacing": "karras"}, {}, "timestep_spacing"),
        (_C, dict(timesteps=[999, 0]), "timesteps"),
        (_C, dict(sigmas=[1.0, 0.5]), "sigmas"),
        (_C, dict(mu=0.5), "mu"),
        (_C | {"set_alpha_to_one": False}, dict(num_steps=1), "set_alpha_to_one"),
    ],
)
def test_refusals_name_the_key(config, kw, match):
    kw = {"num_steps": None if "timesteps" in kw or "sigmas" in kw else 10} | kw
    with pytest.raises(ValueError, match=match):
        aj.from_diffusers(config, **kw)


def test_refused_configs_measured_in_diffusers():
    """Why they are refused: diffusers' latents are NaN (ε at ᾱ = 0; s ≤ 0), and
    one step from timestep 0 to ᾱ_0 returns the initial latents."""
    cases = [
        (dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"), 3, "nan"),
        (dict(snr_shift_scale=0.0), 3, "nan"),
        (dict(set_alpha_to_one=False), 1, "identity"),
    ]
    for kw, n, what in cases:
        sched = COGVIDEOX_DPM64(**kw)
        sched.set_timesteps(n)
        out, _ = _diffusers(sched, n, "epsilon", NOISE[:n], np.arange(n))
        if what == "nan":
            assert np.all(np.isnan(out)), kw
        else:
            np.testing.assert_array_equal(out, X_T)


def test_continuous_adjoints_and_arguments():
    with pytest.raises(ValueError, match="targets"):
        aj.AdjointDEIS().check_sampler(aj.CogVideoXDPM(targets=(0.5, 0.0)))
    aj.AdjointDEIS().check_sampler(aj.CogVideoXDPM())
    aj.RecordedAdjoint().check_sampler(aj.CogVideoXDPM())
    with pytest.raises(ValueError, match="targets"):
        aj.CogVideoXDPM(targets=[0.5, 0.0])
    with pytest.raises(TypeError, match="first_order_last"):
        aj.CogVideoXDPM(first_order_last=1)
    with pytest.raises(ValueError, match="num_steps"):
        aj.CogVideoXDPM().used_draws(0)
    np.testing.assert_array_equal(aj.CogVideoXDPM().used_draws(50)[-3:], [94, 96, 97])
    np.testing.assert_array_equal(
        aj.CogVideoXDPM(first_order_last=False).used_draws(3), [0, 2, 4]
    )
