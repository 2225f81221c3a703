"""`DPMSolverSinglestepScheduler`, `DEISMultistepScheduler` and `DPMSolverSDEScheduler`:
`aj.from_diffusers` against the real diffusers in float64 (tests/diffusers64_singlestep)
at two step counts per option set, deterministic and with the same noises; DTO
gradients against central differences of diffusers; the new samplers' orders on the
closed-form Gaussian; bfloat16 networks on the new grids; refusals by name.

The network is analytic on both sides: data N(μ, s²) elementwise, so ε, x̂₀, v and
the flow velocity are closed-form in (x, ᾱ); ᾱ is read from the scheduler's table at
the (integer or fractional) timestep the scheduler passes, interpolated linearly, so
that a wrong timestep shows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import adjoint_jax as aj
from adjoint_jax._samplers._dpm_sde import interleave
from adjoint_jax.bench import GaussianProblem

from .diffusers64_singlestep import DEIS64, SDE64, SINGLESTEP64, BrownianNormals, run
from .helpers import rel_err, slope


pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning",
    "ignore:.*deprecated:FutureWarning",
    "ignore:__array_wrap__ must accept context:DeprecationWarning",
)

MU, S = 0.7, 0.5
TOL = 1e-10
X_T = np.random.default_rng(0).standard_normal((2, 3))
NOISE = np.random.default_rng(1).standard_normal((80, 2, 3))
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


# ---- the analytic network, on both sides -------------------------------------------
def _post(ab, x, mu):
    """(E[ε | x], E[x_0 | x]) under x = √ᾱ x_0 + √(1 − ᾱ) ε, x_0 ~ N(μ, s²)."""
    a, sig = ab**0.5, (1 - ab) ** 0.5
    d = a * a * S * S + sig * sig
    return sig * (x - a * mu) / d, mu + a * S * S * (x - a * mu) / d


def _output(kind, ab, x, mu, flow_sigma=None):
    if flow_sigma is not None:  # x = (1 − σ) x_0 + σ ε: rescale to the VP state
        norm = ((1 - flow_sigma) ** 2 + flow_sigma**2) ** 0.5
        ab, x = (1 - flow_sigma) ** 2 / norm**2, x / norm
    eps, x0 = _post(ab, x, mu)
    return {
        "epsilon": eps,
        "sample": x0,
        "v_prediction": ab**0.5 * eps - (1 - ab) ** 0.5 * x0,
        "flow": eps - x0,
        "learned": None,
    }[kind]


def _torch_net(ab_table, kind, mu=MU, flow=False):
    def f(x, t):
        tau = float(t)
        ab = torch.as_tensor(np.interp(tau, np.arange(len(ab_table)), ab_table))
        if kind == "learned":  # ε with 3 extra (variance) channels
            return torch.cat([_output("epsilon", ab, x, mu), 3.0 * x], dim=1)
        return _output(kind, ab, x, mu, tau / 1000 if flow else None)

    return f


def _jax_net(kind, flow=False):
    def f(params, x, t, cond):
        tau = jnp.asarray(t, jnp.float64)
        table = params["ab"]
        ab = jnp.interp(tau, jnp.arange(table.shape[0], dtype=jnp.float64), table)
        if kind == "learned":
            return jnp.concatenate([_output("epsilon", ab, x, params["mu"]), 3.0 * x], 1)
        return _output(kind, ab, x, params["mu"], tau / 1000 if flow else None)

    return f


# One function per kind (so that equal solves share their compilation).
NETS = {(k, f): _jax_net(k, f) for k in ("epsilon", "sample", "v_prediction", "learned")
        for f in (False, True)} | {("flow", f): _jax_net("flow", f) for f in (False, True)}


def _config(sched):
    return dict(sched.config) | {"_class_name": type(sched).__mro__[1].__name__}


def _params(sched, mu=MU):
    return {"ab": jnp.asarray(sched.alphas_cumprod.numpy()), "mu": jnp.asarray(mu)}


def _ours(config, n, sched, kind, flow=False, noise=None, x_T=X_T, **kw):
    """(final latents, setup) of `aj.from_diffusers(config, n, **kw)` (kw: the
    `set_timesteps` arguments)."""
    setup = aj.from_diffusers(config, n, model=NETS[kind, flow], **kw)
    nz = None if noise is None else jnp.asarray(noise[: len(setup.ts) - 1])
    out = aj.sample(setup.model, _params(sched), setup.initial(jnp.asarray(x_T)),
                    schedule=setup.schedule, ts=setup.ts, sampler=setup.sampler, noise=nz)
    return np.asarray(setup.final(out)), setup


MAX_DIFF: dict[str, float] = {}


def _agree(check, ours, ref, atol=TOL):
    diff = float(np.max(np.abs(np.asarray(ours) - np.asarray(ref))))
    MAX_DIFF[check] = max(MAX_DIFF.get(check, 0.0), diff)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=atol)


# ---- DPMSolverSinglestepScheduler ---------------------------------------------------
# (id, config, step counts, prediction kind, flow network, noisy, set_timesteps kwargs)
SINGLE = [
    ("defaults", {}, (9, 20), "epsilon", False, False, {}),
    ("o3-karras-v", dict(SD, solver_order=3, use_karras_sigmas=True,
                         prediction_type="v_prediction"), (9, 16), "v_prediction", False, False, {}),
    ("o3-heun-exp-sample-sigmamin-nolof", dict(
        SD, solver_order=3, solver_type="heun", use_exponential_sigmas=True,
        prediction_type="sample", final_sigmas_type="sigma_min", lower_order_final=False,
    ), (9, 12), "sample", False, False, {}),
    # Odd N: the last step σ_min → σ_min is of order 1 (the identity, dropped); even
    # N with lower_order_final=False: of order 2 (the model re-evaluated at σ_min).
    ("dpmsolver-o2-heun-beta-sigmamin-nolof", dict(
        SD, algorithm_type="dpmsolver", solver_type="heun", use_beta_sigmas=True,
        final_sigmas_type="sigma_min", lower_order_final=False,
    ), (7, 18), "epsilon", False, False, {}),
    ("dpmsolver-o3-v-sigmamin", dict(
        SD, algorithm_type="dpmsolver", solver_order=3, final_sigmas_type="sigma_min",
        prediction_type="v_prediction",
    ), (10, 21), "v_prediction", False, False, {}),
    ("sde-o3-midpoint", dict(SD, algorithm_type="sde-dpmsolver++", solver_order=3),
     (10, 17), "epsilon", False, True, {}),
    ("sde-o3-heun-karras", dict(SD, algorithm_type="sde-dpmsolver++", solver_order=3,
                                solver_type="heun", use_karras_sigmas=True),
     (9, 14), "epsilon", False, True, {}),
    ("cosine-clipped-o1-learned-variance", dict(
        beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, solver_order=1,
        variance_type="learned_range",
    ), (6, 15), "learned", False, False, {}),
    ("flow-o3", dict(use_flow_sigmas=True, prediction_type="flow_prediction",
                     flow_shift=3.0, solver_order=3), (10, 16), "flow", True, False, {}),
    # diffusers' own conversions where no parameterisation of the grid's schedule
    # matches: ε = α v + σ x on flow sigmas (noise prediction), x̂_0 = x − σ̃ u on VP.
    ("flow-v-dpmsolver-sigmamin", dict(use_flow_sigmas=True, prediction_type="v_prediction",
                                       algorithm_type="dpmsolver",
                                       final_sigmas_type="sigma_min"),
     (6, 12), "v_prediction", True, False, {}),  # T σ = 333 − 6e-14: truncated to 332
    ("vp-flow-prediction", dict(SD, prediction_type="flow_prediction"), (8, 15), "flow",
     False, False, {}),
    ("flow-mu-eps-sigmamin", dict(use_flow_sigmas=True, use_dynamic_shifting=True,
                                  final_sigmas_type="sigma_min", lower_order_final=False),
     (8, 12), "epsilon", True, False, {"mu": 0.8}),
]


@pytest.mark.parametrize("case", SINGLE, ids=[c[0] for c in SINGLE])
def test_singlestep_parity(case):
    name, kw, ns, kind, flow, noisy, st_kw = case
    for n in ns:
        sched = SINGLESTEP64(**kw)
        config = _config(sched)  # before set_timesteps (which may set lower_order_final)
        sched.set_timesteps(n, **st_kw)
        noise = NOISE if noisy else None
        ref = run(sched, _torch_net(sched.alphas_cumprod.numpy(), kind, flow=flow), X_T,
                  noise=noise)
        ours, setup = _ours(config, n, sched, kind, flow, noise, **st_kw)
        sig = sched.sigmas.numpy()
        # A last step σ_min → σ_min (σ-grids to 'sigma_min') is not a grid step.
        repeated = bool(np.isclose(sig[-1], sig[-2], rtol=1e-12, atol=0))
        assert len(setup.ts) == n + 1 - repeated
        assert setup.sampler.reevaluate_last == (repeated and sched.order_list[-1] > 1)
        if flow:
            np.testing.assert_allclose(np.asarray(setup.ts), sig, rtol=1e-14, atol=0)
        _agree(f"singlestep {name}", ours, ref)


def test_singlestep_custom_timesteps_and_order_lists():
    for steps in ([999, 850, 700, 600, 500, 300, 200, 100, 40, 10], [951, 700, 420, 180, 31]):
        sched = SINGLESTEP64(**SD, solver_order=3, solver_type="heun")
        config = _config(sched)
        sched.set_timesteps(timesteps=steps)
        ref = run(sched, _torch_net(sched.alphas_cumprod.numpy(), "epsilon"), X_T)
        ours, setup = _ours(config, None, sched, "epsilon", timesteps=steps)
        _agree("singlestep custom timesteps", ours, ref)
    # The sampler's order schedule is diffusers' get_order_list (σ = 0 at the end
    # lowers the last order inside the sampler, as orders[-1] = 1 does).
    from adjoint_jax._samplers._dpm_singlestep import singlestep_orders

    for order in (1, 2, 3):
        for lower in (False, True):
            sched = SINGLESTEP64(solver_order=order, lower_order_final=lower,
                                 final_sigmas_type="sigma_min")
            for n in range(1, 14):
                ours = singlestep_orders(order, n, lower)
                lof = lower or n % order != 0
                sched.register_to_config(lower_order_final=lof)
                assert ours.tolist() == sched.get_order_list(n), (order, lower, n)


# Dynamic thresholding (diffusers' `_threshold_sample` needs latents with a batch,
# a channel and at least one more axis). Active: the 0.9-quantile of |x̂_0| exceeds 1.
X3 = np.random.default_rng(2).standard_normal((2, 3, 4))
NOISE3 = np.random.default_rng(4).standard_normal((40, 2, 3, 4))
THRESHOLD = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.3)


@pytest.mark.parametrize(
    "cls,kw,ns,noisy",
    [
        (SINGLESTEP64, dict(SD, solver_order=3, **THRESHOLD), (9, 16), False),
        (SINGLESTEP64, dict(SD, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True,
                            prediction_type="v_prediction", **THRESHOLD), (8, 15), True),
        (DEIS64, dict(SD, solver_order=3, use_exponential_sigmas=True, **THRESHOLD),
         (8, 16), False),
    ],
    ids=["singlestep-o3", "singlestep-sde-karras-v", "deis-o3-exponential"],
)
def test_thresholding_parity(cls, kw, ns, noisy):
    kind = kw.get("prediction_type", "epsilon")
    for n in ns:
        sched = cls(**kw)
        config = _config(sched)
        sched.set_timesteps(n)
        noise = NOISE3 if noisy else None
        ref = run(sched, _torch_net(sched.alphas_cumprod.numpy(), kind), X3, noise=noise)
        ours, setup = _ours(config, n, sched, kind, noise=noise, x_T=X3)
        assert setup.sampler.thresholding == (0.9, 1.3)
        _agree(f"{cls.__mro__[1].__name__} thresholding", ours, ref)


# ---- DEISMultistepScheduler ---------------------------------------------------------
DEIS_CASES = [
    ("defaults", {}, (10, 20), "epsilon", False, {}),
    ("o3-karras-v", dict(SD, solver_order=3, use_karras_sigmas=True,
                         prediction_type="v_prediction"), (8, 16), "v_prediction", False, {}),
    ("o3-trailing-nolof-sample", dict(SD, solver_order=3, timestep_spacing="trailing",
                                      lower_order_final=False, prediction_type="sample"),
     (7, 12), "sample", False, {}),
    ("o3-leading-offset", dict(SD, solver_order=3, timestep_spacing="leading",
                               steps_offset=1), (9, 25), "epsilon", False, {}),
    ("o1-exponential", dict(SD, solver_order=1, use_exponential_sigmas=True), (5, 15),
     "epsilon", False, {}),
    ("o3-beta", dict(SD, solver_order=3, use_beta_sigmas=True), (6, 15), "epsilon",
     False, {}),
    ("flow-v", dict(use_flow_sigmas=True, prediction_type="v_prediction",
                                flow_shift=2.0), (6, 12), "v_prediction", True, {}),
    ("vp-flow-prediction-karras", dict(SD, prediction_type="flow_prediction",
                                       use_karras_sigmas=True), (7, 13), "flow", False, {}),
    ("flow-o3-mu", dict(use_flow_sigmas=True, use_dynamic_shifting=True, solver_order=3,
                        prediction_type="flow_prediction"), (10, 18), "flow", True,
     {"mu": 1.1}),
]


@pytest.mark.parametrize("case", DEIS_CASES, ids=[c[0] for c in DEIS_CASES])
def test_deis_parity(case):
    name, kw, ns, kind, flow, st_kw = case
    for n in ns:
        sched = DEIS64(**kw)
        config = _config(sched)
        sched.set_timesteps(n, **st_kw)
        ref = run(sched, _torch_net(sched.alphas_cumprod.numpy(), kind, flow=flow), X_T)
        ours, setup = _ours(config, n, sched, kind, flow, **st_kw)
        sig = sched.sigmas.numpy()
        # A σ-grid's last step (σ_min to σ_min) is the identity, dropped.
        assert len(setup.ts) == n + (0 if sig[-1] == sig[-2] else 1)
        _agree(f"DEIS {name}", ours, ref)


# ---- DPMSolverSDEScheduler ----------------------------------------------------------
def _brownian(sched, normals):
    """diffusers' σ grid with its log-midpoints (as `step` computes them) and a
    Brownian motion on it whose normalised increments are `normals`."""
    sig = sched.sigmas.numpy()
    steps = np.concatenate([sig[:1], sig[2:-1:2]])
    t = -torch.log(torch.as_tensor(steps))
    mids = torch.exp(-(t[:-1] + (t[1:] - t[:-1]) * 0.5)).numpy()
    grid = np.empty(2 * len(steps) - 1)
    grid[0::2], grid[1::2] = steps, mids
    return BrownianNormals(grid, normals[: len(grid) - 1])


SDE_CASES = [
    ("linspace", dict(SD), (7, 16), "epsilon"),
    ("karras-v", dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"),
     (6, 12), "v_prediction"),
    ("leading-offset-exponential", dict(SD, timestep_spacing="leading", steps_offset=1,
                                        use_exponential_sigmas=True), (5, 10), "epsilon"),
    ("trailing-beta", dict(timestep_spacing="trailing", use_beta_sigmas=True), (6, 11),
     "epsilon"),
]


@pytest.mark.parametrize("case", SDE_CASES, ids=[c[0] for c in SDE_CASES])
def test_dpm_sde_parity_with_brownian_increments(case):
    name, kw, ns, kind = case
    for n in ns:
        sched = SDE64(**kw)
        config = _config(sched)
        sched.set_timesteps(n)
        sched.noise_sampler = _brownian(sched, NOISE)
        ref = run(sched, _torch_net(sched.alphas_cumprod.numpy(), kind), X_T)
        assert sched.noise_sampler.calls == 2 * (n - 1)
        ours, setup = _ours(config, n, sched, kind, noise=NOISE)
        assert len(setup.ts) == 2 * n and float(setup.ts[-1]) == 0.0
        _agree(f"DPMSolverSDE {name}", ours, ref)


def test_dpm_sde_interleave_is_diffusers_grid():
    sched = SDE64(**SD, use_karras_sigmas=True)
    sched.set_timesteps(9)
    setup = aj.from_diffusers(_config(sched), 9)
    macro = jnp.concatenate([setup.ts[:-1:2], setup.ts[-1:]])
    np.testing.assert_allclose(np.asarray(interleave(setup.schedule, macro)),
                               np.asarray(setup.ts), rtol=1e-13, atol=0)


# ---- DTO gradients against central differences of diffusers -------------------------
GRAD_CASES = [
    ("singlestep", SINGLESTEP64, dict(SD, solver_order=3, algorithm_type="sde-dpmsolver++"),
     10, True),
    ("deis", DEIS64, dict(SD, solver_order=3, use_karras_sigmas=True), 9, False),
    ("dpm-sde", SDE64, dict(SD), 6, True),
]
W = np.array([[0.3, -1.0, 0.5], [1.2, 0.1, -0.7]])


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_dto_gradient_matches_diffusers_central_differences(case):
    """d/dμ and d/dz of L = Σ w · sin(x_0), x_0 the final latents, with the noises
    fixed: `aj.DTO()` against central differences of diffusers' float64 loop."""
    name, cls, kw, n, noisy = case

    def diffusers_loss(mu, z):
        sched = cls(**kw)
        sched.set_timesteps(n)
        if cls is SDE64:
            sched.noise_sampler = _brownian(sched, NOISE)
        out = run(sched, _torch_net(sched.alphas_cumprod.numpy(), "epsilon", mu=mu), z,
                  noise=NOISE if noisy and cls is SINGLESTEP64 else None)
        return float(np.sum(W * np.sin(out)))

    sched = cls(**kw)
    setup = aj.from_diffusers(_config(sched), n, model=NETS["epsilon", False])
    sched.set_timesteps(n)
    params = _params(sched)
    nz = jnp.asarray(NOISE[: len(setup.ts) - 1]) if noisy else None

    def loss(p, z):
        x0 = setup.final(aj.sample(setup.model, p, setup.initial(z), schedule=setup.schedule,
                                   ts=setup.ts, sampler=setup.sampler, noise=nz,
                                   adjoint=aj.DTO()))
        return jnp.sum(W * jnp.sin(x0))

    g_p, g_z = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(X_T))
    d = 1e-5
    fd_mu = (diffusers_loss(MU + d, X_T) - diffusers_loss(MU - d, X_T)) / (2 * d)
    direction = np.random.default_rng(3).standard_normal(X_T.shape)
    fd_z = (diffusers_loss(MU, X_T + d * direction)
            - diffusers_loss(MU, X_T - d * direction)) / (2 * d)
    np.testing.assert_allclose(float(g_p["mu"]), fd_mu, rtol=1e-7)
    np.testing.assert_allclose(float(np.sum(np.asarray(g_z) * direction)), fd_z, rtol=1e-7)


