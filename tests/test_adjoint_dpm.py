"""AdjointDPM: the closed-form Gaussian gradients (constant and time-scheduled
conditioning) and second derivatives (jvp-of-grad, `jax.hessian`), the tolerance
controls the error, convergence to DTO on a nonlinear model, float32, a state mixing
float32 and float64 leaves, no tracer kept alive by its traces, and input
validation."""

import os
import subprocess
import sys

import diffrax
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import pytest

import adjoint_jax as aj
from adjoint_jax.bench import GaussianProblem, MLPProblem

from .helpers import rel_err, sample_kwargs, slope


T_END = 1e-3
W = jnp.array([1.0, -2.0, 0.5, 1.5])
XT = jnp.array([0.3, -1.2, 2.0, 0.7])
COND = jnp.array([0.1, -0.2, 0.3, 0.05])


def _loss(x0):
    return jnp.sum(W * jnp.sin(x0)) + 0.5 * jnp.sum(x0**2)


def _gaussian_errors(adjoint, n=100):
    """Relative errors of the x_T, μ, s and c gradients against the closed form.

    The forward pass is asynchronous leapfrog, which is 4th order on Gaussian data
    (x_0 to 1e-10 at N = 100, see test_reversible.py), so what is measured is the
    backward solve."""
    pb = GaussianProblem.make(4)
    sch = pb.schedule

    def exact(p, x, c):
        return _loss(pb.flow_map(p, x, c, sch.t_max, T_END))

    g_exact = jax.grad(exact, argnums=(0, 1, 2))(pb.params, XT, COND)
    kw = sample_kwargs(sch, n, aj.AsyncLeapfrog(), adjoint)
    f = lambda p, x, c: _loss(aj.sample(pb.model, p, x, c, **kw))
    gp, gx, gc = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(pb.params, XT, COND)
    return {
        "x_T": rel_err(gx, g_exact[1]),
        "mu": rel_err(gp["mu"], g_exact[0]["mu"]),
        "s": rel_err(gp["s"], g_exact[0]["s"]),
        "cond": rel_err(gc, g_exact[2]),
    }


def test_matches_closed_form_gaussian():
    errs = _gaussian_errors(aj.AdjointDPM(rtol=1e-8, atol=1e-8))
    assert max(errs.values()) < 1e-5, errs  # measured ≤ 5e-10


def test_tolerance_sets_the_error():
    # Against a tight solve of the same adjoint ODE from the same x_0. With N = 10
    # intervals the solver needs several steps per interval, so the tolerance and not
    # the interval length decides (measured: 2e-5 at 1e-4, 5e-7 at 1e-6).
    pb = GaussianProblem.make(4)

    def grad_x_T(tol):
        kw = sample_kwargs(pb.schedule, 10, aj.AsyncLeapfrog(),
                           aj.AdjointDPM(rtol=tol, atol=tol))
        f = lambda x: _loss(aj.sample(pb.model, pb.params, x, COND, **kw))
        return jax.jit(jax.grad(f))(XT)

    ref = grad_x_T(1e-11)
    e4, e6 = rel_err(grad_x_T(1e-4), ref), rel_err(grad_x_T(1e-6), ref)
    assert e4 < 1e-3 and e6 < 1e-5 and e4 > 10 * e6, (e4, e6)


def test_scheduled_cond_matches_closed_form_gaussian(getkey):
    # z_i shifts the mean on step i only. The truth chains the exact flow map interval
    # by interval. With a linear loss the Gaussian adjoint does not depend on the
    # state, so the forward sampler's own error (DPM-Solver-2, N = 40) does not enter
    # the x_T, μ and z_i gradients: they measure the backward solve alone.
    pb = GaussianProblem.make(4)
    sch, n = pb.schedule, 40
    ts = aj.time_grid(sch, n, t_end=T_END)
    z = 0.3 * jax.random.normal(getkey(), (n, 4))

    def exact(p, x, zs):
        def body(x, a):
            t, s, zi = a
            return pb.flow_map(p, x, zi, t, s), None

        return jnp.sum(W * jax.lax.scan(body, x, (ts[:-1], ts[1:], zs))[0])

    gp_e, gx_e, gz_e = jax.grad(exact, argnums=(0, 1, 2))(pb.params, XT, z)
    kw = dict(schedule=sch, ts=ts, sampler=aj.DPMSolver2(),
              adjoint=aj.AdjointDPM(rtol=1e-8, atol=1e-8))
    f = lambda p, x, zs: jnp.sum(W * aj.sample(pb.model, p, x, aj.Scheduled(zs), **kw))
    gp, gx, gz = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(pb.params, XT, z)
    assert rel_err(gx, gx_e) < 1e-5
    assert rel_err(gp["mu"], gp_e["mu"]) < 1e-5
    assert rel_err(gz, gz_e) < 1e-5
    # Every step's own gradient, not just their sum.
    row = jnp.linalg.norm(gz - gz_e, axis=1) / jnp.linalg.norm(gz_e, axis=1)
    assert float(jnp.max(row)) < 1e-5


