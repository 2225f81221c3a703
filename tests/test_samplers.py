"""The ecosystem's samplers: DPM-Solver++ (orders 1–3), DDIM(η), grids that end at
σ = 0 or start at α = 0, explicit noise and classifier-free guidance — their orders
on closed-form problems, exact (DTO) gradients against finite differences, and every
gradient strategy on endpoint grids. Parity with diffusers itself is in
`test_diffusers_parity.py`."""

import functools

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import adjoint_jax as aj
from adjoint_jax.bench import GaussianProblem, MixtureProblem, MLPProblem

from .helpers import (
    all_adjoints,
    default_key,
    rel_err,
    slope,
    tree_allclose,
    valid_pairs,
)
from .test_convergence_dto import ode_errors, sde_errors


# ---- orders ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sampler,order,ns",
    [
        (aj.DPMSolverPP(solver_type="heun"), 2, [20, 40, 80]),
        # diffusers' order-3 update is second-order convergent (its D₂ is half the
        # Taylor coefficient; see DPMSolverPP's docstring): asymptotic slope 2.
        (aj.DPMSolverPP(order=3), 2, [40, 80, 160, 320]),
    ],
    ids=repr,
)
def test_dpm_solver_pp_order_on_gaussian(sampler, order, ns):
    errs = ode_errors(GaussianProblem.make(4), sampler, aj.DTO(), ns)
    for name, e in errs.items():
        assert abs(slope(ns, e) - order) < 0.25, (name, slope(ns, e), e)


def test_dpm_solver_pp_taylor_third_order_on_mixture():
    """With the Taylor second difference, order 3 is third order on a nonlinear ε
    (on Gaussian data it converges even faster, at 4); diffusers' update is 2."""
    pb = MixtureProblem.make(2, std_range=(0.1, 0.3))
    sch = pb.schedule
    x_T = jnp.array([[0.3, -1.2], [2.0, 0.7]])
    truth = pb.reference(pb.params, x_T, None, sch.t_max, 1e-3)
    ns = [20, 40, 80]
    slopes = {}
    for third in ("taylor", "diffusers"):
        smp = aj.DPMSolverPP(order=3, lower_order_final=False, third_order=third)
        errs = [
            rel_err(
                aj.sample(pb.model, pb.params, x_T, schedule=sch,
                          ts=aj.time_grid(sch, n, t_end=1e-3), sampler=smp),
                truth,
            )
            for n in ns
        ]
        slopes[third] = slope(ns, errs)
    assert abs(slopes["taylor"] - 3) < 0.25, slopes
    assert slopes["diffusers"] < 2.25, slopes
    gaussian = GaussianProblem.make(4)
    ns = [10, 20, 40]
    errs = ode_errors(gaussian, aj.DPMSolverPP(order=3, third_order="taylor"), aj.DTO(), ns)
    assert all(slope(ns, e) > 2.75 for e in errs.values()), errs


def test_first_order_samplers_agree():
    """DPM-Solver++ order 1, DDIM(η = 0) and DPM-Solver-1 are one update in three
    forms."""
    pb = GaussianProblem.make(4)
    ts = aj.time_grid(pb.schedule, 12, t_end=1e-3)
    x_T = jnp.array([0.3, -1.2, 2.0, 0.7])
    out = [
        aj.sample(pb.model, pb.params, x_T, schedule=pb.schedule, ts=ts, sampler=s)
        for s in (aj.DPMSolver1(), aj.DDIM(), aj.DPMSolverPP(order=1))
    ]
    assert tree_allclose(out[0], out[1], rtol=1e-13, atol=1e-13)
    assert tree_allclose(out[0], out[2], rtol=1e-12, atol=1e-12)


