"""`ExpRK`: the tableaus' order conditions, the convergence orders of both forms on
the closed-form Gaussian and on the sharp mixture, the embedded error estimates,
zero-length steps, steps back and forth, validation, and `aj.sample` on grids to σ = 0.

Compile budget: one program per (tableau, form) and problem (the grids of all N are
padded to one length with repeated final times, i.e. zero-length steps, and run by
`lax.map`); the identity and round-trip checks run every configuration in one
program each."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adjoint_jax as aj
from adjoint_jax._samplers._exp_rk import _PHI, ExpRK, phi
from adjoint_jax._samplers._tableaus import TABLEAUS
from adjoint_jax.bench import GaussianProblem, MixtureProblem

from .helpers import rel_err, slope


T_END = 1e-3
XT = jnp.array([0.3, -1.2, 2.0, 0.7])
COND = jnp.array([0.1, -0.2, 0.3, 0.05])
CONFIGS = [(t, f) for t in TABLEAUS for f in ("lawson", "phi")
           if f == "lawson" or t in _PHI]


# --- order conditions (numpy, exact up to the float64 rounding of the constants) ---

def _trees(n):
    """The rooted trees with n nodes, each a sorted tuple of its child subtrees."""
    if n == 1:
        return [()]

    def forests(rem, largest):
        if rem == 0:
            yield ()
            return
        for k in range(min(rem, largest), 0, -1):
            for t in _trees(k):
                for rest in forests(rem - k, k):
                    yield (t,) + rest

    return sorted({tuple(sorted(f)) for f in forests(n - 1, n - 1)})


def _gamma(t):
    size = lambda u: 1 + sum(size(v) for v in u)
    g = size(t)
    for u in t:
        g *= _gamma(u)
    return g


def _residual(t, a, b):
    """b·Φ(t) − 1/γ(t), Φ the stage vector of the tree t."""
    def phi_vec(u):
        v = np.ones(a.shape[0])
        for w in u:
            v = v * (a @ phi_vec(w))
        return v
    return float(b @ phi_vec(t) - 1.0 / _gamma(t))


@pytest.mark.parametrize("name", list(TABLEAUS))
def test_order_conditions(name):
    """Every tree up to the order holds (17 trees at order 5); some tree of the next
    order fails, so the order is exact. Tsit5's printed digits hold to 1.5e-14."""
    tab = TABLEAUS[name]
    assert np.all(np.triu(tab.a) == 0)
    np.testing.assert_allclose(tab.a.sum(axis=1), tab.c, atol=1e-15)
    pairs = [(tab.b, tab.order)]
    if tab.b_hat is not None:
        pairs.append((tab.b_hat, tab.embedded_order))
        if tab.b[-1] == 0:  # FSAL: the last stage is at the solution
            np.testing.assert_array_equal(tab.a[-1, :-1], tab.b[:-1])
    for b, p in pairs:
        trees = [t for n in range(1, p + 1) for t in _trees(n)]
        worst = max(abs(_residual(t, tab.a, b)) for t in trees)
        assert worst < 5e-14, (name, p, worst)
        assert max(abs(_residual(t, tab.a, b)) for t in _trees(p + 1)) > 1e-5


def test_phi_functions_and_limits():
    """φ_k on both sides of the series switch against exact rational series (40
    terms of Σ z^j/(j + k)!, z as a Fraction), and every φ-form coefficient tends to
    its tableau's constant as h → 0."""
    from fractions import Fraction
    from math import factorial

    for z in (-3.0, -0.49, -1e-3, 0.0, 1e-3, 0.49, 0.51, 2.0):
        for k in (1, 2, 3):
            q = Fraction(z)
            exact = float(sum(q**j / factorial(j + k) for j in range(40)))
            np.testing.assert_allclose(float(phi(k, jnp.asarray(z))), exact, rtol=2e-14)
    h = jnp.asarray(1e-9)
    for name, fn in _PHI.items():
        tab = TABLEAUS[name]
        a, b, b_hat = fn(h)
        for (i, j), v in a.items():
            assert abs(float(v) - tab.a[i, j]) < 1e-8, (name, i, j)
        assert sum(1 for v in tab.a.flat if v != 0) <= len(a) + 1
        np.testing.assert_allclose([float(v) for v in b], tab.b[: len(b)], atol=1e-8)
        if b_hat is not None:
            np.testing.assert_allclose([float(v) for v in b_hat], tab.b_hat, atol=1e-8)


