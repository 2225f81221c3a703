"""`UniPCMultistepScheduler` = `aj.from_diffusers` + `aj.UniPC`: parity with the real
diffusers (float64, `tests/diffusers64_unipc_pndm`) for every option that changes
the numbers, at two step counts each (one below 15, where `lower_order_final` acts);
the NaN diffusers returns for bh1 and noise prediction at σ = 0 (ours is the limit);
the DTO gradient against central differences of diffusers itself; the orders on the
closed-form Gaussian; a bfloat16 network on the new grids; the refusals.

The analytic network: data N(μ, s²) elementwise, so ε, x̂_0, v and the flow velocity
are closed-form functions of (x, noise level). The network is called with the
scheduler's own (integer) timestep n, as a pipeline calls it, and reads its noise
level from n (ᾱ_n on VP grids, σ = n/T on flow grids, where diffusers truncates T σ):
both sides evaluate the same function of (x, n).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import adjoint_jax as aj
from adjoint_jax.bench import GaussianProblem

from .diffusers64_unipc_pndm import UNIPC64, run_loop
from .helpers import rel_err, slope


pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning"
)

MU, S = 0.7, 0.5
TOL = 1e-10
# (batch, channels, pixels): diffusers' thresholding needs a third axis.
X_T = np.random.default_rng(0).standard_normal((2, 3, 2))
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")


def _out(kind, a, sig, mu, x):
    """The network's output for data N(mu, S²) at x = a x_0 + sig ε."""
    d = a * a * S * S + sig * sig
    eps = sig * (x - a * mu) / d
    x0 = mu + a * S * S * (x - a * mu) / d
    return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - sig * x0,
            "flow_prediction": eps - x0}[kind]


def _level(sched, n, xp):
    """(a, sig) of the network at timestep n: ᾱ_n's, or σ = n/T on flow grids."""
    T = sched.config.num_train_timesteps
    if sched.config.use_flow_sigmas:
        sig = (n.astype(jnp.float64) if xp is jnp else float(n)) / T
        return 1 - sig, sig
    ab = sched.alphas_cumprod
    ab = ab if xp is torch else jnp.asarray(ab.numpy())
    return ab[n] ** 0.5, (1 - ab[n]) ** 0.5


def _diffusers(sched, mu=MU, x_T=X_T):
    kind = sched.config.prediction_type
    return run_loop(
        sched, lambda x, t: _out(kind, *_level(sched, int(t), torch), mu, x), x_T
    )


def _jax_model(sched, seen=None):
    kind = sched.config.prediction_type

    def model(params, x, n, cond):
        assert jnp.issubdtype(n.dtype, jnp.integer)
        if seen is not None:
            jax.debug.callback(lambda v: seen.append(int(v)), n, ordered=True)
        mu = MU if params is None else params["mu"]
        a, sig = _level(sched, n, jnp)
        # In x's dtype (a bfloat16 network computes in bfloat16).
        return _out(kind, *(jnp.asarray(v, x.dtype) for v in (a, sig, mu)), x)

    return model


def _config(sched):
    return dict(sched.config) | {"_class_name": "UniPCMultistepScheduler"}


def _ours(sched, n, model=None, params=None, x_T=X_T, **kw):
    setup = aj.from_diffusers(_config(sched), n, model=model or _jax_model(sched), **kw)
    out = aj.sample(setup.model, params, setup.initial(jnp.asarray(x_T)),
                    schedule=setup.schedule, ts=setup.ts, sampler=setup.sampler)
    return np.asarray(setup.final(out)), setup


def _agree(ours, ref, atol=TOL):
    assert np.all(np.isfinite(ref)), ref
    np.testing.assert_allclose(ours, ref, rtol=0, atol=atol)


