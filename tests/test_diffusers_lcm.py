"""`LCMScheduler` and `TCDScheduler` against the real diffusers (float64,
`tests/diffusers64_flow_lcm`) with the same noises, every option that changes the
numbers at two step counts; `aj.LCM()` and `aj.TCD()`'s DTO gradients against
central differences of diffusers itself, their orders on the closed-form Gaussian,
a bfloat16 network on their grid, and the refusals.

Data N(μ, s²) elementwise: the network's ε, x_0 and v are closed form in (x, ᾱ_n)
on both sides; adjoint_jax is driven only through `aj.from_diffusers`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import adjoint_jax as aj
from adjoint_jax.bench import GaussianProblem

from .diffusers64_flow_lcm import LCM64, TCD64, run_loop
from .helpers import slope


pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

MU, S = 0.7, 0.5
TOL = 1e-10
SHAPE = (2, 2, 3)  # (batch, channels, …): thresholding reads the batch axis
X_T = 1.5 * np.random.default_rng(0).standard_normal(SHAPE)
NOISE = np.random.default_rng(1).standard_normal((64,) + SHAPE)
W = np.random.default_rng(2).standard_normal(SHAPE)
CLASSES = {"LCMScheduler": LCM64, "TCDScheduler": TCD64}


def _gaussian(ab, x, kind, mu=MU):
    """The network's output at ᾱ for N(mu, S²) data (NumPy, torch or jax)."""
    a, sig = ab**0.5, (1 - ab) ** 0.5
    d = a * a * S * S + sig * sig
    eps = sig * (x - a * mu) / d
    x0 = mu + a * S * S * (x - a * mu) / d
    if kind == "epsilon":
        return eps
    if kind == "sample":
        return x0
    return a * eps - sig * x0  # v_prediction


def _torch_model(sched, kind, mu=MU):
    ab = sched.alphas_cumprod.to(torch.float64)
    return lambda x, t: _gaussian(ab[int(t)], x, kind, mu)


def _jax_model(sched, kind, bf16=False, seen=None):
    """model(params, x, timestep, cond) with params = μ; the timestep must be an
    integer array (LCM/TCD call the network with integer timesteps)."""
    ab = jnp.asarray(sched.alphas_cumprod.numpy())

    def f(params, x, n, cond):
        del cond
        assert jnp.issubdtype(n.dtype, jnp.integer)
        if seen is not None:
            jax.debug.callback(lambda v: seen.append(int(v)), n)
        mu = MU if params is None else params
        if bf16:
            bf = jnp.bfloat16
            mu = jnp.asarray(mu).astype(bf)
            return _gaussian(ab[n].astype(bf), x.astype(bf), kind, mu)
        return _gaussian(ab[n], x, kind, mu)

    return f


def _config(sched):
    return dict(sched.config) | {"_class_name": type(sched).__mro__[1].__name__}


# id → (scheduler class, config, TCD's gamma (diffusers' eta) or None, custom
# timesteps for the two "step counts" or None)
L, T = "LCMScheduler", "TCDScheduler"
V, X0 = dict(prediction_type="v_prediction"), dict(prediction_type="sample")
ZERO_SNR = dict(rescale_betas_zero_snr=True)
# Keys diffusers' LCM/TCD read nowhere on this path (no effect on the numbers).
NOOP_LCM = dict(set_alpha_to_one=False, timestep_spacing="trailing", steps_offset=1)
NOOP_TCD = dict(clip_sample=True, thresholding=True, timestep_scaling=3.0)
LINEAR = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
LCM_CUSTOM = ([999, 759, 499, 259], [999, 899, 799, 699, 599, 499, 399, 299, 199, 99,
                                     50, 19, 0])
# The prev timesteps 700, 360, 90 are where torch's float32 (1 − 0.3)·p floors
# differently from float64; the last timestep 0 makes the last step the identity.
TCD_CUSTOM = ([999, 700, 360, 90], [999, 800, 720, 700, 500, 360, 200, 90, 0])
CASES = {
    "lcm-default": (L, {}, None, None),
    "lcm-v-scaling5-orig25": (
        L, V | dict(timestep_scaling=5.0, original_inference_steps=25), None, None),
    "lcm-sample-clip": (
        L, X0 | dict(clip_sample=True, clip_sample_range=0.8), None, None),
    "lcm-thresholding": (L, dict(thresholding=True, sample_max_value=1.3,
                                 dynamic_thresholding_ratio=0.9), None, None),
    "lcm-zero-snr-v": (L, ZERO_SNR | V, None, None),
    "lcm-linear-noop-keys": (L, LINEAR | NOOP_LCM, None, None),
    "lcm-custom-timesteps": (L, {}, None, LCM_CUSTOM),
    "tcd-gamma0.3": (T, {}, 0.3, None),
    "tcd-gamma0": (T, {}, 0.0, None),
    "tcd-gamma1": (T, {}, 1.0, None),
    "tcd-v-gamma0.7": (T, V, 0.7, None),
    "tcd-sample-gamma0.5-orig40-noop-keys": (
        T, X0 | NOOP_TCD | dict(original_inference_steps=40), 0.5, None),
    "tcd-zero-snr-v": (T, ZERO_SNR | V, 0.3, None),
    "tcd-custom-timesteps": (T, {}, 0.3, TCD_CUSTOM),
}
MAX_DIFF: dict[tuple[str, int], float] = {}


