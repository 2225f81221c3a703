"""The binomial checkpointing schedule of `aj.DTO(checkpoints=k)`
(`adjoint_jax/_adjoints/_binomial.py`): it reverses every step once, in order, from
states that are where it reads them, with at most k stored states, and recomputes
exactly Griewank's optimal number of steps."""

import itertools
import math

import jax
import jax.numpy as jnp
import pytest

import adjoint_jax as aj
from adjoint_jax._adjoints._binomial import optimal_cost, schedule
from adjoint_jax.bench import MLPProblem, count_evals


def _simulate(n, k):
    slots = {0: 0}  # slot -> the step index of the state it holds
    reversed_steps, advanced = [], 0
    for op, slot, start, stop, store in schedule(n, k).tolist():
        assert slots.get(slot) == start  # the restored state is the one expected
        assert stop >= start
        advanced += stop - start
        if op == 0:
            assert 0 < store < k  # slot 0 (state 0) is never overwritten
            slots[store] = stop
        else:
            reversed_steps.append(stop)
    return reversed_steps, advanced


@pytest.mark.parametrize("n,k", itertools.product([1, 2, 5, 13, 20, 64, 100], [1, 2, 3, 4, 8]))
def test_schedule_reverses_every_step_at_the_optimal_cost(n, k):
    reversed_steps, advanced = _simulate(n, k)
    assert reversed_steps == list(range(n - 1, -1, -1))
    assert advanced == optimal_cost(n, min(k, n))


def test_optimal_cost_is_the_minimum_over_splits():
    # The closed form against the recursion it solves.
    best = {}
    for s in range(1, 5):
        for t in range(1, 40):
            if t == 1 or s == 1:
                best[t, s] = 0 if t == 1 else t * (t - 1) // 2
            else:
                best[t, s] = min(m + best[t - m, s - 1] + best[m, s] for m in range(1, t))
            assert optimal_cost(t, s) == best[t, s], (t, s)
    assert math.comb(5, 2) == 10  # β(2, 3): 10 steps reversible with 2 slots, 3 sweeps


def test_gradient_equals_dto_and_counts_the_schedule():
    pb = MLPProblem.make(jax.random.key(0), dim=2, width=8, cond_dim=2)
    ts = aj.time_grid(pb.schedule, 9, t_end=1e-3)
    x_T = jax.random.normal(jax.random.key(1), (3, 2))
    cond = jnp.array([0.3, -0.5])

    def grad(model, adjoint):
        return jax.grad(lambda p, x: jnp.sum(jnp.sin(aj.sample(
            model, p, x, cond, schedule=pb.schedule, ts=ts, sampler=aj.DPMSolver1(),
            adjoint=adjoint))), argnums=(0, 1))(pb.params, x_T)

    ref = grad(pb.model, aj.DTO())
    for k in (1, 3):
        got = grad(pb.model, aj.DTO(checkpoints=k))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            assert jnp.allclose(a, b, rtol=1e-12, atol=1e-14)
        c = count_evals(grad, pb.model, aj.DTO(checkpoints=k))
        # The sampling pass, the schedule's recomputed steps, and per step one VJP
        # (whose own forward evaluation is counted as one).
        assert (c.forward, c.vjp) == (9 + optimal_cost(9, k) + 9, 9), (k, c)