def test_converges_to_dto_on_mlp_at_the_sampler_order(getkey):
    # The continuous gradient differs from the discrete one by the sampler's error:
    # O(h²) for DPM-Solver-2.
    pb = MLPProblem.make(jax.random.key(1), dim=3, width=16, cond_dim=2)
    x_T = jax.random.normal(getkey(), (2, 3))
    cond = jax.random.normal(getkey(), (2,))
    loss = lambda x0: jnp.sum(jnp.sin(x0) + 0.3 * x0**2)
    ns, errs = [40, 160], []
    for n in ns:
        def grads(adjoint, *args):
            kw = sample_kwargs(pb.schedule, n, aj.DPMSolver2(), adjoint)
            f = lambda p, x, c: loss(aj.sample(pb.model, p, x, c, **kw))
            return jax.grad(f, argnums=(0, 1, 2))(*args)

        both = jax.jit(lambda *a: (grads(aj.DTO(), *a),
                                   grads(aj.AdjointDPM(rtol=1e-8, atol=1e-8), *a)))
        g_dto, g_dpm = both(pb.params, x_T, cond)
        errs.append(max(rel_err(a, b) for a, b in zip(g_dpm, g_dto)))
    assert abs(slope(ns, errs) - 2) < 0.25, errs
    assert errs[-1] < 1e-2, errs  # measured 2.6e-3


def test_float32(getkey):
    # The model stores its own float64 arrays (differentiated too); x and params are
    # float32. The adjoint ODE runs in the state's dtype.
    pb = MLPProblem.make(jax.random.key(1), dim=3, width=16, cond_dim=2)
    x_T = jax.random.normal(getkey(), (2, 3))
    kw = sample_kwargs(pb.schedule, 20, aj.DPMSolver2(),
                       aj.AdjointDPM(rtol=1e-5, atol=1e-5))
    loss = lambda x0: jnp.sum(jnp.sin(x0) + 0.3 * x0**2)
    f = lambda p, x: loss(aj.sample(pb.model, p, x, None, **kw))
    g = jax.jit(jax.grad(f, (0, 1)))
    g64 = g(pb.params, x_T)
    g32 = g(jtu.tree_map(lambda a: a.astype(jnp.float32), pb.params),
            x_T.astype(jnp.float32))
    for a, b in zip(jtu.tree_leaves(g32), jtu.tree_leaves(g64)):
        assert a.dtype == jnp.float32
        assert rel_err(a.astype(jnp.float64), b) < 1e-4


def test_mixed_dtype_state():
    # x_T = {"a": float32, "b": float64}, coupled by the loss: the model sees each
    # leaf in its own dtype, the backward solve runs in float64, and each gradient
    # comes back in its leaf's dtype. With the accurate forward pass of the
    # closed-form tests the value is DTO's (the same sampler) and the gradient is
    # DTO's and the closed form's, to float32 round-off.
    pb = GaussianProblem.make(4)
    sch = pb.schedule

    def model(p, x, t, c):
        assert x["a"].dtype == jnp.float32 and x["b"].dtype == jnp.float64
        up = lambda v: v.astype(jnp.float64)
        return {k: pb.model(p, up(v), up(t), c) for k, v in x.items()}

    x_T = {"a": XT.astype(jnp.float32), "b": -0.5 * XT}

    def loss(x0):
        a = x0["a"].astype(jnp.float64)
        return _loss(a) + jnp.sum(a * x0["b"])

    def exact(p, x):
        x = {k: v.astype(jnp.float64) for k, v in x.items()}
        return loss({k: pb.flow_map(p, v, COND, sch.t_max, T_END) for k, v in x.items()})

    def run(adjoint):
        kw = sample_kwargs(sch, 100, aj.AsyncLeapfrog(), adjoint)
        f = lambda p, x: loss(aj.sample(model, p, x, COND, **kw))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(pb.params, x_T)

    v_dpm, g_dpm = run(aj.AdjointDPM(rtol=1e-8, atol=1e-8))
    v_dto, g_dto = run(aj.DTO())
    g_exact = jax.grad(exact, argnums=(0, 1))(pb.params, x_T)
    assert g_dpm[1]["a"].dtype == jnp.float32
    assert g_dpm[1]["b"].dtype == jnp.float64
    assert all(v.dtype == jnp.float64 for v in jtu.tree_leaves(g_dpm[0]))
    assert float(v_dpm) == float(v_dto)
    assert rel_err(g_dpm, g_dto) < 2e-6  # measured 2e-7
    assert rel_err(g_dpm, g_exact) < 2e-6  # measured 3e-7