def _diffusers(case, k):
    """The scheduler after set_timesteps for step-count variant k ∈ {0, 1}."""
    name, config, gamma, custom = CASES[case]
    sched = CLASSES[name](**config)
    if custom is not None:
        sched.set_timesteps(timesteps=custom[k])
    else:
        sched.set_timesteps((4, 20)[k])
    return sched


def _run_diffusers(sched, gamma, x_T=X_T, mu=MU):
    model = _torch_model(sched, sched.config.prediction_type, mu)
    step_kw = {} if gamma is None else dict(eta=gamma)
    output = "denoised" if isinstance(sched, LCM64) else "prev_sample"
    return run_loop(sched, model, x_T, noise=NOISE, output=output, **step_kw)


def _setup(sched, gamma, custom, model):
    n = None if custom else len(sched.timesteps)
    timesteps = sched.timesteps.numpy() if custom else None
    eta = 0.0 if gamma is None else gamma
    return aj.from_diffusers(_config(sched), n, model=model, timesteps=timesteps,
                             eta=eta)


def _sample(setup, mu=MU, x_T=X_T, dtype=jnp.float64):
    """The pipeline's final latents by `aj.sample`, with the same noises."""
    n = len(setup.ts) - 1
    noise = jnp.asarray(NOISE[:n], dtype) if setup.sampler.is_sde else None
    x_T = setup.initial(jnp.asarray(x_T, dtype))
    out = aj.sample(setup.model, mu, x_T, schedule=setup.schedule, ts=setup.ts,
                    sampler=setup.sampler, noise=noise)
    return setup.final(out)


