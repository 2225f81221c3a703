"""Shared test helpers and the lists that enrol every sampler and adjoint in the
shared tests: a new strategy is one line here."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

import adjoint_jax as aj


# ---- the enrolment lists ------------------------------------------------------------
ode_samplers = [
    aj.DPMSolver1(),
    aj.DPMSolver2(),
    aj.ReversibleHeun(),
    aj.McCallumFoster(aj.DPMSolver1()),
    aj.McCallumFoster(aj.DPMSolver2()),
]
sde_samplers = [aj.SDEDPMSolver1()]
# AsyncLeapfrog is 4th order on Gaussian data (its leading error term vanishes for a
# Gaussian ε, see tests/test_reversible.py), so it stays out of `ode_samplers`, whose
# closed-form Gaussian test asserts the nominal order; it is in every other list.
all_samplers = ode_samplers + [aj.AsyncLeapfrog()] + sde_samplers

# (adjoint, whether its gradient is the exact gradient of the discrete sampler)
all_adjoints = [
    (aj.DTO(), True),
    (aj.DTO(checkpoints="steps"), True),
    (aj.DTO(checkpoints=3), True),
    (aj.AdjointDEIS(), False),
    (aj.AdjointDEIS(order=2), False),
    (aj.AdjointDEIS(num_steps=7), False),
    (aj.RecordedAdjoint(), False),
    (aj.RecordedAdjoint(order=2), False),
    (aj.InterpolatedAdjoint(every=3), False),
    (aj.ReversibleAdjoint(), True),
    (aj.AdjointDPM(), False),
]


def valid_pairs(samplers=None, adjoints=None):
    """Every (sampler, adjoint) pair the library accepts."""
    out = []
    for smp in samplers or all_samplers:
        for adj, exact in adjoints or all_adjoints:
            try:
                adj.check_sampler(smp)
            except ValueError:
                continue
            out.append((smp, adj, exact))
    return out


# ---- numerics -----------------------------------------------------------------------
def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    return bool(eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol))


def tree_norm(x):
    return jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in jtu.tree_leaves(x)))


def tree_sub(x, y):
    return jtu.tree_map(lambda a, b: a - b, x, y)


def rel_err(x, ref):
    return float(tree_norm(tree_sub(x, ref)) / tree_norm(ref))


def slope(ns, errs):
    """Least-squares slope of log(err) against log(1/N): the observed order."""
    ns, errs = np.asarray(ns, float), np.asarray(errs, float)
    return float(np.polyfit(-np.log(ns), np.log(errs), 1)[0])


def sample_kwargs(schedule, n, sampler, adjoint, key=None, t_end=1e-3):
    return dict(
        schedule=schedule,
        ts=aj.time_grid(schedule, n, t_end=t_end),
        sampler=sampler,
        adjoint=adjoint,
        key=key if sampler.is_sde else None,
    )


def default_key():
    return jax.random.key(0)
