"""A Flax (linen) model and an Equinox model both work as `model`/`params` with every
adjoint: exact strategies reproduce DTO, approximate ones return finite gradients of
the right structure."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import pytest

import adjoint_jax as aj

from .helpers import all_adjoints, sample_kwargs, tree_allclose


class FlaxEps(nn.Module):
    @nn.compact
    def __call__(self, x, t, cond):
        h = jnp.concatenate([x, jnp.broadcast_to(cond, x.shape[:-1] + cond.shape[-1:]),
                             jnp.broadcast_to(jnp.stack([jnp.sin(t), jnp.cos(t)]),
                                              x.shape[:-1] + (2,))], axis=-1)
        h = nn.tanh(nn.Dense(16, param_dtype=jnp.float64)(h))
        return nn.Dense(x.shape[-1], param_dtype=jnp.float64)(h)


class EqxEps(eqx.Module):
    l1: eqx.nn.Linear
    l2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(3 + 2 + 2, 16, key=k1, dtype=jnp.float64)
        self.l2 = eqx.nn.Linear(16, 3, key=k2, dtype=jnp.float64)

    def __call__(self, x, t, cond):
        h = jnp.concatenate([x, cond, jnp.stack([jnp.sin(t), jnp.cos(t)])])
        return self.l2(jnp.tanh(self.l1(h)))


def _flax():
    net = FlaxEps()
    variables = net.init(jax.random.key(0), jnp.ones(3), jnp.float64(0.5), jnp.ones(2))
    return (lambda p, x, t, c: net.apply(p, x, t, c)), variables


def _equinox():
    net = EqxEps(jax.random.key(0))
    params, static = eqx.partition(net, eqx.is_inexact_array)
    return (lambda p, x, t, c: eqx.combine(p, static)(x, t, c)), params


def _sampler_for(adjoint):
    for smp in [aj.DPMSolver2(), aj.McCallumFoster(aj.DPMSolver2())]:
        try:
            adjoint.check_sampler(smp)
            return smp
        except ValueError:
            continue
    raise AssertionError(adjoint)


@pytest.mark.parametrize("framework", [_flax, _equinox], ids=["flax", "equinox"])
def test_every_adjoint(framework):
    model, params = framework()
    sch = aj.VPLinear()
    x_T, cond = jnp.array([0.3, -1.0, 0.5]), jnp.array([0.2, -0.4])

    def grads(sampler, adj):
        kw = sample_kwargs(sch, 8, sampler, adj)
        f = lambda p, x, c: jnp.sum(jnp.sin(aj.sample(model, p, x, c, **kw)))
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(params, x_T, cond)

    dto = {}
    # One strategy of each kind: plain autodiff, checkpointed, the continuous-adjoint
    # engine, the reversible one and diffrax's (every strategy and sampler is in the
    # cross-strategy matrix of tests/test_matrix.py).
    kinds = [aj.DTO, aj.AdjointDEIS, aj.RecordedAdjoint, aj.ReversibleAdjoint,
             aj.AdjointDPM]
    chosen = [next((a, e) for a, e in all_adjoints if type(a) is k) for k in kinds]
    chosen.append((aj.DTO(checkpoints=3), True))
    for adjoint, exact in chosen:
        sampler = _sampler_for(adjoint)
        if repr(sampler) not in dto:
            dto[repr(sampler)] = grads(sampler, aj.DTO())
        g, g_dto = grads(sampler, adjoint), dto[repr(sampler)]
        assert jtu.tree_structure(g) == jtu.tree_structure(g_dto), adjoint
        assert all(jnp.all(jnp.isfinite(v)) for v in jtu.tree_leaves(g)), adjoint
        if exact:
            assert tree_allclose(g, g_dto, rtol=1e-8, atol=1e-10), adjoint