@pytest.mark.filterwarnings("ignore:.*timestep schedule.*")
@pytest.mark.parametrize("k", [0, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_parity(case, k):
    name, config, gamma, custom = CASES[case]
    sched = _diffusers(case, k)
    ref, draws = _run_diffusers(sched, gamma)
    model = _jax_model(sched, sched.config.prediction_type)
    setup = _setup(sched, gamma, custom, model)
    ours = np.asarray(_sample(setup))
    n = len(sched.timesteps)
    steps = sched.timesteps.numpy()
    if name == "LCMScheduler":
        # The timesteps, then t = 0: the last state is the returned `denoised`.
        want = np.append((steps + 1) / 1000, 0)
        assert setup.sampler == aj.LCM() and draws == n - 1
    else:  # …then timestep 0 (t = 1/T), unless it is the last already
        want = (np.append(steps, 0) + 1) / 1000 if steps[-1] else (steps + 1) / 1000
        assert setup.sampler.gamma == gamma and draws == (n - 1 if gamma > 0 else 0)
    np.testing.assert_array_equal(np.asarray(setup.ts), want)
    diff = float(np.max(np.abs(ours - ref)))
    MAX_DIFF[case, n] = diff
    assert diff < TOL, diff


def test_clip_and_threshold_change_the_numbers():
    """The clipping and thresholding cases clip something (else their parity would
    prove nothing)."""
    for case in ("lcm-sample-clip", "lcm-thresholding"):
        config = CASES[case][1]
        plain = LCM64(**{k: v for k, v in config.items()
                         if k not in ("clip_sample", "thresholding")})
        plain.set_timesteps(4)
        a, _ = _run_diffusers(_diffusers(case, 0), None)
        b, _ = _run_diffusers(plain, None)
        assert np.max(np.abs(a - b)) > 1e-2, case


def test_tcd_intermediate_timesteps_float32_like_torch():
    """diffusers computes floor((1 − γ)·p) in float32 (a long tensor times a Python
    float): for γ = 0.3 that differs from float64 at 16 of the 1000 p; the TCD
    sampler's intermediate times follow torch at every p."""
    p = np.arange(999, -1, -1)
    for gamma in (0.3, 0.35, 0.9):
        setup = aj.from_diffusers({"_class_name": T}, timesteps=p, eta=gamma)
        ours = np.round(np.asarray(setup.sampler.mids) * 1000 - 1).astype(int)
        nxt = torch.as_tensor(np.append(p[1:-1], [0]))  # the step 0 → 0 is dropped
        want = torch.floor((1 - gamma) * nxt).to(torch.long).numpy()
        np.testing.assert_array_equal(ours, want)
    assert np.any(np.floor(0.7 * p) != torch.floor(0.7 * torch.as_tensor(p)).numpy())


def test_lcm_img2img_strength_via_timesteps():
    """`strength` is no argument of from_diffusers: the img2img scheduler's timesteps,
    passed as `timesteps=`, and its noised image latents as x_T reproduce it."""
    sched = LCM64()
    sched.set_timesteps(4, strength=0.6)
    x_img = sched.add_noise(torch.as_tensor(X_T), torch.as_tensor(NOISE[-1]),
                            sched.timesteps[:1]).numpy()
    ref, _ = _run_diffusers(sched, None, x_T=x_img)
    setup = _setup(sched, None, True, _jax_model(sched, "epsilon"))
    np.testing.assert_allclose(_sample(setup, x_T=x_img), ref, rtol=0, atol=TOL)


# ---- gradients: DTO against central differences of diffusers itself ----------------
def _loss(x0, xp=np):
    return xp.sum(W * xp.sin(x0)) + 0.5 * xp.sum(x0**2)


@pytest.mark.parametrize("case", ["lcm-v-scaling5-orig25", "tcd-gamma0.3"])
def test_dto_gradient_matches_diffusers_finite_differences(case):
    """∂L/∂μ (a network parameter) and ∂L/∂z along a random direction, L nonlinear:
    `jax.grad` through `aj.sample` (DTO) against central differences of diffusers'
    own loop in float64 (same noises)."""
    _, config, gamma, _ = CASES[case]
    sched = _diffusers(case, 0)
    setup = _setup(sched, gamma, None, _jax_model(sched, sched.config.prediction_type))
    loss = lambda mu, x: _loss(_sample(setup, mu, x), jnp)
    g_mu, g_x = jax.grad(loss, argnums=(0, 1))(jnp.asarray(MU), jnp.asarray(X_T))

    def diffusers_loss(mu, x_T):
        return float(_loss(_run_diffusers(_diffusers(case, 0), gamma, x_T, mu)[0]))

    h, d = 1e-6, np.random.default_rng(3).standard_normal(SHAPE)
    fd_mu = (diffusers_loss(MU + h, X_T) - diffusers_loss(MU - h, X_T)) / (2 * h)
    fd_x = (diffusers_loss(MU, X_T + h * d) - diffusers_loss(MU, X_T - h * d)) / (2 * h)
    ad_x = float(np.vdot(np.asarray(g_x), d))
    for ad, fd in ((float(g_mu), fd_mu), (ad_x, fd_x)):
        assert abs(ad - fd) <= 1e-6 * abs(fd) + 1e-9, (ad, fd)


# ---- orders on the closed-form Gaussian --------------------------------------------
GAUSS = GaussianProblem.make(4)


def _consistency(params, x, t, cond):
    """The exact consistency function of N(μ, s²) data: the probability-flow ODE's
    flow map from (x, t) to t = 0, x_0 = μ + (s/√v_t)(x − α_t μ)."""
    del cond
    a = GAUSS.schedule.alpha(t)
    v = a * a * params["s"] ** 2 + GAUSS.schedule.sigma(t) ** 2
    return params["mu"] + jnp.sqrt(params["s"] ** 2 / v) * (x - a * params["mu"])


MODELS = {
    "posterior-mean": GAUSS.model,
    "consistency": aj.as_eps(_consistency, GAUSS.schedule, "x0"),
}


def _weak_error(sampler, model, n, to_zero):
    """|mean − μ| and |variance − s²| (2-norm over both) of the sampled x_0 for x_T
    from its marginal N(α_T μ, v_T), exact: every step is affine in x and the noise,
    so x_0 = A x_T + Σ_i C_i ξ_i + b with diagonal A, C_i (read by jacrev), mean
    b + A α_T μ and variance A² v_T + Σ C_i²."""
    sch = GAUSS.schedule
    ts = np.asarray(aj.time_grid(sch, n, t_end=1e-3))
    ts = jnp.asarray(np.append(ts, 0.0) if to_zero else ts)
    a_T, s_T = sch.alpha(sch.t_max), sch.sigma(sch.t_max)
    v_T = a_T**2 * GAUSS.s**2 + s_T**2

    def out(x, xi):
        return aj.sample(MODELS[model], GAUSS.params, x, schedule=sch, ts=ts,
                         sampler=sampler, noise=xi if sampler.is_sde else None)

    x_mean, xi = a_T * GAUSS.mu, jnp.zeros((len(ts) - 1, 4))
    mean = out(x_mean, xi)
    jac_x, jac_xi = jax.jit(jax.jacrev(out, argnums=(0, 1)))(x_mean, xi)
    var = jnp.diag(jac_x) ** 2 * v_T + jnp.sum(jac_xi**2, axis=(1, 2))
    return float(jnp.sqrt(jnp.sum((mean - GAUSS.mu) ** 2)
                          + jnp.sum((var - GAUSS.s**2) ** 2)))


@pytest.mark.parametrize(
    "sampler,to_zero", [(aj.LCM(), True), (aj.TCD(0.3), False), (aj.TCD(0.0), False)],
    ids=repr,
)
def test_order_on_gaussian(sampler, to_zero):
    """The weak error with the posterior-mean network: DDIM's order 1 for TCD(γ = 0);
    no convergence (order 0, a biased limit) for LCM and TCD(γ > 0), whose jumps do
    not shrink with the step."""
    ns = [160, 640, 2560]
    errs = [_weak_error(sampler, "posterior-mean", n, to_zero) for n in ns]
    assert abs(slope(ns, errs) - sampler.order) < 0.25, (slope(ns, errs), errs)
    if sampler.order == 0:
        assert min(errs) > 0.1, errs  # a plateau, not a slow convergence to 0


def test_lcm_is_exact_in_law_for_the_consistency_function():
    """With the exact consistency function as its data prediction, every LCM step
    leaves the marginal law exact: x_0 ~ N(μ, s²) at any N."""
    for n in (1, 3, 12):
        assert _weak_error(aj.LCM(), "consistency", n, True) < 1e-12


# ---- bfloat16 network on the integer-timestep grid ---------------------------------
@pytest.mark.parametrize("case", ["lcm-default", "tcd-gamma0.3"])
def test_bfloat16_network(case):
    """A network computing in bfloat16 under a float32 state gets exactly diffusers'
    integer timesteps (none collided), and x_0 is float64's to bfloat16 accuracy
    (ᾱ, c_skip, c_out and the step coefficients are float32 numbers of float64
    ones, never bfloat16)."""
    _, _, gamma, custom = CASES[case]
    sched = _diffusers(case, 1)
    seen = []
    model16 = _jax_model(sched, "epsilon", bf16=True, seen=seen)
    ref = _sample(_setup(sched, gamma, custom, _jax_model(sched, "epsilon")))
    out = np.asarray(_sample(_setup(sched, gamma, custom, model16), dtype=jnp.float32))
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    assert seen[-len(sched.timesteps):] == sched.timesteps.tolist()
    err = float(np.max(np.abs(out - np.asarray(ref))))
    assert err < 1e-2, err  # measured 4e-3 (LCM), 3e-3 (TCD)


# ---- refusals ----------------------------------------------------------------------
REFUSALS = [
    # (class, config, from_diffusers arguments, text the message must contain)
    (L, {}, dict(num_steps=4, sigmas=[1.0, 0.5]), "sigmas"),
    (L, {}, dict(num_steps=4, mu=0.5), "mu"),
    (L, {}, dict(num_steps=4, eta=0.3), "eta"),
    (L, {}, dict(num_steps=60), "original_inference_steps"),
    (L, {}, dict(num_steps=4, timesteps=[999, 500]), "timesteps"),
    (L, {}, dict(num_steps=None, timesteps=[500, 999]), "timesteps"),
    (L, {}, dict(num_steps=None, timesteps=[1000, 500]), "timesteps"),
    (L, {"prediction_type": "flow"}, dict(num_steps=4), "prediction_type"),
    (T, {}, dict(num_steps=4, eta=1.5), "eta"),
    (T, {}, dict(num_steps=4, sigmas=[1.0, 0.5]), "sigmas"),
]


@pytest.mark.parametrize("name,config,kw,text", REFUSALS)
def test_refusals_name_the_option(name, config, kw, text):
    config = {"_class_name": name} | config
    num_steps = kw.pop("num_steps")
    with pytest.raises(ValueError, match=text):
        aj.from_diffusers(config, num_steps, **kw)


def test_continuous_adjoints_refuse_lcm_and_tcd():
    adjoints = (aj.AdjointDEIS(), aj.RecordedAdjoint(), aj.InterpolatedAdjoint(),
                aj.AdjointDPM())
    for sampler in (aj.LCM(), aj.TCD(0.3)):
        for adjoint in adjoints:
            with pytest.raises(ValueError, match="continuous|SDE|stochastic"):
                adjoint.check_sampler(sampler)
    aj.AdjointDEIS().check_sampler(aj.TCD(0.0))  # DDIM: a discretised ODE