# ---- orders on the closed-form Gaussian ---------------------------------------------
T_END = 1e-3
GAUSS = GaussianProblem.make(4)
XG = jnp.array([0.3, -1.2, 2.0, 0.7])


@pytest.mark.parametrize(
    "sampler,order,ns",
    [
        (aj.DPMSolverSinglestep(order=1), 1, [16, 32, 64]),
        (aj.DPMSolverSinglestep(order=2, solver_type="heun"), 2, [16, 32, 64]),
        (aj.DPMSolverSinglestep(order=3), 3, [24, 48, 96]),
        (aj.DPMSolverSinglestep(order=3, solver_type="heun", algorithm_type="dpmsolver"), 3,
         [24, 48, 96]),
        (aj.DEIS(order=2), 2, [16, 32, 64]),
        # diffusers' warm-up step is first order: its O(h²) local error makes the
        # multistep order 3 second order asymptotically (slope 3.7 at N = 16–128 on
        # Gaussian data, 2.0 from N = 1024; DPMSolverPP(3, "taylor") alike).
        (aj.DEIS(order=3), 2, [1024, 2048, 4096]),
    ],
    ids=repr,
)
def test_ode_orders_on_gaussian(sampler, order, ns):
    sch = GAUSS.schedule
    exact = GAUSS.flow_map(GAUSS.params, XG, None, sch.t_max, T_END)
    errs = [
        rel_err(aj.sample(GAUSS.model, GAUSS.params, XG, schedule=sch,
                          ts=aj.time_grid(sch, n, t_end=T_END), sampler=sampler), exact)
        for n in ns
    ]
    assert abs(slope(ns, errs) - order) < 0.25, (slope(ns, errs), errs)