def test_ddim_eta_one_is_exact_in_mean_on_gaussian_data():
    """DDIM(η = 1) is the DDPM posterior q(x_s | x_t, x̂_0), linear in x̂_0: with the
    exact x̂_0 of Gaussian data its mean map is the reverse SDE's exactly, so the
    (noise-independent) gradient of a linear loss is exact at any N — where
    SDE-DPM-Solver-1, a discretisation of the same SDE, is first order."""
    ns = [5, 20]
    pb = GaussianProblem.make(4)
    exact = sde_errors(pb, aj.DTO(), ns, default_key(), sampler=aj.DDIM(eta=1.0))
    first = sde_errors(pb, aj.DTO(), ns, default_key(), sampler=aj.SDEDPMSolver1())
    for name in exact:
        assert max(exact[name]) < 1e-12, (name, exact[name])
        assert min(first[name]) > 1e-5, (name, first[name])


# ---- exact gradients on endpoint grids ---------------------------------------------
PB = MLPProblem.make(jax.random.key(1), dim=3, width=8, cond_dim=2)
X_T = jax.random.normal(jax.random.key(2), (2, 3))
COND = jnp.array([0.3, -0.5])
N = 6
SD = aj.diffusers_schedule(
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
)
FLOW = aj.FlowMatching()
GRIDS = {
    # diffusers' grids: DDIM leading to ᾱ = 1, DPM-Solver linspace to σ = 0, flow
    # matching from σ = 1 to 0.
    "vp-to-zero": (SD, aj.diffusers_timesteps(
        {"_class_name": "DPMSolverMultistepScheduler"}, N)),
    "flow-1-to-0": (FLOW, aj.diffusers_timesteps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, N)),
}


def _model(schedule):
    # A velocity network on flow matching (so the step from α = 0 has its data
    # prediction), an ε-network otherwise.
    if schedule is FLOW:
        return aj.as_eps(PB.model, FLOW, "flow")
    return PB.model


def _loss(x0):
    return jnp.sum(jnp.sin(x0) + 0.3 * x0**2)


def _fd_check(f, args, seed=0, eps=1e-6):
    """Central differences along random directions equal the gradient's directional
    derivatives, for every argument."""
    grads = jax.grad(f, argnums=tuple(range(len(args))))(*args)
    rng = np.random.default_rng(seed)
    for i, (arg, g) in enumerate(zip(args, grads)):
        d = jtu.tree_map(lambda a: rng.standard_normal(np.shape(a)), arg)
        shift = lambda sign: [
            jtu.tree_map(lambda a, v: a + sign * eps * v, arg, d) if j == i else a
            for j, a in enumerate(args)
        ]
        fd = (float(f(*shift(1.0))) - float(f(*shift(-1.0)))) / (2 * eps)
        ad = sum(float(np.vdot(np.asarray(a), b))
                 for a, b in zip(jtu.tree_leaves(g), jtu.tree_leaves(d)))
        assert abs(fd - ad) <= 1e-6 * abs(ad) + 1e-9, (i, fd, ad)
    return grads


NEW_SAMPLERS = [
    aj.DPMSolverPP(),
    aj.DPMSolverPP(order=1),
    aj.DPMSolverPP(order=3, solver_type="heun", lower_order_final=False),
    aj.DPMSolverPP(order=3, third_order="taylor"),
    aj.DDIM(),
    aj.DDIM(eta=0.5),
    aj.DDIM(eta=1.0),
]


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("sampler", NEW_SAMPLERS, ids=repr)
def test_dto_gradients_match_finite_differences(sampler, grid):
    schedule, ts = GRIDS[grid]
    model = _model(schedule)

    @jax.jit
    def f(params, x_T, cond, *noise):
        return _loss(aj.sample(model, params, x_T, cond, schedule=schedule, ts=ts,
                               sampler=sampler, noise=noise[0] if noise else None))

    if not sampler.is_sde:
        _fd_check(f, (PB.params, X_T, COND))
        return
    args = (PB.params, X_T, COND, jax.random.normal(jax.random.key(5), (N, *X_T.shape)))
    grads = _fd_check(f, args)
    # The noise of the last step (to σ = 0) has no effect: its scale is 0.
    if grid == "vp-to-zero":
        assert np.all(np.asarray(grads[3][-1]) == 0)
    assert np.any(np.asarray(grads[3][:-1]) != 0)