# (config, the two step counts, set_timesteps kwargs, the sampler from_diffusers picks)
CASES = {
    "default": ({}, (8, 25), {}, aj.UniPC()),
    "eps-form-bh1-order3-trailing-no-lof-sigma_min": (
        dict(SD, predict_x0=False, solver_type="bh1", solver_order=3,
             timestep_spacing="trailing", lower_order_final=False,
             final_sigmas_type="sigma_min"),
        (6, 20), {},
        aj.UniPC(solver_order=3, solver_type="bh1", predict_x0=False,
                 lower_order_final=False),
    ),
    "order1-leading-offset-sample-cosine": (
        dict(solver_order=1, timestep_spacing="leading", steps_offset=1,
             prediction_type="sample", beta_schedule="squaredcos_cap_v2"),
        (7, 20), {}, aj.UniPC(solver_order=1),
    ),
    "bh1-v-disable_corrector-sigma_min": (
        dict(SD, solver_type="bh1", prediction_type="v_prediction",
             disable_corrector=[0, 2], final_sigmas_type="sigma_min"),
        (7, 16), {}, aj.UniPC(solver_type="bh1", disable_corrector=(0, 2)),
    ),
    "eps-form-karras-range-sigma_min": (  # the repeated last σ: correct_last
        dict(SD, predict_x0=False, use_karras_sigmas=True, sigma_min=0.1,
             sigma_max=10.0, final_sigmas_type="sigma_min"),
        (6, 20), {}, aj.UniPC(predict_x0=False, correct_last=True),
    ),
    "exponential-order3-thresholding": (
        dict(use_exponential_sigmas=True, solver_order=3, thresholding=True,
             dynamic_thresholding_ratio=0.9, sample_max_value=1.3),
        (7, 20), {}, aj.UniPC(solver_order=3, thresholding=(0.9, 1.3)),
    ),
    "beta-no-lof-sigma_min-flow_prediction": (
        dict(SD, use_beta_sigmas=True, lower_order_final=False,
             final_sigmas_type="sigma_min", prediction_type="flow_prediction"),
        (7, 20), {}, aj.UniPC(lower_order_final=False, correct_last=True),
    ),
    "karras-zero_snr-v": (
        dict(SD, use_karras_sigmas=True, rescale_betas_zero_snr=True,
             prediction_type="v_prediction"),
        (8, 20), {}, aj.UniPC(),
    ),
    "flow-wan": (dict(FLOW, flow_shift=3.0), (10, 30), {}, aj.UniPC()),
    "flow-mu-sigma_min-order3-bh1": (
        dict(FLOW, use_dynamic_shifting=True, final_sigmas_type="sigma_min",
             solver_order=3, solver_type="bh1"),
        (7, 20), {"mu": 0.9},
        aj.UniPC(solver_order=3, solver_type="bh1", correct_last=True),
    ),
    "flow-karras-eps": (
        dict(use_flow_sigmas=True, use_karras_sigmas=True), (7, 20), {}, aj.UniPC(),
    ),
    "flow-mu-linear-terminal-v": (
        dict(use_flow_sigmas=True, prediction_type="v_prediction",
             use_dynamic_shifting=True, time_shift_type="linear", shift_terminal=0.1),
        (7, 20), {"mu": 1.7}, aj.UniPC(),
    ),
}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_parity(case):
    kw, ns, extra, sampler = CASES[case]
    for n in ns:
        sched = UNIPC64(**kw)
        sched.set_timesteps(n, **extra)
        ref = _diffusers(sched)
        ours, setup = _ours(sched, n, **extra)
        assert setup.sampler == sampler
        _agree(ours, ref)


def test_parity_pipeline_sigmas():
    """A pipeline's own flow σ (`set_timesteps(sigmas=...)`), sample prediction."""
    for sig in (np.linspace(1.0, 0.05, 6), np.linspace(0.9, 0.02, 17) ** 1.5):
        sched = UNIPC64(use_flow_sigmas=True, prediction_type="sample", flow_shift=2.0)
        sched.set_timesteps(sigmas=sig)
        ours, _ = _ours(sched, None, sigmas=sig)
        _agree(ours, _diffusers(sched))


def test_thresholding_acts():
    """The thresholding case's settings change diffusers' result (so its parity
    above tests them)."""
    kw = CASES["exponential-order3-thresholding"][0]
    out = []
    for th in (True, False):
        sched = UNIPC64(**(kw | {"thresholding": th}))
        sched.set_timesteps(7)
        out.append(_diffusers(sched))
    assert np.max(np.abs(out[0] - out[1])) > 1e-3


def test_final_sigma_zero_is_finite_where_diffusers_is_nan():
    """diffusers' bh1 (B(h) = −h = −∞ times 0) and noise-prediction (σ = 0 times
    e^h − 1 = ∞) steps to σ = 0 return NaN; ours is the limit, which diffusers
    reaches with a last σ of 1e-150 instead of 0."""
    for kw in (dict(solver_type="bh1"), dict(predict_x0=False, solver_order=3)):
        sched = UNIPC64(**kw)
        sched.set_timesteps(9)
        assert np.all(np.isnan(_diffusers(sched)))
        ours, setup = _ours(sched, 9)
        assert float(setup.ts[-1]) == 0.0
        sched = UNIPC64(**kw)
        sched.set_timesteps(9)
        sched.sigmas[-1] = 1e-150
        _agree(ours, _diffusers(sched))