def test_dpm_sde_exact_mean_and_second_order_variance_on_gaussian():
    """On Gaussian data DPM++ SDE's x_0 is affine in (x_T, noise): its mean map is
    the reverse SDE's exactly, and its conditional variance Σ_i (∂x_0/∂ξ_i)² (exact
    DTO gradients) converges to Var(x_0 | x_T) at order 2 (DDIM η = 1: order 1)."""
    sch, te = GAUSS.schedule, T_END
    a_T, a_e = sch.alpha(sch.t_max), sch.alpha(te)
    v = lambda t: sch.alpha(t) ** 2 * GAUSS.s**2 + sch.sigma(t) ** 2
    m = GAUSS.mu
    mean = a_e * m + (a_T / a_e) * (v(te) / v(sch.t_max)) * (XG - a_T * m)
    var = v(te) - (a_T / a_e) ** 2 * v(te) ** 2 / v(sch.t_max)
    ns, errs = [8, 16, 32], []
    for n in ns:
        ts = interleave(sch, aj.time_grid(sch, n, t_end=te))
        f = lambda nz: aj.sample(GAUSS.model, GAUSS.params, XG, schedule=sch, ts=ts,
                                 sampler=aj.DPMSolverSDE(), noise=nz)
        nz = jnp.zeros((ts.shape[0] - 1, 4))
        g, x0 = jax.grad(lambda nz: (jnp.sum(f(nz)), f(nz)), has_aux=True)(nz)
        np.testing.assert_allclose(x0, mean, rtol=0, atol=1e-13)
        errs.append(float(jnp.max(jnp.abs(jnp.sum(g**2, 0) - var) / var)))
    assert abs(slope(ns, errs) - aj.DPMSolverSDE.order) < 0.25, (slope(ns, errs), errs)


