"""`PNDMScheduler` = `aj.from_diffusers` + `aj.PNDM`: parity with the real diffusers
(float64, `tests/diffusers64_unipc_pndm`) for PLMS (`skip_prk_steps=True`, Stable
Diffusion 1.x) and F-PNDM (the Runge–Kutta warm-up, diffusers' default), with
`set_alpha_to_one`, `steps_offset`, `timestep_spacing` and `prediction_type`, at two
step counts each; the DTO gradient against central differences of diffusers itself;
the orders on the closed-form Gaussian; a bfloat16 network; the refusals.

The analytic network (data N(μ, s²) elementwise, ε and v in closed form) is called
with the scheduler's integer timestep n and reads ᾱ_n, on both sides.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adjoint_jax as aj
from adjoint_jax.bench import GaussianProblem

from .diffusers64_unipc_pndm import PNDM64, run_loop
from .helpers import rel_err, slope


pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning"
)

MU, S = 0.7, 0.5
TOL = 1e-10
X_T = np.random.default_rng(0).standard_normal((2, 3))
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _out(kind, a, sig, mu, x):
    d = a * a * S * S + sig * sig
    eps = sig * (x - a * mu) / d
    x0 = mu + a * S * S * (x - a * mu) / d
    return eps if kind == "epsilon" else a * eps - sig * x0


def _diffusers(sched, mu=MU, x_T=X_T):
    ab, kind = sched.alphas_cumprod, sched.config.prediction_type

    def model(x, t):
        return _out(kind, ab[int(t)] ** 0.5, (1 - ab[int(t)]) ** 0.5, mu, x)

    return run_loop(sched, model, x_T)


def _jax_model(sched, seen=None):
    ab = jnp.asarray(sched.alphas_cumprod.numpy())
    kind = sched.config.prediction_type

    def model(params, x, n, cond):
        assert jnp.issubdtype(n.dtype, jnp.integer)
        if seen is not None:
            jax.debug.callback(lambda v: seen.append(int(v)), n, ordered=True)
        mu = MU if params is None else params["mu"]
        a, sig = ab[n] ** 0.5, (1 - ab[n]) ** 0.5
        return _out(kind, *(jnp.asarray(v, x.dtype) for v in (a, sig, mu)), x)

    return model


def _config(sched):
    return dict(sched.config) | {"_class_name": "PNDMScheduler"}


def _ours(sched, n, model=None):
    setup = aj.from_diffusers(_config(sched), n, model=model or _jax_model(sched))
    out = aj.sample(setup.model, None, setup.initial(jnp.asarray(X_T)),
                    schedule=setup.schedule, ts=setup.ts, sampler=setup.sampler)
    return np.asarray(setup.final(out)), setup


# (config, the two step counts, the sampler from_diffusers picks)
CASES = {
    # Stable Diffusion 1.5's scheduler_config.json.
    "plms-sd15": (
        dict(SD, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
        (8, 25), aj.PNDM(),
    ),
    "plms-v-alpha_one-trailing": (
        dict(skip_prk_steps=True, prediction_type="v_prediction", set_alpha_to_one=True,
             timestep_spacing="trailing"),
        (10, 20), aj.PNDM(combine="v"),
    ),
    # diffusers' defaults: the RK warm-up; timestep 0 last (its identity step dropped).
    "fpndm-default": ({}, (6, 20), aj.PNDM(prk=True)),
    "fpndm-v-offset-alpha_one-cosine": (
        dict(prediction_type="v_prediction", steps_offset=1, set_alpha_to_one=True,
             beta_schedule="squaredcos_cap_v2"),
        (4, 16), aj.PNDM(prk=True, combine="v"),
    ),
}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_parity(case):
    kw, ns, sampler = CASES[case]
    for n in ns:
        sched = PNDM64(**kw)
        sched.set_timesteps(n)
        ref = _diffusers(sched)
        ours, setup = _ours(sched, n)
        assert setup.sampler == sampler
        assert np.all(np.isfinite(ref))
        np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


def test_parity_one_and_two_steps():
    """One step is one evaluation (DDIM's transfer, no Heun step); two are Heun's
    step and an identity step from ᾱ_0 to ᾱ_0 (dropped)."""
    for n, kw, sampler in ((1, dict(steps_offset=1), aj.DDIM()), (2, {}, aj.PNDM())):
        sched = PNDM64(skip_prk_steps=True, **kw)
        sched.set_timesteps(n)
        ours, setup = _ours(sched, n)
        assert setup.sampler == sampler and len(setup.ts) == 2
        np.testing.assert_allclose(ours, _diffusers(sched), rtol=0, atol=TOL)


def test_dto_gradient_against_diffusers_finite_differences():
    """∂L/∂z and ∂L/∂μ through aj.PNDM (DTO; step 0 evaluates twice) equal central
    differences of the diffusers loop itself (float64)."""
    n, kw = 10, CASES["plms-sd15"][0]
    sched = PNDM64(**kw)
    sched.set_timesteps(n)
    w = np.random.default_rng(4).standard_normal(X_T.shape)

    def loss_ref(z, mu):
        s = PNDM64(**kw)
        s.set_timesteps(n)
        return float(np.sum(w * np.sin(_diffusers(s, mu=mu, x_T=z))))

    setup = aj.from_diffusers(_config(sched), n, model=_jax_model(sched))

    def loss(params, z):
        x0 = aj.sample(setup.model, params, z, schedule=setup.schedule, ts=setup.ts,
                       sampler=setup.sampler, adjoint=aj.DTO())
        return jnp.sum(jnp.asarray(w) * jnp.sin(x0))

    g_p, g_z = jax.grad(loss, argnums=(0, 1))({"mu": jnp.asarray(MU)}, jnp.asarray(X_T))
    eps = 1e-5
    d = np.random.default_rng(3).standard_normal(X_T.shape)
    fd_z = (loss_ref(X_T + eps * d, MU) - loss_ref(X_T - eps * d, MU)) / (2 * eps)
    fd_mu = (loss_ref(X_T, MU + eps) - loss_ref(X_T, MU - eps)) / (2 * eps)
    assert abs(float(np.sum(np.asarray(g_z) * d)) - fd_z) <= 1e-8 * abs(fd_z)
    assert abs(float(g_p["mu"]) - fd_mu) <= 1e-8 * abs(fd_mu)


@pytest.mark.parametrize(
    "sampler", [aj.PNDM(), aj.PNDM(prk=True), aj.PNDM(combine="v")], ids=repr
)
def test_order_on_gaussian(sampler):
    """Second order (Adams–Bashforth in the step index over unequal ρ steps); first
    order when the combinations are formed on v (diffusers' v_prediction)."""
    pb = GaussianProblem.make(4)
    sch = pb.schedule
    x_T = jnp.array([0.3, -1.2, 2.0, 0.7])
    truth = pb.flow_map(pb.params, x_T, None, sch.t_max, 1e-3)
    ns = [20, 40, 80]
    errs = [
        rel_err(aj.sample(pb.model, pb.params, x_T, schedule=sch,
                          ts=aj.time_grid(sch, n, t_end=1e-3), sampler=sampler), truth)
        for n in ns
    ]
    assert abs(slope(ns, errs) - sampler.order) < 0.25, (slope(ns, errs), errs)


def test_bfloat16_network():
    """A network computing in bfloat16: the grid stays float64, the network gets
    diffusers' own timesteps (the repeated second one included), the result is
    within bfloat16 accuracy of diffusers' float64 one."""
    n, kw = 12, CASES["plms-sd15"][0]
    sched = PNDM64(**kw)
    sched.set_timesteps(n)
    ref = _diffusers(sched)
    seen = []
    f64 = _jax_model(sched, seen)

    def bf16_model(params, x, t, cond):
        out = f64(params, x.astype(jnp.bfloat16), t, cond)
        assert out.dtype == jnp.bfloat16
        return out

    ours, setup = _ours(sched, n, model=bf16_model)
    assert setup.ts.dtype == jnp.float64
    assert seen == sched.timesteps.tolist()
    assert np.all(np.isfinite(ours))
    assert rel_err(ours, ref) < 3e-2, rel_err(ours, ref)


@pytest.mark.parametrize(
    "kw,n,key,extra",
    [
        (dict(prediction_type="sample"), 10, "prediction_type", {}),
        (dict(skip_prk_steps=True, timestep_spacing="linspace"), 10, "timestep_spacing",
         {}),
        ({}, 3, "skip_prk_steps", {}),  # F-PNDM needs 4 steps
        ({}, 9, "skip_prk_steps", {}),  # 1000 // 9 = 111: odd
        (dict(skip_prk_steps=True), 1, "identity", {}),
        (dict(skip_prk_steps=True), 10, "sigmas", {"sigmas": [0.9, 0.1]}),
        (dict(skip_prk_steps=True), 10, "timesteps", {"timesteps": [999, 1]}),
        (dict(skip_prk_steps=True), 10, "mu", {"mu": 0.5}),
    ],
)
def test_refusals_name_the_key(kw, n, key, extra):
    config = {"_class_name": "PNDMScheduler"} | kw
    with pytest.raises(ValueError, match=key):
        aj.from_diffusers(config, n, **extra)


def test_keys_of_other_schedulers_are_ignored_as_diffusers_does():
    """A shipped config switched to PNDM keeps other schedulers' keys, which
    PNDMScheduler does not take: no warning, and no effect (`rescale_betas_zero_snr`
    included: PNDM has none)."""
    import warnings

    base = _config(PNDM64(**CASES["plms-sd15"][0]))
    foreign = base | {"rescale_betas_zero_snr": True, "clip_sample": False,
                      "use_karras_sigmas": True, "solver_order": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain, other = (aj.from_diffusers(c, 10) for c in (base, foreign))
    np.testing.assert_array_equal(np.asarray(plain.ts), np.asarray(other.ts))
    np.testing.assert_array_equal(plain.schedule.log_alphas, other.schedule.log_alphas)
    assert plain.sampler == other.sampler