_TRACER_CHECK = """
import gc, sys
import diffrax, jax
jax.config.update("jax_enable_x64", True)
import adjoint_jax as aj
from adjoint_jax.bench import GaussianProblem
from tests.helpers import sample_kwargs
from tests.test_adjoint_dpm import COND, XT, _loss

def live_tracers():
    gc.collect()
    return sum(isinstance(o, jax.core.Tracer) for o in gc.get_objects())

pb = GaussianProblem.make(4)
adjoint = aj.AdjointDPM(solver=diffrax.Heun())
kw = sample_kwargs(pb.schedule, 5, aj.DPMSolver1(), adjoint)
f = lambda x: _loss(aj.sample(pb.model, pb.params, x, COND, **kw))
jax.make_jaxpr(jax.grad(f))(XT)
before = live_tracers()
with jax.checking_leaks():
    jax.grad(f)(XT)  # eager: the compiled loop is traced (and kept) here
jax.make_jaxpr(jax.grad(f))(XT)
jax.jit(jax.grad(lambda x: f(x))).trace(XT)
after = live_tracers()
print(before, after)
sys.exit(0 if after <= before else 1)
"""


def test_traces_keep_no_tracers_alive():
    # The backward solve's vector field once closed over the solve (its traced
    # time grid): diffrax's `jit` took it as a static argument, and JAX's caches kept
    # it, and its tracers, alive after the trace (2 to 5 per trace), which
    # `jax.checking_leaks` reported as a leak. (In a fresh process: counting live
    # objects in a worker's heap of millions takes ten times longer than the check.)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _TRACER_CHECK], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-2000:])


def test_second_derivatives_match_closed_form_gaussian():
    # Forward over reverse (jvp of grad, `jax.hessian` = jacfwd of jacrev) and
    # reverse over reverse, against the closed form: the derivative of the discrete
    # backward solve, as accurate as its gradient (measured: 2e-7 at N = 20 with
    # rtol = atol = 1e-8, the forward sampler's error; 7e-10 at N = 100).
    pb = GaussianProblem.make(4)
    sch = pb.schedule
    exact = lambda x: _loss(pb.flow_map(pb.params, x, COND, sch.t_max, T_END))
    kw = sample_kwargs(sch, 20, aj.AsyncLeapfrog(),
                       aj.AdjointDPM(solver=diffrax.Heun(), rtol=1e-8, atol=1e-8))
    f = lambda x: _loss(aj.sample(pb.model, pb.params, x, COND, **kw))
    v = jnp.array([1.0, 0.5, -0.3, 2.0])

    @jax.jit
    def second(x):
        hvp = jax.jvp(jax.grad(f), (x,), (v,))[1]
        hvp_rev = jax.grad(lambda y: jnp.vdot(jax.grad(f)(y), v))(x)
        return hvp, jax.hessian(f)(x), hvp_rev

    hvp, hess, hvp_rev = second(XT)
    h_exact = jax.hessian(exact)(XT)
    assert rel_err(hvp, h_exact @ v) < 1e-6
    assert rel_err(hess, h_exact) < 1e-6
    assert rel_err(hvp_rev, h_exact @ v) < 1e-6


# ---- validation ---------------------------------------------------------------------
def _call(adjoint, sampler=aj.DPMSolver1(), ts=None, x_T=XT):
    pb = GaussianProblem.make(4)
    ts = aj.time_grid(pb.schedule, 5, t_end=T_END) if ts is None else ts
    return aj.sample(pb.model, pb.params, x_T, None, schedule=pb.schedule, ts=ts,
                     sampler=sampler, adjoint=adjoint, key=jax.random.key(0))


def test_sde_sampler_is_refused():
    msg = (r"`adjoint=AdjointDPM\(.*\)` solves the adjoint of the probability-flow ODE"
           r" and cannot differentiate the stochastic `sampler=SDEDPMSolver1\(\)`")
    with pytest.raises(ValueError, match=msg):
        _call(aj.AdjointDPM(), aj.SDEDPMSolver1())


def test_time_grid_gradient_is_refused():
    pb = GaussianProblem.make(4)
    ts = aj.time_grid(pb.schedule, 5, t_end=T_END)
    with pytest.raises(ValueError, match="cannot differentiate with respect to the ti"):
        jax.grad(lambda t: jnp.sum(_call(aj.AdjointDPM(), ts=t)))(ts)


def test_bad_arguments():
    with pytest.raises(TypeError, match="needs a diffrax solver"):
        aj.AdjointDPM(solver="tsit5")
    with pytest.raises(ValueError, match="rtol > 0 and atol > 0"):
        aj.AdjointDPM(rtol=0.0)
    with pytest.raises(ValueError, match="max_steps"):
        aj.AdjointDPM(max_steps=0)
    assert aj.AdjointDPM(solver=diffrax.Dopri5()).solver == diffrax.Dopri5()


def test_too_few_steps_fails_loudly():
    # A backward solve that cannot finish raises instead of returning a wrong gradient.
    with pytest.raises(Exception, match="max_steps"):
        jax.block_until_ready(
            jax.grad(lambda x: jnp.sum(_call(aj.AdjointDPM(rtol=1e-10, atol=1e-10,
                                                           max_steps=2), x_T=x)))(XT)
        )
