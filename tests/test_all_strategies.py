"""Every (sampler, adjoint) pair of `tests/helpers.py`: runs under jit, grad and vmap,
gives the sampler's forward value, exact strategies equal DTO, and invalid pairs fail
with an error naming both sides. A new strategy is enrolled here by one line in
helpers.py."""

import functools

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import pytest

import adjoint_jax as aj
from adjoint_jax.bench import MLPProblem

from .helpers import (
    all_adjoints,
    all_samplers,
    default_key,
    sample_kwargs,
    tree_allclose,
    valid_pairs,
)


PB = MLPProblem.make(jax.random.key(1), dim=3, width=8, cond_dim=2)
X_T = jax.random.normal(jax.random.key(2), (2, 3))
COND = jnp.array([0.3, -0.5])
N = 6


def _grad(sampler, adjoint, cond=COND):
    kw = sample_kwargs(PB.schedule, N, sampler, adjoint, key=default_key())

    def loss(p, x, c):
        return jnp.sum(jnp.sin(aj.sample(PB.model, p, x, c, **kw)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(PB.params, X_T, cond)


def _pid(pair):
    return f"{pair[0]!r}-{pair[1]!r}"


@functools.cache
def _dto(sampler):
    return _grad(sampler, aj.DTO())


@pytest.mark.parametrize("pair", valid_pairs(), ids=_pid)
def test_pair(pair):
    sampler, adjoint, exact = pair
    (value, grads) = _grad(sampler, adjoint)
    (value_dto, grads_dto) = _dto(sampler)
    # Same forward value whatever the strategy.
    assert jnp.allclose(value, value_dto, rtol=1e-12)
    assert all(jnp.all(jnp.isfinite(g)) for g in jtu.tree_leaves(grads))
    assert jtu.tree_structure(grads) == jtu.tree_structure(grads_dto)
    if exact:
        assert tree_allclose(grads, grads_dto, rtol=1e-8, atol=1e-10)
    # Approximate strategies are far from DTO at N = 6 (the continuous adjoint can be
    # off by orders of magnitude at so few steps); their accuracy is tested where it
    # means something, in test_continuous_adjoints.py.

    # Scheduled conditioning with equal values: per-step gradients sum to the
    # constant-conditioning gradient, and nothing else changes.
    _, g_sched = _grad(sampler, adjoint, aj.Scheduled(jnp.tile(COND, (N, 1))))
    assert isinstance(g_sched[2], aj.Scheduled)
    assert jnp.allclose(g_sched[2].values.sum(0), grads[2], rtol=1e-9)
    assert tree_allclose(g_sched[:2], grads[:2], rtol=1e-9)


def test_invalid_pairs_raise_naming_both():
    for sampler in all_samplers:
        for adjoint, _ in all_adjoints:
            try:
                adjoint.check_sampler(sampler)
            except ValueError as e:
                msg = str(e)
                assert repr(adjoint) in msg and repr(sampler) in msg, msg
                kw = sample_kwargs(PB.schedule, N, sampler, adjoint, key=default_key())
                with pytest.raises(ValueError):
                    aj.sample(PB.model, PB.params, X_T, COND, **kw)