# --- convergence orders -------------------------------------------------------------

def _padded(schedule, ns):
    m = max(ns)
    rows = []
    for n in ns:
        ts = np.asarray(aj.time_grid(schedule, n, t_end=T_END))
        rows.append(np.concatenate([ts, np.full(m - n, ts[-1])]))
    return jnp.asarray(np.stack(rows))


def _solve_all(sampler, model, params, cond, schedule, x_T, grids):
    """x_0 on every (padded) grid, in one compiled program."""
    eps = lambda x, t: model(params, x, t, cond)

    def solve(ts):
        def body(x, tt):
            return sampler.step(eps, schedule, x, tt[0], tt[1], 0, None), None
        return jax.lax.scan(body, x_T, jnp.stack([ts[:-1], ts[1:]], axis=1))[0]

    return jax.jit(lambda g: jax.lax.map(solve, g))(grids)


# (tableau, form): (N on the Gaussian, its expected slope, two-sided?). Midpoint in
# Rex's form superconverges on the Gaussian: its ODE dy/dρ = ρ(y − m)/(s² + ρ²)
# makes the h³ term of the midpoint's local error vanish (series in h of one step
# against the exact √(s² + ρ²) growth: −h⁴ρ²s²/(8 (s² + ρ²)^{7/2})), so it is third
# order there. The 5(4) pairs converge faster than h⁵ over every N where their error
# is above round-off (slopes 5.3–11 on the Gaussian): a lower bound only.
GAUSS_NS = {
    "euler": ([16, 32, 64], 1), "midpoint": ([16, 32, 64], 2),
    "heun": ([16, 32, 64], 2),
    "dpm3": ([64, 128, 256], 3), "rk4": ([16, 32, 64], 4), "bosh3": ([16, 32, 64], 3),
    "dopri5": ([8, 16, 32], 5), "tsit5": ([8, 16, 32], 5),
}
SUPER = {("midpoint", "lawson"): 3}
LOWER_ONLY = {"dopri5", "tsit5"}


@pytest.mark.parametrize("config", CONFIGS, ids="-".join)
def test_order_gaussian(config):
    tab, form = config
    pb = GaussianProblem.make(4)
    sch = pb.schedule
    ns, order = GAUSS_NS[tab]
    order = SUPER.get(config, order)
    exact = pb.flow_map(pb.params, XT, COND, sch.t_max, T_END)
    xs = _solve_all(ExpRK(tab, form), pb.model, pb.params, COND, sch, XT,
                    _padded(sch, ns))
    errs = [rel_err(x, exact) for x in xs]
    p = slope(ns, errs)
    assert p > order - 0.25, (config, p, errs)
    if tab not in LOWER_ONLY:
        assert p < order + 0.25, (config, p, errs)


@functools.cache
def _mixture():
    pb = MixtureProblem.make(2)
    x_T = jax.random.normal(jax.random.key(0), (8, 2))
    ref = jax.jit(lambda x: pb.reference(pb.params, x, None, pb.schedule.t_max, T_END,
                                         rtol=1e-13, atol=1e-13))(x_T)
    return pb, x_T, ref


# On the sharp mixture (std 0.02–0.06) the fits start at N = 80, past the
# pre-asymptotic range (slopes 2.6–4.6 below). The 5(4) pairs reach the reference's
# floor (≈ 1e-12) by N = 160 while still converging faster than h⁵ (slopes 5–7
# from N = 40): a lower bound only, at N = 20–80.
MIX_NS = {"dopri5": [20, 40, 80], "tsit5": [20, 40, 80]}