def test_noise_gradient_of_continuous_adjoints_converges_to_dto():
    """AdjointDEIS and RecordedAdjoint return ∂L/∂noise from their continuous
    adjoint (the noise's scale times the adjoint at the end of its step); it
    converges to DTO's exact discrete gradient as the grid is refined."""
    pb = GaussianProblem.make(4)
    x_T = jnp.array([0.3, -1.2, 2.0, 0.7])
    w = jnp.array([1.0, -2.0, 0.5, 1.5])
    errs = {}
    for n in (40, 160):
        ts = aj.time_grid(pb.schedule, n, t_end=1e-3)
        noise = jax.random.normal(jax.random.key(7), (n, 4))

        def grad_noise(adjoint, smp=aj.DDIM(eta=1.0)):
            return jax.jit(jax.grad(lambda nz: jnp.sum(w * jnp.sin(aj.sample(
                pb.model, pb.params, x_T, schedule=pb.schedule, ts=ts, sampler=smp,
                adjoint=adjoint, noise=nz)))))(noise)

        exact = grad_noise(aj.DTO())
        for adj in (aj.AdjointDEIS(), aj.RecordedAdjoint()):
            errs.setdefault(repr(adj), []).append(rel_err(grad_noise(adj), exact))
    # First order: 4× the steps, about a quarter of the error (measured 0.235 →
    # 0.066 for AdjointDEIS).
    for name, (coarse, fine) in errs.items():
        assert fine < 0.35 * coarse, (name, coarse, fine)


# ---- every strategy on endpoint grids ----------------------------------------------
def _strategy_cases():
    # DTO's variants equal DTO on every grid (the matrix); its checkpointed forms
    # are enrolled here once.
    skip = {repr(aj.DTO()), repr(aj.DTO(checkpoints="steps"))}
    adjoints = [(a, e) for a, e in all_adjoints if repr(a) not in skip]
    return valid_pairs([aj.DPMSolver2(), aj.DDIM(eta=1.0)], adjoints)


_N_END = 24
_NOISE_END = jax.random.normal(jax.random.key(5), (_N_END, 2, 3))


@functools.cache
def _endpoint_grads(sampler, adjoint, truncate):
    """Gradients on the VP-linear grid ending at t = 0 (or without its last step)."""
    schedule = aj.VPLinear()
    ts = aj.time_grid(schedule, _N_END, t_end=0.0)
    noise = _NOISE_END if sampler.is_sde else None
    if truncate:
        ts, noise = ts[:-1], None if noise is None else noise[:-1]

    def loss(params, x, cond, nz):
        return _loss(aj.sample(PB.model, params, x, cond, schedule=schedule, ts=ts,
                               sampler=sampler, adjoint=adjoint, noise=nz))

    x_T = jax.random.normal(jax.random.key(2), (2, 3))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(PB.params, x_T, COND, noise)


@pytest.mark.parametrize(
    "case", _strategy_cases(), ids=lambda c: f"{c[0]!r}-{c[1]!r}"
)
def test_strategies_on_grids_ending_at_sigma_zero(case):
    """On a grid that ends at t = 0 every strategy that accepts the sampler gives a
    finite gradient; exact ones equal DTO's, and the continuous adjoints are as close
    to DTO as on the grid that stops at the last interior time (the endpoint step's
    VJP is exact)."""
    sampler, adjoint, exact = case
    g, g_dto = _endpoint_grads(sampler, adjoint, False), _endpoint_grads(
        sampler, aj.DTO(), False
    )
    assert all(np.all(np.isfinite(leaf)) for leaf in jtu.tree_leaves(g))
    if exact:
        assert tree_allclose(g, g_dto, rtol=1e-8, atol=1e-10)
        return
    # The same sampler and strategy on the grid without the final step to 0.
    err_zero = rel_err(g, g_dto)
    err_trunc = rel_err(_endpoint_grads(sampler, adjoint, True),
                        _endpoint_grads(sampler, aj.DTO(), True))
    assert err_zero < 1.5 * err_trunc + 1e-6, (err_zero, err_trunc)


