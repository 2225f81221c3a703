"""Shared test helpers and the lists that enrol every sampler and adjoint in the
shared tests: a new strategy is one line here."""

import diffrax
import jax
import jax.extend.core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

import adjoint_jax as aj


# ---- the enrolment lists ------------------------------------------------------------
# A new sampler or strategy is one line here; the cross-strategy matrix
# (tests/test_matrix.py) and every shared test pick it up.
ode_samplers = [
    aj.DPMSolver1(),
    aj.DPMSolver2(),
    aj.DPMSolverPP(),
    aj.ReversibleHeun(),
    aj.McCallumFoster(aj.DPMSolver1()),
    aj.McCallumFoster(aj.DPMSolver2()),
]
sde_samplers = [aj.SDEDPMSolver1(), aj.DDIM(eta=1.0)]
# AsyncLeapfrog is 4th order on Gaussian data (its leading error term vanishes for a
# Gaussian ε, see tests/test_reversible.py), so it stays out of `ode_samplers`, whose
# closed-form Gaussian test asserts the nominal order; it is in every other list.
# The two-step reversible samplers (BELM, BDIA) and EDICT have their orders tested in
# tests/test_reversible.py (EDICT, first order, is pre-asymptotic on the Gaussian
# below N ≈ 40), and their gradient is DTO's (tested there too).
# The samplers that reproduce diffusers schedulers (tests/test_diffusers_*.py test
# their parity and orders); the matrix runs each with one exact and one continuous
# strategy. One line per sampler:
diffusers_samplers = [
    aj.UniPC(),  # UniPCMultistepScheduler (tests/test_diffusers_unipc.py)
    aj.PNDM(),  # PNDMScheduler, skip_prk_steps=True (tests/test_diffusers_pndm.py)
    aj.DDIM(0.5, clip_sample=1.0),  # DDIMScheduler clip_sample (test_diffusers_ddim.py)
    aj.DDIM(1.0, clip_sample=0.8, clipped_eps=True, variance="fixed_large"),  # DDPM
    aj.DPMSolverSDE(),  # DPMSolverSDEScheduler (tests/test_diffusers_singlestep.py)
    aj.DEIS(order=3),  # DEISMultistepScheduler (tests/test_diffusers_singlestep.py)
    aj.DPMSolverSinglestep(order=3),  # DPMSolverSinglestepScheduler (tests/test_diffusers_singlestep.py)
    aj.LCM(),  # LCMScheduler; FlowMatchEuler stochastic_sampling (tests/test_diffusers_lcm.py)
    aj.TCD(gamma=0.3),  # TCDScheduler (tests/test_diffusers_lcm.py)
    aj.Heun(),  # HeunDiscreteScheduler (tests/test_diffusers_euler_heun.py)
    aj.Heun(space="t"),  # FlowMatchHeunDiscreteScheduler (test_diffusers_euler_heun.py)
    aj.KDPM2(),  # KDPM2DiscreteScheduler (tests/test_diffusers_euler_kdpm2.py)
    aj.KDPM2Ancestral(),  # KDPM2AncestralDiscreteScheduler (test_diffusers_euler_kdpm2.py)
    aj.LMS(),  # LMSDiscreteScheduler (tests/test_diffusers_euler_lms.py)
    aj.SDEDPMSolverPP(order=3),  # DPMSolverMultistep sde-dpmsolver++ (test_diffusers_dpm*.py)
    aj.DPMSolver(order=3),  # DPMSolverMultistep dpmsolver (tests/test_diffusers_dpm*.py)
    aj.CogVideoXDPM(),  # CogVideoXDPMScheduler (tests/test_diffusers_cogvideox.py)
    aj.EulerChurn(s_churn=2.0),  # EulerDiscreteScheduler.step(s_churn) (DTO only)
]
# Exponential Runge–Kutta (tests/test_exp_rk.py: every tableau's order, the embedded
# error estimates) and its reversible McCallum–Foster form ("Rex"; tests/test_rex.py).
# Fifth order converges faster than N⁻⁵ on the closed-form Gaussian (see ExpRK), so
# they stay out of `ode_samplers`. The matrix runs ExpRK, a one-step map of x like
# DPMSolver1, with one exact and one continuous strategy. (bosh3, 3 stages: tsit5
# amplifies a bfloat16 model's round-off beyond the matrix's bound at N = 5; see ExpRK.)
frontier_samplers = [aj.ExpRK("bosh3"), aj.McCallumFoster(aj.ExpRK("bosh3"))]
all_samplers = (
    ode_samplers
    + [aj.AsyncLeapfrog(), aj.BELM(), aj.BDIA(), aj.EDICT()]
    + sde_samplers
    + diffusers_samplers
    + frontier_samplers
)

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
    # Biased by design (DRaFT-K / AlignProp): checked against hand-written truncations
    # in tests/test_truncated.py; here for the transformations, closures and dtypes.
    (aj.Truncated(last=2, detach="eps"), False),
    # Heun (2 stages) rather than the default Tsit5 (7): the same backward pass at a
    # third of the compile time; test_adjoint_dpm.py tests the default.
    (aj.AdjointDPM(solver=diffrax.Heun()), False),
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