def test_corrector_off_is_dpm_solver_pp():
    """UniP-2 with bh2 is DPM-Solver++(2M) (the corrector is what differs: the
    parity cases with it on differ from DPM-Solver++ by ~1e-2)."""
    pb = GaussianProblem.make(4)
    ts = aj.time_grid(pb.schedule, 10, t_end=1e-3)
    x_T = jnp.array([0.3, -1.2, 2.0, 0.7])

    def run(smp):
        return np.asarray(aj.sample(pb.model, pb.params, x_T, schedule=pb.schedule,
                                    ts=ts, sampler=smp))

    plain = run(aj.UniPC(disable_corrector=tuple(range(10))))
    np.testing.assert_allclose(plain, run(aj.DPMSolverPP()), rtol=0, atol=1e-14)


def test_dto_gradient_against_diffusers_finite_differences():
    """∂L/∂z and ∂L/∂μ through aj.UniPC (DTO) equal central differences of the
    diffusers loop itself (float64, the model's μ a parameter)."""
    n = 10
    sched = UNIPC64(**SD)
    sched.set_timesteps(n)
    w = np.random.default_rng(4).standard_normal(X_T.shape)

    def loss_ref(z, mu):
        s = UNIPC64(**SD)
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
    "sampler,ns",
    [
        (aj.UniPC(lower_order_final=False), [20, 40, 80]),
        (aj.UniPC(solver_order=3, lower_order_final=False), [80, 160, 320]),
    ],
    ids=repr,
)
def test_order_on_gaussian(sampler, ns):
    pb = GaussianProblem.make(4)
    sch = pb.schedule
    x_T = jnp.array([0.3, -1.2, 2.0, 0.7])
    truth = pb.flow_map(pb.params, x_T, None, sch.t_max, 1e-3)
    errs = [
        rel_err(aj.sample(pb.model, pb.params, x_T, schedule=sch,
                          ts=aj.time_grid(sch, n, t_end=1e-3), sampler=sampler), truth)
        for n in ns
    ]
    assert sampler.order == sampler.solver_order + 1
    assert abs(slope(ns, errs) - sampler.order) < 0.25, (slope(ns, errs), errs)


@pytest.mark.parametrize("case", ["flow-wan", "karras-zero_snr-v"])
def test_bfloat16_network(case):
    """A network computing in bfloat16 on the new grids: the grid and the timesteps
    stay float64 / exact (diffusers' own), the result is within bfloat16 accuracy of
    diffusers' float64 one."""
    kw = CASES[case][0]
    n = 12
    sched = UNIPC64(**kw)
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
    assert seen == sched.timesteps.tolist()  # distinct, and diffusers' own
    assert np.all(np.isfinite(ours))
    assert rel_err(ours, ref) < 3e-2, rel_err(ours, ref)


@pytest.mark.parametrize(
    "kw,key,extra",
    [
        (dict(solver_p="DPMSolverMultistepScheduler"), "solver_p", {}),
        (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr", {}),
        (dict(lower_order_final=False), "lower_order_final", {}),
        (dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", solver_order=3,
              lower_order_final=False), "final_sigmas_type", {}),
        (dict(use_flow_sigmas=True, use_exponential_sigmas=True),
         "use_exponential_sigmas", {}),
        (dict(use_flow_sigmas=True, use_beta_sigmas=True), "use_beta_sigmas", {}),
        (dict(prediction_type="flow_prediction", predict_x0=False),
         "prediction_type", {}),
        (dict(solver_type="bh3"), "solver_type", {}),
        ({}, "use_flow_sigmas", {"sigmas": [0.9, 0.5, 0.1]}),
        (dict(use_flow_sigmas=True, use_dynamic_shifting=True), "mu", {}),
        ({}, "timesteps", {"timesteps": [999, 500, 1]}),
        (dict(FLOW, flow_shift=12.0), "first timestep", {}),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_refusals_name_the_key(kw, key, extra):
    config = {"_class_name": "UniPCMultistepScheduler"} | kw
    n = 100 if kw.get("flow_shift") == 12.0 else 10
    with pytest.raises(ValueError, match=key):
        aj.from_diffusers(config, None if "sigmas" in extra else n, **extra)


def test_config_spellings_diffusers_maps_or_ignores():
    """diffusers maps the DPM-Solver solver types to bh2 and ignores other
    schedulers' keys (a switched config keeps them): no warning, no effect."""
    import warnings

    base = {"_class_name": "UniPCMultistepScheduler"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for solver_type in ("midpoint", "heun", "logrho"):
            setup = aj.from_diffusers(base | {"solver_type": solver_type}, 10)
            assert setup.sampler == aj.UniPC()
        foreign = base | {"clip_sample": False, "set_alpha_to_one": False,
                          "skip_prk_steps": True, "algorithm_type": "dpmsolver++"}
        assert aj.from_diffusers(foreign, 10).sampler == aj.UniPC()