@pytest.mark.parametrize("config", CONFIGS, ids="-".join)
def test_order_mixture(config):
    tab, form = config
    pb, x_T, ref = _mixture()
    ns = MIX_NS.get(tab, [80, 160, 320])
    order = TABLEAUS[tab].order
    xs = _solve_all(ExpRK(tab, form), pb.model, pb.params, None, pb.schedule, x_T,
                    _padded(pb.schedule, ns))
    errs = [rel_err(x, ref) for x in xs]
    p = slope(ns, errs)
    assert p > order - 0.25, (config, p, errs)
    if tab not in LOWER_ONLY:
        assert p < order + 0.25, (config, p, errs)


# --- embedded error estimates ---------------------------------------------------------

@pytest.mark.parametrize(
    "config", [c for c in CONFIGS if ExpRK(*c).has_error_estimate], ids="-".join
)
def test_error_estimate_matches_local_error(config):
    """One step t → t − δ from the exact Gaussian solution: the estimate err =
    x_s − x̂_s against the true local error of the embedded (lower-order) solution
    x̂_s − x(s). Since x_s is of higher order, err = −(x̂_s − x(s))(1 + O(δ)): the
    two point in opposite directions, the ratio |err|/|x̂_s − x(s)| is within 10% of
    1 at δ = 0.01 and at least 5× nearer 1 than at δ = 0.08 (not monotonically:
    tsit5's ratio passes through 1, 1.25 → 0.984 → 0.982 → 0.993 at δ = 0.0025).
    Measured at δ = 0.01: heun ≈ 1.04, bosh3 1.08, dopri5 0.998, tsit5 0.982."""
    pb = GaussianProblem.make(4)
    sch = pb.schedule
    smp = ExpRK(*config)
    eps = lambda x, t: pb.model(pb.params, x, t, COND)
    t = jnp.asarray(0.5)
    deltas = jnp.asarray([0.08, 0.04, 0.02, 0.01])

    def one(d):
        x_t = pb.flow_map(pb.params, XT, COND, sch.t_max, t)
        x_s, err = smp.advance_with_error(eps, sch, x_t, t, t - d)
        true = (x_s - err) - pb.flow_map(pb.params, XT, COND, sch.t_max, t - d)
        return jnp.linalg.norm(err) / jnp.linalg.norm(true), jnp.vdot(err, true)

    ratio, dot = jax.jit(jax.vmap(one))(deltas)
    off = np.abs(np.asarray(ratio) - 1)
    assert np.all(np.asarray(dot) < 0), dot  # opposite directions: err ≈ −true
    assert off[-1] < 0.1, (config, ratio)
    assert off[-1] < off[0] / 5, (config, ratio)


# --- zero-length steps, steps back and forth ------------------------------------------

def test_zero_length_steps_are_identities():
    """t == s (interior, at σ = 0, at t_max) returns x bitwise, with ∂x_s/∂x = I and
    ∂x_s/∂params = 0, finite, for every configuration (one compiled program)."""
    pb = GaussianProblem.make(4)
    sch = pb.schedule
    ts = jnp.asarray([0.3, 0.0, sch.t_max])

    def all_configs(params, x):
        eps = lambda y, t: pb.model(params, y, t, COND)
        out = []
        for config in CONFIGS:
            smp = ExpRK(*config)
            f = lambda p, y, t: smp.advance(
                lambda yy, tt: pb.model(p, yy, tt, COND), sch, y, t, t)
            val = jax.vmap(lambda t: f(params, x, t))(ts)
            jp, jx = jax.vmap(lambda t: jax.jacrev(f, argnums=(0, 1))(params, x, t))(ts)
            err = (smp.advance_with_error(eps, sch, x, ts[0], ts[0])[1]
                   if smp.has_error_estimate else jnp.zeros_like(x))
            out.append((val, jp, jx, err))
        return out

    results = jax.jit(all_configs)(pb.params, XT)
    for config, (val, jp, jx, err) in zip(CONFIGS, results):
        bits = np.broadcast_to(np.asarray(XT).view(np.int64), val.shape)
        assert np.array_equal(np.asarray(val).view(np.int64), bits), config
        np.testing.assert_array_equal(jx, np.broadcast_to(np.eye(4), jx.shape))
        for leaf in jax.tree.leaves(jp):
            np.testing.assert_array_equal(leaf, 0.0)
        np.testing.assert_array_equal(err, 0.0)