def test_strategies_on_flow_matching_from_one():
    """A velocity model on flow matching, on diffusers' grid from t = 1 (α = 0) to 0.
    Exact strategies equal DTO. The continuous adjoints converge to the continuous
    gradient (AdjointDPM at a tight tolerance) on their own log-SNR backward grid,
    at their order. On the forward grid they stall (≈ 0.2 from N = 24 to 384 here):
    its last steps are O(1) in log-SNR until N ≫ 1000 (diffusers' grid is uniform in
    σ down to σ_min = 0.003), which AdjointDEIS' docstring says."""
    schedule, ts = GRIDS["flow-1-to-0"]
    model = _model(schedule)

    def grad(adjoint):
        return jax.jit(jax.grad(
            lambda p, x: _loss(aj.sample(model, p, x, COND, schedule=schedule, ts=ts,
                                         sampler=aj.DPMSolverPP(), adjoint=adjoint)),
            argnums=(0, 1)))(PB.params, X_T)

    dto = grad(aj.DTO())
    assert tree_allclose(grad(aj.DTO(checkpoints=2)), dto, rtol=1e-10, atol=1e-12)
    continuous = grad(aj.AdjointDPM(rtol=1e-9, atol=1e-9))
    errs = [rel_err(grad(aj.AdjointDEIS(order=2, num_steps=m)), continuous)
            for m in (96, 384)]
    assert errs[1] < errs[0] / 8, errs  # second order: 16× for 4× the steps
    # On the forward grid: the recorded and interpolated states give what the
    # re-solved ones give.
    # (RecordedAdjoint shares the endpoint machinery: tested on the VP grid above.)
    g = grad(aj.InterpolatedAdjoint(every=2))
    assert all(np.all(np.isfinite(leaf)) for leaf in jtu.tree_leaves(g))
    assert rel_err(g, grad(aj.AdjointDEIS())) < 0.1


def test_float32_endpoint_grid():
    """The endpoint steps stay finite in float32 and agree with float64."""
    ts = GRIDS["vp-to-zero"][1]
    f = lambda dtype: aj.sample(
        PB.model, jtu.tree_map(lambda a: a.astype(dtype), PB.params), X_T.astype(dtype),
        COND.astype(dtype), schedule=SD, ts=ts.astype(dtype), sampler=aj.DPMSolverPP())
    x32, x64 = f(jnp.float32), f(jnp.float64)
    assert x32.dtype == jnp.float32
    assert rel_err(x32, x64) < 1e-5


# ---- refusals -----------------------------------------------------------------------
def test_endpoint_refusals():
    schedule = aj.VPLinear()
    to_zero = aj.time_grid(schedule, 6, t_end=0.0)
    kw = dict(schedule=schedule, ts=to_zero)
    for sampler in (aj.ReversibleHeun(), aj.AsyncLeapfrog(), aj.SDEDPMSolver1(),
                    aj.McCallumFoster(aj.DPMSolver1())):
        with pytest.raises(ValueError, match=r"cannot take a grid that end at σ = 0"):
            aj.sample(PB.model, PB.params, X_T, COND, sampler=sampler,
                      key=default_key() if sampler.is_sde else None, **kw)
    # An ε-network cannot start at α = 0.
    flow_ts = GRIDS["flow-1-to-0"][1]
    with pytest.raises(ValueError, match="ε-prediction model cannot give the first"):
        aj.sample(PB.model, PB.params, X_T, COND, schedule=FLOW, ts=flow_ts,
                  sampler=aj.DPMSolverPP())
    # Continuous adjoints need the endpoints known when ts is traced.
    f = jax.jit(lambda ts: aj.sample(PB.model, PB.params, X_T, COND, schedule=schedule,
                                     ts=ts, sampler=aj.DPMSolver2(),
                                     adjoint=aj.AdjointDEIS()))
    with pytest.raises(Exception, match="pass `ts` as a concrete array"):
        f(to_zero)


