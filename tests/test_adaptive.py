"""`aj.adaptive_time_grid`: the error-controlled grid reaches the requested tolerance
on the closed-form Gaussian, compiles once across x_T values and tolerances, works
under `jit`, and its grid (a constant) gives DTO gradients equal to finite
differences; bad arguments are refused."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adjoint_jax as aj
from adjoint_jax.bench import GaussianProblem, MLPProblem

from .helpers import rel_err


PB = GaussianProblem.make(4)
SCH = PB.schedule
T_END = 1e-3
X_T = jnp.array([0.3, -1.2, 0.7, 2.0])


def _grid(x, tol, sampler=aj.ExpRK("tsit5"), model=PB.model, max_steps=96):
    return aj.adaptive_time_grid(model, PB.params, x, None, schedule=SCH,
                                 sampler=sampler, rtol=tol, atol=tol,
                                 max_steps=max_steps, t_end=T_END)


def test_reaches_the_tolerance_and_compiles_once():
    # Global error within a factor 10 of rtol = atol (measured 1.0–4.2 for tsit5
    # from 1e-3 to 1e-9: the controller bounds local errors, which add up), more
    # steps for a tighter tolerance, one compilation for every x_T and tolerance.
    traces = []

    def model(p, x, t, c):
        traces.append(None)
        return PB.model(p, x, t, c)

    sampler = aj.ExpRK("tsit5")
    counts = []
    for tol, x in ((1e-4, X_T), (1e-8, 0.5 * X_T), (1e-6, -X_T)):
        ts, n = _grid(x, tol, model=model)
        n = int(n)
        ts = np.asarray(ts)
        assert ts[0] == SCH.t_max and np.all(ts[n:] == T_END) and ts[n - 1] > T_END
        assert np.all(np.diff(ts[: n + 1]) < 0)
        exact = PB.flow_map(PB.params, x, None, SCH.t_max, T_END)
        x0 = aj.sample(PB.model, PB.params, x, None, schedule=SCH, ts=jnp.asarray(ts),
                       sampler=sampler)
        assert rel_err(x0, exact) < 10 * tol, (tol, rel_err(x0, exact))
        counts.append(n)
    assert counts[0] < counts[2] < counts[1]
    n_traces = len(traces)
    _grid(2.0 * X_T, 1e-5, model=model)
    assert len(traces) == n_traces


def test_under_jit_and_with_an_mlp_batch():
    # Inside jit (the grid of a batch: one error norm over every entry), equal to
    # the eager call; the grid's DTO gradient equals central finite differences.
    pb = MLPProblem.make(jax.random.key(0), dim=3, width=8, cond_dim=2)
    x_T = jax.random.normal(jax.random.key(1), (4, 3))
    cond = jnp.array([0.2, -0.4])
    kw = dict(schedule=pb.schedule, sampler=aj.ExpRK("bosh3"), rtol=1e-4, atol=1e-4,
              max_steps=48, t_end=1e-3)
    eager = aj.adaptive_time_grid(pb.model, pb.params, x_T, cond, **kw)
    jitted = jax.jit(lambda x: aj.adaptive_time_grid(pb.model, pb.params, x, cond,
                                                     **kw))(x_T)
    assert int(eager[1]) == int(jitted[1]) and 0 < int(eager[1]) < 48
    np.testing.assert_allclose(eager[0], jitted[0], rtol=1e-14)
    ts = eager[0]

    def loss(x):
        x0 = aj.sample(pb.model, pb.params, x, cond, schedule=pb.schedule, ts=ts,
                       sampler=aj.ExpRK("bosh3"), adjoint=aj.DTO())
        return jnp.sum(jnp.sin(x0))

    f = jax.jit(jax.value_and_grad(loss))
    _, g = f(x_T)
    d = jax.random.normal(jax.random.key(2), x_T.shape)
    h = 1e-6
    fd = (f(x_T + h * d)[0] - f(x_T - h * d)[0]) / (2 * h)
    assert abs(fd - jnp.vdot(g, d)) < 1e-7 * abs(fd)


def test_refusals():
    with pytest.raises(TypeError, match="embedded error estimate"):
        _grid(X_T, 1e-4, sampler=aj.ExpRK("rk4"))
    with pytest.raises(TypeError, match="embedded error estimate"):
        _grid(X_T, 1e-4, sampler=aj.DPMSolver2())
    with pytest.raises(ValueError, match="max_steps"):
        _grid(X_T, 1e-4, max_steps=0)
    with pytest.raises(ValueError, match="rtol and atol cannot both be 0"):
        _grid(X_T, 0.0)
    with pytest.raises(ValueError, match="must be constant over the solve"):
        aj.adaptive_time_grid(PB.model, PB.params, X_T, aj.Scheduled(jnp.zeros((3, 1))),
                              schedule=SCH, sampler=aj.ExpRK(), rtol=1e-3, atol=1e-3,
                              max_steps=8, t_end=T_END)
    with pytest.raises(ValueError, match="append 0 to the grid"):
        aj.adaptive_time_grid(PB.model, PB.params, X_T, None, schedule=SCH,
                              sampler=aj.ExpRK(), rtol=1e-3, atol=1e-3, max_steps=8,
                              t_end=0.0)
    with pytest.raises(eqx.EquinoxRuntimeError, match="raise max_steps"):
        jax.block_until_ready(_grid(X_T, 1e-9, max_steps=4))