ROUND_TRIP = [(t, "lawson") for t in TABLEAUS] + [("dpm3", "phi"), ("rk4", "phi")]


def test_back_and_forth():
    """advance t → s (s > t, towards the noise) then s → t recovers x to O(δ^{p+1}):
    the fitted slope of the round-trip error over δ is at least p + 1 − 0.25, on a
    mixture, for every tableau in Rex's form and the φ forms of DPM-Solver-3 and
    ETDRK4 (the others coincide with or are as simple as their Lawson twins), in one
    compiled program."""
    pb = MixtureProblem.make(2, std_range=(0.1, 0.3))
    sch = pb.schedule
    x = jnp.array([0.4, -0.7])
    t = jnp.asarray(0.3)
    deltas = jnp.asarray([0.04, 0.02, 0.01])
    eps = lambda y, u: pb.model(pb.params, y, u, None)

    def all_configs(x):
        out = []
        for config in ROUND_TRIP:
            smp = ExpRK(*config)
            back = lambda d: smp.advance(eps, sch, smp.advance(eps, sch, x, t, t + d),
                                         t + d, t)
            out.append(jax.vmap(lambda d: jnp.linalg.norm(back(d) - x))(deltas))
        return out

    results = jax.jit(all_configs)(x)
    for config, errs in zip(ROUND_TRIP, results):
        errs = np.asarray(errs)
        p = TABLEAUS[config[0]].order
        assert np.all(errs > 0) and errs[0] < 1e-2, (config, errs)
        k = slope(1 / np.asarray(deltas), errs)
        assert k > p + 1 - 0.25, (config, k, errs)


# --- aj.sample, endpoints, validation ------------------------------------------

def test_sample_to_sigma_zero_and_euler_is_ddim():
    """Through `aj.sample` with `aj.DTO()`: a grid ending at t = 0 (last step the
    data prediction) gives finite x_0 and gradients; Euler (either form) is
    DPM-Solver-1 to round-off; a flow grid from α = 0 is refused."""
    pb = GaussianProblem.make(4)
    sch = pb.schedule
    ts = jnp.concatenate([aj.time_grid(sch, 6, t_end=1e-3), jnp.zeros(1)])

    def loss(p, x, smp):
        return jnp.sum(aj.sample(pb.model, p, x, COND, schedule=sch, ts=ts, sampler=smp,
                                 adjoint=aj.DTO()) ** 2)

    val, grads = jax.value_and_grad(loss, argnums=(0, 1))(pb.params, XT, ExpRK("rk4"))
    assert np.isfinite(val)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    ts = aj.time_grid(sch, 6, t_end=1e-3)
    ref = aj.sample(pb.model, pb.params, XT, COND, schedule=sch, ts=ts,
                    sampler=aj.DPMSolver1())
    for form in ("lawson", "phi"):
        x0 = aj.sample(pb.model, pb.params, XT, COND, schedule=sch, ts=ts,
                       sampler=ExpRK("euler", form))
        np.testing.assert_allclose(x0, ref, rtol=1e-12)
    flow = aj.FlowMatching()
    with pytest.raises(Exception, match="start at α = 0"):
        aj.sample(lambda p, x, t, c: x, None, XT, None, schedule=flow,
                  ts=jnp.asarray([1.0, 0.5, 0.1]), sampler=ExpRK("heun"))


def test_validation():
    with pytest.raises(ValueError, match="tableau=.*'tsit5'"):
        ExpRK("rk5")
    with pytest.raises(ValueError, match="form=.*'lawson'"):
        ExpRK("rk4", "exponential")
    with pytest.raises(ValueError, match="'tsit5'.*form='phi'.*'dpm3'"):
        ExpRK("tsit5", "phi")
    with pytest.raises(ValueError, match="'rk4'.*no embedded.*'dopri5'"):
        ExpRK("rk4").advance_with_error(None, aj.VPLinear(), XT, 0.5, 0.4)
    assert ExpRK().resolved_form == "lawson" and ExpRK("rk4").resolved_form == "phi"
    assert ExpRK("midpoint").resolved_form == "lawson"
    assert [ExpRK(t).evals_per_step for t in TABLEAUS] == [1, 2, 2, 3, 4, 6, 6, 3]