def test_noise_validation():
    ts = aj.time_grid(aj.VPLinear(), 4, t_end=1e-3)
    kw = dict(schedule=aj.VPLinear(), ts=ts)
    with pytest.raises(ValueError, match=r"shape \(N, \*x.shape\) = \(4, 2, 3\)"):
        aj.sample(PB.model, PB.params, X_T, COND, sampler=aj.DDIM(eta=1.0),
                  noise=jnp.zeros((3, 2, 3)), **kw)
    with pytest.raises(ValueError, match="got both"):
        aj.sample(PB.model, PB.params, X_T, COND, sampler=aj.DDIM(eta=1.0),
                  noise=jnp.zeros((4, 2, 3)), key=default_key(), **kw)
    with pytest.raises(ValueError, match="is deterministic"):
        aj.sample(PB.model, PB.params, X_T, COND, sampler=aj.DDIM(),
                  noise=jnp.zeros((4, 2, 3)), **kw)
    with pytest.raises(ValueError, match="must lie in"):
        aj.DDIM(eta=1.5)
    with pytest.raises(ValueError, match="third_order"):
        aj.DPMSolverPP(order=3, third_order="exact")


def test_key_and_noise_agree():
    """`key=k` draws step i's noise as documented in `aj.sample`; passing those
    noises as `noise=` gives the same sample."""
    ts = aj.time_grid(aj.VPLinear(), 5, t_end=1e-3)
    kw = dict(schedule=aj.VPLinear(), ts=ts, sampler=aj.DDIM(eta=1.0))
    key = jax.random.key(3)
    # One leaf: its key is the first of `split(fold_in(key, i), 1)`.
    noise = jnp.stack([
        jax.random.normal(jax.random.split(jax.random.fold_in(key, i), 1)[0], X_T.shape)
        for i in range(5)
    ])
    a = aj.sample(PB.model, PB.params, X_T, COND, key=key, **kw)
    b = aj.sample(PB.model, PB.params, X_T, COND, noise=noise, **kw)
    assert tree_allclose(a, b, rtol=1e-13, atol=1e-13)


# ---- classifier-free guidance -------------------------------------------------------
def test_cfg_value_single_call_and_guidance_gradient():
    null = jnp.zeros(2)
    calls = []

    def model(params, x, t, cond):
        calls.append(jnp.shape(x))
        return PB.model(params, x, t, cond)

    x, t = X_T, jnp.asarray(0.5)
    for w in (0.0, 1.0, 7.5):
        guided = aj.cfg(model, w, null)
        expect = PB.model(PB.params, x, t, null) + w * (
            PB.model(PB.params, x, t, COND) - PB.model(PB.params, x, t, null))
        calls.clear()
        assert tree_allclose(guided(PB.params, x, t, COND), expect, rtol=1e-12)
        assert len(calls) == 1  # one (batched) evaluation

    # 128 steps: enough for the continuous adjoint to be close to DTO (at 8 steps it
    # is 67× off, the method's small-N behaviour).
    ts = aj.time_grid(aj.VPLinear(), 128, t_end=1e-3)

    def loss(w, adjoint):
        return _loss(aj.sample(aj.cfg(PB.model, w, null), PB.params, X_T, COND,
                               schedule=aj.VPLinear(), ts=ts, sampler=aj.DPMSolverPP(),
                               adjoint=adjoint))

    w0 = 3.0
    g = jax.jit(jax.grad(loss), static_argnums=1)(w0, aj.DTO())
    fd = (loss(w0 + 1e-6, aj.DTO()) - loss(w0 - 1e-6, aj.DTO())) / 2e-6
    assert abs(float(g) - float(fd)) < 1e-6 * abs(float(g))
    # The guidance scale is traced inside `jit`/`vmap` and differentiated by the
    # custom-gradient strategies too (AdjointDEIS approximates DTO).
    gs = jax.jit(jax.vmap(jax.grad(lambda w: loss(w, aj.AdjointDEIS()))))(
        jnp.array([1.0, w0]))
    assert np.all(np.isfinite(np.asarray(gs)))
    assert abs(float(gs[1]) - float(g)) < 0.15 * abs(float(g)), (gs, g)


def test_cfg_errors():
    with pytest.raises(ValueError, match="needs a conditioning `cond`"):
        aj.sample(aj.cfg(PB.model, 2.0, jnp.zeros(2)), PB.params, X_T,
                  schedule=aj.VPLinear(), ts=aj.time_grid(aj.VPLinear(), 3, t_end=1e-3),
                  sampler=aj.DPMSolver1())
