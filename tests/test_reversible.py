"""The reversible samplers (ReversibleHeun, AsyncLeapfrog, McCallumFoster, BELM,
BDIA, EDICT) and ReversibleAdjoint: state reconstruction, exactness against DTO,
convergence order, evaluation counts, O(1) memory, transforms and input validation;
and the MixtureProblem they are measured on."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import adjoint_jax as aj
from adjoint_jax.bench import GaussianProblem, MixtureProblem, MLPProblem, count_evals, parse

from .helpers import rel_err, sample_kwargs, slope


REVERSIBLE = [
    aj.ReversibleHeun(),
    aj.AsyncLeapfrog(),
    aj.McCallumFoster(aj.DPMSolver1()),
    aj.McCallumFoster(aj.DPMSolver2()),
    aj.McCallumFoster(aj.DPMSolver2(), coupling=0.9),
    aj.BELM(),
    aj.BDIA(),
    aj.EDICT(),
]
# The samplers whose exactness, evaluation counts and memory are checked (the
# coupling variant shares its class's backward pass).
EXACT = [s for s in REVERSIBLE if s != aj.McCallumFoster(aj.DPMSolver2(), coupling=0.9)]
T_END = 1e-3


def _mlp():
    return MLPProblem.make(jax.random.key(1), dim=3, width=16, cond_dim=2)


def _loss(x0):
    return jnp.sum(jnp.sin(x0) + 0.3 * x0**2)


@eqx.filter_jit
def _roundtrip(sampler, problem, n, params, x_T, cond):
    """The sampler state before step 0, the state after step N, and the state before
    step 0 recovered from it by `step_back`, step by step."""
    sch = problem.schedule
    ts = aj.time_grid(sch, n, t_end=T_END)
    eps = lambda x, t: problem.model(params, x, t.astype(x.dtype), cond)
    xs = (ts[:-1], ts[1:], jnp.arange(n, dtype=jnp.int32))
    state0 = sampler.init(x_T, sch, ts)
    final, _ = jax.lax.scan(
        lambda st, a: (sampler.step(eps, sch, st, *a, None), None), state0, xs
    )
    back, _ = jax.lax.scan(
        lambda st, a: (sampler.step_back(eps, eps, sch, st, *a, None), None),
        final,
        xs,
        reverse=True,
    )
    return state0, final, back


# ---- reconstruction -----------------------------------------------------------------
@pytest.mark.parametrize("sampler", REVERSIBLE, ids=repr)
def test_backward_pass_recovers_x_T(sampler, getkey):
    # On the sharp Gaussian mixture (nonlinear ε); the MLP model is covered by the
    # exactness test below, which reconstructs every state.
    pb, cond = MixtureProblem.make(2), None
    x_T = jax.random.normal(getkey(), (8, 2))
    state0, final, back = _roundtrip(sampler, pb, 40, pb.params, x_T, cond)
    assert rel_err(sampler.output(back), x_T) < 1e-10
    # Every slot of the state (x̂, ε̂, v, c) comes back, placeholders included.
    for a, b in zip(jtu.tree_leaves(back), jtu.tree_leaves(state0)):
        assert float(jnp.max(jnp.abs(a - b))) < 1e-10 * float(jnp.max(jnp.abs(x_T)))
    assert rel_err(sampler.output(final), x_T) > 0.1  # it did go somewhere


def test_bdia_gamma_below_one_amplifies_round_off(getkey):
    """BDIA(γ < 1) divides by γ in every inverse step: exact on short solves, and its
    reconstruction error grows like γ^(−N) (as its docstring says)."""
    pb, sampler = MixtureProblem.make(2), aj.BDIA(gamma=0.5)
    x_T = jax.random.normal(getkey(), (8, 2))
    errs = []
    for n in (10, 40):
        _, _, back = _roundtrip(sampler, pb, n, pb.params, x_T, None)
        errs.append(rel_err(sampler.output(back), x_T))
    assert errs[0] < 1e-10 and errs[1] > 1e3 * errs[0], errs


@pytest.mark.parametrize("sampler", REVERSIBLE, ids=repr)
def test_step_back_inverts_one_step(sampler, getkey):
    # One middle step, from a state whose auxiliary slots (x̂, v, c) are arbitrary;
    # reversible Heun's ε̂ is a cache of ε(x̂), so it is kept consistent.
    pb = _mlp()
    sch = pb.schedule
    ts = aj.time_grid(sch, 10, t_end=T_END)
    eps = lambda x, t: pb.model(pb.params, x, t, None)
    like = sampler.init(jnp.zeros((2, 3)), sch, ts)
    # Random x-shaped slots; a two-step sampler's copy of the grid stays the grid.
    state = jtu.tree_map(
        lambda a: jax.random.normal(getkey(), a.shape) if a.shape == (2, 3) else a, like
    )
    if isinstance(sampler, aj.ReversibleHeun):
        state = (state[0], state[1], eps(state[1], ts[4]))
    i = jnp.array(4, jnp.int32)
    step = jax.jit(sampler.step, static_argnums=0)
    step_back = jax.jit(sampler.step_back, static_argnums=(0, 1))
    new = step(eps, sch, state, ts[4], ts[5], i, None)
    back = step_back(eps, eps, sch, new, ts[4], ts[5], i, None)
    for a, b in zip(jtu.tree_leaves(back), jtu.tree_leaves(state)):
        assert rel_err(a, b) < 1e-12


# ---- exactness ----------------------------------------------------------------------
# Constant conditioning here; scheduled conditioning is compared with DTO at the same
# tolerance for every reversible sampler by tests/test_matrix.py.
@pytest.mark.parametrize("sampler", EXACT, ids=repr)
@pytest.mark.parametrize("scheduled", [False], ids=["const"])
def test_reversible_adjoint_equals_dto(sampler, scheduled, getkey):
    pb, n = _mlp(), 8
    x_T = jax.random.normal(getkey(), (2, 3))
    cond = jax.random.normal(getkey(), (n, 2) if scheduled else (2,))
    cond = aj.Scheduled(cond) if scheduled else cond

    def grads(adjoint, *args):
        kw = sample_kwargs(pb.schedule, n, sampler, adjoint)
        f = lambda p, x, c: _loss(aj.sample(pb.model, p, x, c, **kw))
        return jax.value_and_grad(f, argnums=(0, 1, 2))(*args)

    both = jax.jit(lambda *a: (grads(aj.ReversibleAdjoint(), *a), grads(aj.DTO(), *a)))
    (v_rev, g_rev), (v_dto, g_dto) = both(pb.params, x_T, cond)
    assert abs(v_rev - v_dto) < 1e-13 * abs(v_dto)
    assert jtu.tree_structure(g_rev) == jtu.tree_structure(g_dto)
    for a, b in zip(jtu.tree_leaves(g_rev), jtu.tree_leaves(g_dto)):
        assert rel_err(a, b) < 1e-8, (rel_err(a, b),)


def test_vmap_grad_and_float32(getkey):
    pb = _mlp()
    kw = sample_kwargs(pb.schedule, 10, aj.AsyncLeapfrog(), aj.ReversibleAdjoint())
    gp = jax.jit(jax.grad(lambda p, x: _loss(aj.sample(pb.model, p, x, None, **kw)), 1))
    x_T = jax.random.normal(getkey(), (3, 3))
    looped = jnp.stack([gp(pb.params, x) for x in x_T])
    batched = jax.jit(jax.vmap(gp, (None, 0)))(pb.params, x_T)
    np.testing.assert_allclose(batched, looped, rtol=1e-12)
    # float32 model and state: the gradient stays float32 and close to float64.
    p32 = jtu.tree_map(lambda a: a.astype(jnp.float32), pb.params)
    g32 = gp(p32, x_T[0].astype(jnp.float32))
    assert g32.dtype == jnp.float32
    assert rel_err(g32.astype(jnp.float64), looped[0]) < 1e-4


# ---- order --------------------------------------------------------------------------
def _x0_errors(problem, sampler, ns, x_T, reference):
    """Relative errors of x_0 for each N in `ns`. One compilation for all N: the grid
    is padded to max(ns) + 1 and the steps run in a `fori_loop` of traced length."""
    sch = problem.schedule
    eps = lambda x, t: problem.model(problem.params, x, t, None)

    @jax.jit
    def run(ts, n):
        def body(i, state):
            return sampler.step(eps, sch, state, ts[i], ts[i + 1], i, None)

        return sampler.output(jax.lax.fori_loop(0, n, body, sampler.init(x_T, sch, ts)))

    size = max(ns) + 1
    errs = []
    for n in ns:
        ts = aj.time_grid(sch, n, t_end=T_END)
        ts = jnp.concatenate([ts, jnp.full((size - n - 1,), T_END)])
        errs.append(rel_err(run(ts, jnp.int32(n)), reference))
    return errs


GAUSSIAN_ORDERS = [
    (aj.ReversibleHeun(), 2),
    (aj.McCallumFoster(aj.DPMSolver1()), 1),
    (aj.McCallumFoster(aj.DPMSolver2()), 2),
    # Asynchronous leapfrog is second order, but on Gaussian data its h³ local error
    # −h³(x''' + 3 F_y x'')/24 vanishes identically: in ρ the solution is
    # y − m ∝ √(s² + ρ²) with F_y = ρ/(s² + ρ²), and x''' = −3 F_y x''. Measured: 4.0
    # (its second order shows on the mixture below).
    (aj.AsyncLeapfrog(), 4),
    (aj.BELM(), 2),
    (aj.BDIA(), 2),
    (aj.BDIA(gamma=0.5), 1),
    (aj.EDICT(), 1),
]


@pytest.mark.parametrize("case", GAUSSIAN_ORDERS, ids=lambda c: repr(c[0]))
def test_order_against_closed_form_gaussian(case):
    sampler, order = case
    pb = GaussianProblem.make(4)
    x_T = jnp.array([0.3, -1.2, 2.0, 0.7])
    exact = pb.flow_map(pb.params, x_T, None, pb.schedule.t_max, T_END)
    ns = [40, 80, 160, 320]
    errs = _x0_errors(pb, sampler, ns, x_T, exact)
    assert abs(slope(ns, errs) - order) < 0.25, (slope(ns, errs), errs)
    # The gradient of ReversibleAdjoint is DTO's (above), whose order against the
    # closed form is tested for every sampler of `ode_samplers` in
    # test_convergence_dto.py.


MIXTURE_ORDERS = [
    (aj.ReversibleHeun(), 2),
    (aj.AsyncLeapfrog(), 2),
    (aj.McCallumFoster(aj.DPMSolver1()), 1),
    (aj.McCallumFoster(aj.DPMSolver2()), 2),
    (aj.BELM(), 2),
    # BDIA and EDICT are pre-asymptotic at N = 80 on the sharp mixture (BDIA's error
    # falls 22× from 80 to 160, EDICT's only 1.5×): their fits start at 160.
    (aj.BDIA(), 2, [160, 320, 640]),
    (aj.EDICT(), 1, [160, 320, 640]),
]


@functools.cache
def _mixture_truth():
    pb = MixtureProblem.make(2)
    x_T = jax.random.normal(jax.random.key(0), (8, 2))
    ref = jax.jit(lambda x: pb.reference(pb.params, x, None, pb.schedule.t_max, T_END))
    return pb, x_T, ref(x_T)


@pytest.mark.parametrize("case", MIXTURE_ORDERS, ids=lambda c: repr(c[0]))
def test_order_against_mixture_reference(case):
    # Sharp components (std 0.02-0.06): pre-asymptotic below N ≈ 80 for reversible
    # Heun (its error is 0.5 at N = 10), so the fit starts at 80.
    sampler, order, *ns = case
    pb, x_T, ref = _mixture_truth()
    ns = ns[0] if ns else [80, 160, 320, 640]
    errs = _x0_errors(pb, sampler, ns, x_T, ref)
    assert abs(slope(ns, errs) - order) < 0.25, (slope(ns, errs), errs)


# ---- memory -------------------------------------------------------------------------
def _temp_bytes(adjoint, sampler, n):
    pb = MLPProblem.make(jax.random.key(0), dim=16, width=256, cond_dim=2)
    x_T = jnp.zeros((64, 16))
    kw = sample_kwargs(pb.schedule, n, sampler, adjoint)
    f = jax.jit(jax.grad(lambda p: _loss(aj.sample(pb.model, p, x_T, None, **kw))))
    return f.lower(pb.params).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("sampler", [aj.ReversibleHeun(), aj.BELM()], ids=repr)
def test_memory_is_flat_in_n(sampler):
    small = _temp_bytes(aj.ReversibleAdjoint(), sampler, 16)
    large = _temp_bytes(aj.ReversibleAdjoint(), sampler, 128)
    assert abs(large - small) <= 0.1 * small, (small, large)
    if isinstance(sampler, aj.ReversibleHeun):
        # ... whereas DTO stores every step (the measurement can see growth).
        assert _temp_bytes(aj.DTO(), sampler, 128) > 4 * large


# ---- evaluation counts --------------------------------------------------------------
@pytest.mark.parametrize(
    "sampler", [s for s in EXACT if s not in (aj.BDIA(), aj.McCallumFoster(aj.DPMSolver1()))],
    ids=repr,
)
def test_evaluation_counts(sampler):
    """Forward: N · evals_per_step (+1 start-up evaluation for reversible Heun and
    leapfrog). Backward of ReversibleAdjoint: one VJP per forward evaluation and no
    other evaluation for every sampler with a fused rebuild (all of them now); a
    separate rebuild would pay its step_back evaluations on top."""
    pb, n = _mlp(), 6
    x_T = jnp.ones((2, 3))
    kw = sample_kwargs(pb.schedule, n, sampler, aj.ReversibleAdjoint())
    startup = int(isinstance(sampler, (aj.ReversibleHeun, aj.AsyncLeapfrog)))
    fwd = n * sampler.evals_per_step + startup
    sample = count_evals(lambda m, p: aj.sample(m, p, x_T, None, **kw), pb.model, pb.params)
    assert (sample.forward, sample.vjp) == (fwd, 0)
    grad = count_evals(
        lambda m, p: jax.grad(lambda p: _loss(aj.sample(m, p, x_T, None, **kw)))(p),
        pb.model, pb.params,
    )
    if sampler.rebuild == "separate":
        assert (grad.forward, grad.vjp) == (fwd + fwd + n * sampler.evals_per_step, fwd)
    else:
        assert (grad.forward, grad.vjp) == (2 * fwd, fwd)


# ---- validation ---------------------------------------------------------------------
def _kw(sampler, adjoint, pb=None):
    pb = pb or GaussianProblem.make(4)
    return sample_kwargs(pb.schedule, 5, sampler, adjoint, key=jax.random.key(0))


def test_non_reversible_sampler_is_refused():
    pb = GaussianProblem.make(4)
    msg = (
        r"`adjoint=ReversibleAdjoint\(\)` requires a reversible sampler "
        r"\(aj.BELM, aj.BDIA, aj.AsyncLeapfrog, aj.ReversibleHeun, aj.EDICT, "
        r"aj.McCallumFoster\); got "
        r"`sampler=DPMSolver1\(\)`."
    )
    with pytest.raises(ValueError, match=msg):
        aj.sample(pb.model, pb.params, jnp.ones(4), None,
                  **_kw(aj.DPMSolver1(), aj.ReversibleAdjoint()))
    with pytest.raises(ValueError, match=r"got `sampler=SDEDPMSolver1\(\)`"):
        aj.sample(pb.model, pb.params, jnp.ones(4), None,
                  **_kw(aj.SDEDPMSolver1(), aj.ReversibleAdjoint()))


def test_time_grid_gradient_is_refused():
    pb = GaussianProblem.make(4)
    ts = aj.time_grid(pb.schedule, 5, t_end=T_END)

    def f(ts):
        return jnp.sum(aj.sample(pb.model, pb.params, jnp.ones(4), None,
                                 schedule=pb.schedule, ts=ts,
                                 sampler=aj.ReversibleHeun(),
                                 adjoint=aj.ReversibleAdjoint()))

    f(ts)  # fine without differentiating ts
    with pytest.raises(ValueError, match="cannot differentiate with respect to the ti"):
        jax.grad(f)(ts)


def test_mccallum_foster_validation():
    with pytest.raises(ValueError, match="SDE sampler's steps cannot be inverted"):
        aj.McCallumFoster(aj.SDEDPMSolver1())
    with pytest.raises(ValueError, match="already reversible"):
        aj.McCallumFoster(aj.ReversibleHeun())
    with pytest.raises(ValueError, match=r"coupling=...\)` must lie in \(0, 1\]"):
        aj.McCallumFoster(aj.DPMSolver1(), coupling=0.0)
    with pytest.raises(ValueError, match=r"coupling"):
        aj.McCallumFoster(aj.DPMSolver1(), coupling=1.5)
    with pytest.raises(TypeError, match="needs an `aj` sampler"):
        aj.McCallumFoster("ddim")

    class TwoSlot(aj.AbstractSampler):  # an explicit sampler with extra state
        order = 1
        is_sde = False
        evals_per_step = 1

        def init(self, x_T, schedule, ts):
            return (x_T, x_T)

        def step(self, eps, schedule, state, t, s, i, key):
            return state

        def output(self, state):
            return state[0]

    # A base without the multistep `update` interface is refused at construction.
    with pytest.raises(ValueError, match="evaluates ε once and reuses at most one"):
        aj.McCallumFoster(TwoSlot())
    with pytest.raises(TypeError, match=r"got the class .*DPMSolver2.*parentheses"):
        aj.McCallumFoster(aj.DPMSolver2)
    mf = aj.McCallumFoster(aj.DPMSolver2(), coupling=0.99)
    assert (mf.order, mf.evals_per_step, mf.is_sde) == (2, 2, False)
    assert aj.McCallumFoster(aj.DPMSolver1()).order == 1


def test_parse_from_text():
    smp = parse("McCallumFoster(DPMSolver2(), coupling=0.99)", "sampler")
    assert smp == aj.McCallumFoster(aj.DPMSolver2(), coupling=0.99)
    assert parse("aj.AsyncLeapfrog", "sampler") == aj.AsyncLeapfrog()
    assert parse("ReversibleAdjoint", "adjoint") == aj.ReversibleAdjoint()
    assert parse(repr(aj.ReversibleHeun()), "sampler") == aj.ReversibleHeun()


# ---- the mixture problem ------------------------------------------------------------
def test_mixture_eps_is_the_scaled_score(getkey):
    pb = MixtureProblem.make(3, num_components=3)
    sch = pb.schedule
    c = jnp.array([0.1, -0.2, 0.05])

    def log_p(x, t):
        a, sg = sch.alpha(t), sch.sigma(t)
        m = pb.means + c[None]
        v = a**2 * pb.stds**2 + sg**2
        lw = jax.nn.log_softmax(pb.logits)
        sq = jnp.sum((x[None, :] - a * m) ** 2, axis=-1)
        log_n = -1.5 * jnp.log(2 * jnp.pi * v) - sq / (2 * v)
        return jax.scipy.special.logsumexp(lw + log_n)

    x = jax.random.normal(getkey(), (5, 3))
    ts = jnp.array([0.002, 0.05, 0.5])
    eps = jax.jit(jax.vmap(lambda t: pb.model(pb.params, x, t, c)))(ts)
    score = jax.jit(jax.vmap(jax.vmap(jax.grad(log_p), (0, None)), (None, 0)))(x, ts)
    sigma = pb.schedule.sigma(ts)[:, None, None]
    np.testing.assert_allclose(eps, -sigma * score, rtol=1e-10, atol=1e-12)
    # Batch-aware: the same per point.
    one = pb.model(pb.params, x[2], ts[1], c)
    np.testing.assert_allclose(one, eps[1, 2], rtol=1e-13)
    assert pb.stds.min() >= 0.02 and pb.stds.max() <= 0.06


def test_mixture_reference_is_converged():
    pb, x_T, ref = _mixture_truth()
    tighter = pb.reference(pb.params, x_T, None, pb.schedule.t_max, T_END,
                           rtol=1e-12, atol=1e-12)
    assert rel_err(ref, tighter) < 1e-9
    # The samples land near the components (sharp data) ...
    d = jnp.min(jnp.linalg.norm(ref[:, None, :] - pb.means[None], axis=-1), axis=1)
    assert float(jnp.max(d)) < 0.25
    # (The samplers converge to it at their orders: see the mixture order test.)


@pytest.mark.parametrize("sampler", [aj.AsyncLeapfrog()], ids=repr)
def test_first_step_outside_the_scan(sampler, getkey):
    """A sampler with a start-up evaluation runs step 0 outside `aj.sample`'s scan
    (the other steps then skip the `lax.cond`): the sample equals the plain loop of
    `step`, and every DTO variant and the recorded adjoint see the same solve."""
    pb, n = _mlp(), 6
    x_T = jax.random.normal(getkey(), (2, 3))
    cond = jax.random.normal(getkey(), (2,))
    _, final, _ = _roundtrip(sampler, pb, n, pb.params, x_T, cond)
    kw = lambda adj: sample_kwargs(pb.schedule, n, sampler, adj)
    x0 = aj.sample(pb.model, pb.params, x_T, cond, **kw(aj.DTO()))
    np.testing.assert_allclose(x0, sampler.output(final), rtol=1e-13)
    grad = lambda adj: jax.jit(jax.grad(
        lambda x: _loss(aj.sample(pb.model, pb.params, x, cond, **kw(adj)))))(x_T)
    ref = grad(aj.DTO())
    for adj in [aj.DTO(checkpoints="steps"), aj.ReversibleAdjoint()]:
        assert rel_err(grad(adj), ref) < 1e-10, adj


def test_two_step_and_edict_validation():
    for bad in (0, 0.0, 1.5, True, "1"):
        with pytest.raises(ValueError, match=r"`BDIA\(gamma=...\)` must be a number in"):
            aj.BDIA(gamma=bad)
        with pytest.raises(ValueError, match=r"`EDICT\(mix=...\)` must be a number in"):
            aj.EDICT(mix=bad)