# ---- bfloat16 networks on the new grids ----------------------------------------------
BF16_CASES = [
    ("singlestep-karras", SINGLESTEP64, dict(SD, solver_order=3, use_karras_sigmas=True), 12),
    ("deis-exponential", DEIS64, dict(SD, use_exponential_sigmas=True), 10),
    ("dpm-sde-linspace", SDE64, dict(SD), 8),
]


@pytest.mark.parametrize("case", BF16_CASES, ids=[c[0] for c in BF16_CASES])
def test_bfloat16_network(case):
    """A network computing in bfloat16 under a float32 state: the grid and timesteps
    stay float64 (no collided timesteps: the network sees diffusers' own), and the
    result is float64's within bfloat16 accuracy."""
    name, cls, kw, n = case
    sched = cls(**kw)
    config = _config(sched)
    sched.set_timesteps(n)
    seen = []
    def bf16_net(params, x, t, cond):
        jax.debug.callback(lambda tau: seen.append(float(tau)), t, ordered=True)
        tau = jnp.asarray(t, jnp.float32)
        table = params["ab"].astype(jnp.float32)
        ab = jnp.interp(tau, jnp.arange(table.shape[0], dtype=jnp.float32), table)
        bf = jnp.bfloat16
        return _output("epsilon", ab.astype(bf), x.astype(bf), params["mu"].astype(bf))

    outs = {}
    for dtype, model in ((jnp.float64, NETS["epsilon", False]), (jnp.float32, bf16_net)):
        setup = aj.from_diffusers(config, n, model=model)
        nz = jnp.asarray(NOISE[: len(setup.ts) - 1], dtype) if setup.sampler.is_sde else None
        out = aj.sample(setup.model, _params(sched), setup.initial(jnp.asarray(X_T, dtype)),
                        schedule=setup.schedule, ts=setup.ts, sampler=setup.sampler, noise=nz)
        outs[dtype] = np.asarray(setup.final(out), np.float64)
    assert np.all(np.isfinite(outs[jnp.float32]))
    assert rel_err(outs[jnp.float32], outs[jnp.float64]) < 3e-2
    steps = sched.timesteps.numpy().astype(np.float64)
    if cls is DEIS64:  # its last (identity) step is dropped
        steps = steps[:-1]
    # The network sees diffusers' timesteps: the integer ones exactly, fractional ones
    # (DPM++ SDE's) in the float32 state's precision — distinct, never collided.
    seen = np.asarray(seen[-len(steps):])
    np.testing.assert_allclose(seen, steps, rtol=1e-7 if cls is SDE64 else 0, atol=0)
    assert np.all(np.diff(seen) < 0)


