"""The sampled x_0 and the exact discrete (DTO) gradients converge to the closed-form
Gaussian truth at each sampler's order."""

import jax
import jax.numpy as jnp
import pytest

import adjoint_jax as aj
from adjoint_jax.bench import GaussianProblem

from .helpers import default_key, ode_samplers, rel_err, sample_kwargs, slope


T_END = 1e-3
W = jnp.array([1.0, -2.0, 0.5, 1.5])
XT = jnp.array([0.3, -1.2, 2.0, 0.7])
COND = jnp.array([0.1, -0.2, 0.3, 0.05])


def _loss(x0):
    # Nonlinear, so the gradient depends on where x_0 lands.
    return jnp.sum(W * jnp.sin(x0)) + 0.5 * jnp.sum(x0**2)


def ode_errors(problem, sampler, adjoint, ns):
    """Relative errors of x_0 and of the gradients w.r.t. x_T, μ, s and c."""
    sch = problem.schedule
    t0 = sch.t_max

    def exact_loss(p, x, c):
        return _loss(problem.flow_map(p, x, c, t0, T_END))

    x_exact = problem.flow_map(problem.params, XT, COND, t0, T_END)
    g_exact = jax.grad(exact_loss, argnums=(0, 1, 2))(problem.params, XT, COND)
    errs = {k: [] for k in ("x0", "x_T", "mu", "s", "cond")}
    for n in ns:
        kw = sample_kwargs(sch, n, sampler, adjoint)

        def loss(p, x, c):
            return _loss(aj.sample(problem.model, p, x, c, **kw))

        x0 = aj.sample(problem.model, problem.params, XT, COND, **kw)
        gp, gx, gc = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(problem.params, XT, COND)
        errs["x0"].append(rel_err(x0, x_exact))
        errs["x_T"].append(rel_err(gx, g_exact[1]))
        errs["mu"].append(rel_err(gp["mu"], g_exact[0]["mu"]))
        errs["s"].append(rel_err(gp["s"], g_exact[0]["s"]))
        errs["cond"].append(rel_err(gc, g_exact[2]))
    return errs


def sde_errors(problem, adjoint, ns, key, sampler=aj.SDEDPMSolver1()):
    """Relative errors of the gradients of the linear loss Σ w·x_0 through a sampler
    of the reverse SDE (SDE-DPM-Solver-1, or DDIM with η = 1); the exact gradient is
    noise independent."""
    sch = problem.schedule
    exact = problem.sde_linear_grads(W, problem.params, COND, sch.t_max, T_END)
    errs = {"x_T": [], "mu": [], "cond": []}
    for n in ns:
        kw = sample_kwargs(sch, n, sampler, adjoint, key=key)

        def loss(p, x, c):
            return jnp.sum(W * aj.sample(problem.model, p, x, c, **kw))

        gp, gx, gc = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(problem.params, XT, COND)
        errs["x_T"].append(rel_err(gx, exact["x_T"]))
        errs["mu"].append(rel_err(gp["mu"], exact["mu"]))
        errs["cond"].append(rel_err(gc, exact["mu"]))
    return errs


@pytest.mark.parametrize("sampler", ode_samplers, ids=repr)
def test_ode_sampler_and_dto_gradient_order(sampler):
    problem = GaussianProblem.make(4)
    ns = [10, 20, 40, 80, 160]
    errs = ode_errors(problem, sampler, aj.DTO(), ns)
    for name, e in errs.items():
        order = slope(ns, e)
        assert abs(order - sampler.order) < 0.25, (name, order, e)
    # At N = 160 everything is accurate.
    assert max(e[-1] for e in errs.values()) < (3e-2 if sampler.order == 1 else 1e-3)


def test_sde_sampler_dto_gradient_order():
    problem = GaussianProblem.make(4)
    ns = [80, 160, 320, 640]
    errs = sde_errors(problem, aj.DTO(), ns, default_key())
    for name, e in errs.items():
        order = slope(ns, e)
        assert abs(order - 1) < 0.25, (name, order, e)


def test_sde_gradient_is_noise_independent_for_linear_loss():
    problem = GaussianProblem.make(4)
    kw1 = sample_kwargs(problem.schedule, 40, aj.SDEDPMSolver1(), aj.DTO(),
                        key=jax.random.key(1))
    kw2 = dict(kw1, key=jax.random.key(2))

    def g(kw):
        return jax.grad(lambda x: jnp.sum(W * aj.sample(problem.model, problem.params,
                                                         x, COND, **kw)))(XT)

    x1 = aj.sample(problem.model, problem.params, XT, COND, **kw1)
    x2 = aj.sample(problem.model, problem.params, XT, COND, **kw2)
    assert rel_err(x1, x2) > 1e-2  # different noise, different samples...
    assert rel_err(g(kw1), g(kw2)) < 1e-12  # ...same gradient