# ---- zero-length steps (tests/test_zero_length_steps.py, tests/test_matrix.py) -----
# Samplers whose coefficients depend on the number of grid steps N, which a padded
# grid increases: `lower_order_final` (DPMSolverPP, UniPC, DEIS, DPMSolver,
# SDEDPMSolverPP: diffusers lowers the order of the last steps when N < 15),
# CogVideoXDPM's final step and EulerChurn's γ = min(s_churn/N, √2 − 1). A zero-length
# step is the identity for them too (every step goes through the same engine), but
# the padded solve is that of N + k steps, not the unpadded one.
_N_DEPENDENT = (aj.DPMSolverPP, aj.UniPC, aj.DEIS, aj.DPMSolver, aj.SDEDPMSolverPP,
                aj.CogVideoXDPM, aj.EulerChurn)


def assert_padded_sample_is_the_sample(sampler, x0_pad, x0):
    """Trailing zero-length steps change no sample (finite, and equal where the
    sampler's coefficients do not depend on N)."""
    assert np.all(np.isfinite(np.asarray(x0_pad)))
    if not isinstance(sampler, _N_DEPENDENT):
        np.testing.assert_allclose(x0_pad, x0, rtol=1e-13, atol=1e-14)


# ---- numerics -----------------------------------------------------------------------
# Comparisons run in NumPy (float64): eager `jnp` ops would compile one small XLA
# executable per operation, shape and dtype, which costs more than the tests do.
def _np64(a):
    return np.asarray(a).astype(np.float64)


def _is_array(a):
    return isinstance(a, jax.Array | np.ndarray | np.generic)


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    """Same structure, shapes and dtypes, and every leaf close (as `np.allclose`)."""
    lx, tx = jtu.tree_flatten(x)
    ly, ty = jtu.tree_flatten(y)
    if tx != ty:
        return False
    for a, b in zip(lx, ly):
        if _is_array(a) != _is_array(b):
            return False
        if not _is_array(a):
            if a != b:
                return False
            continue
        if jnp.shape(a) != jnp.shape(b) or np.asarray(a).dtype != np.asarray(b).dtype:
            return False
        if not np.allclose(_np64(a), _np64(b), rtol=rtol, atol=atol):
            return False
    return True


def tree_norm(x):
    return float(np.sqrt(sum(np.sum(_np64(leaf) ** 2) for leaf in jtu.tree_leaves(x))))


def tree_sub(x, y):
    return jtu.tree_map(lambda a, b: _np64(a) - _np64(b), x, y)


def rel_err(x, ref):
    return tree_norm(tree_sub(x, ref)) / tree_norm(ref)


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


def all_eqns(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs nested in it (scan and while
    bodies, custom-VJP rules, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from all_eqns(sub)


def default_key():
    return jax.random.key(0)