# ---- refusals ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,config,kw,key",
    [
        ("DPMSolverSinglestepScheduler", {"thresholding": True, "algorithm_type": "dpmsolver",
                                          "final_sigmas_type": "sigma_min"}, {},
         "thresholding"),
        ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver"}, {},
         "final_sigmas_type"),
        ("DPMSolverSinglestepScheduler", {"prediction_type": "flow_prediction",
                                          "algorithm_type": "dpmsolver",
                                          "final_sigmas_type": "sigma_min"}, {},
         "prediction_type"),
        ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True, "use_beta_sigmas": True},
         {}, "use_karras_sigmas"),
        ("DPMSolverSinglestepScheduler", {"use_flow_sigmas": True}, {"mu": 0.5},
         "use_dynamic_shifting"),
        ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True},
         {"timesteps": [900, 500, 100]}, "timesteps"),
        ("DPMSolverSinglestepScheduler", {}, {"sigmas": [14.0, 1.0]}, "sigmas"),
        ("DEISMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}, "algorithm_type"),
        ("DEISMultistepScheduler", {"solver_type": "bh3"}, {}, "solver_type"),
        ("DEISMultistepScheduler", {}, {"timesteps": [900, 500, 100]}, "timesteps"),
        ("DPMSolverSDEScheduler", {"prediction_type": "sample"}, {}, "prediction_type"),
        ("DPMSolverSDEScheduler", {}, {"eta": 0.5}, "eta"),
        ("DPMSolverSDEScheduler", {}, {"mu": 0.5}, "mu"),
    ],
)
def test_refused_options_name_their_key(name, config, kw, key):
    n = None if "timesteps" in kw else 10
    with pytest.raises(ValueError, match=key):
        aj.from_diffusers({"_class_name": name, **config}, n, model=NETS["epsilon", False],
                          **kw)


def test_learned_variance_needs_epsilon_and_continuous_adjoints_refuse_sde_states():
    with pytest.raises(ValueError, match="variance_type"):
        aj.from_diffusers({"_class_name": "DPMSolverSinglestepScheduler",
                           "variance_type": "learned", "prediction_type": "sample"},
                          10, model=NETS["sample", False])
    for sampler in (aj.DPMSolverSDE(), aj.DPMSolverSinglestep(algorithm_type="sde-dpmsolver++")):
        for adjoint in (aj.AdjointDEIS(), aj.RecordedAdjoint()):
            with pytest.raises(ValueError, match="AbstractSDESampler") as info:
                adjoint.check_sampler(sampler)
            assert repr(adjoint) in str(info.value) and repr(sampler) in str(info.value)
