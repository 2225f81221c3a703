"""Zero-length steps (a repeated time in `ts`, as in the padded grids of
`aj.adaptive_time_grid`) are the exact identity: for every sampler, for every
strategy, in values and gradients, with one grid for the batch (a `lax.cond`) and with
a `vmap` over grids (both branches computed and selected, nothing non-finite leaking
into the gradient). The cross-strategy matrix (`test_matrix.py`) also runs every pair
on a grid whose last step has zero length."""

import diffrax
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import adjoint_jax as aj
from adjoint_jax.bench import MLPProblem

from .helpers import (
    all_adjoints,
    all_samplers,
    assert_padded_sample_is_the_sample,
    default_key,
    rel_err,
)


PB = MLPProblem.make(jax.random.key(1), dim=3, width=8, cond_dim=2)
X_T = jax.random.normal(jax.random.key(2), (2, 3))
COND = jnp.array([0.3, -0.5])
TS = aj.time_grid(PB.schedule, 5, t_end=1e-3)


def _pad(ts, k):
    return jnp.concatenate([ts, jnp.repeat(ts[-1:], k)])


def _grads(sampler, adjoint, grids):
    """value_and_grad (params, x_T, cond) on each grid, in one compiled program."""
    key = default_key() if sampler.is_sde else None

    def loss(p, x, c, ts):
        x0 = aj.sample(PB.model, p, x, c, schedule=PB.schedule, ts=ts,
                       sampler=sampler, adjoint=adjoint, key=key)
        return jnp.sum(jnp.sin(x0) + 0.3 * x0**2)

    vg = jax.value_and_grad(loss, argnums=(0, 1, 2))
    return jax.jit(lambda p, x, c: [vg(p, x, c, ts) for ts in grids])(
        PB.params, X_T, COND
    )


def _finite(tree):
    return all(bool(np.all(np.isfinite(a))) for a in jtu.tree_leaves(tree))


def _without_matrix_dto_row():
    # The cross-strategy matrix checks this in every sampler's DTO() row (one
    # zero-length step, in the same compiled program); the samplers it runs only with
    # ReversibleAdjoint are checked here.
    from .test_matrix import _matrix_pairs

    with_dto = {repr(s) for s, a, _ in _matrix_pairs() if a == aj.DTO()}
    return [s for s in all_samplers if repr(s) not in with_dto]


@pytest.mark.parametrize("sampler", _without_matrix_dto_row(), ids=repr)
def test_every_sampler_padded_grid_is_the_grid(sampler):
    # Two trailing zero-length steps change no sample. (Every sampler's gradient on
    # a padded grid is checked against DTO's and finite differences by the matrix,
    # and padded against unpadded gradients per strategy below: the engine skips
    # the step the same way whatever the sampler.)
    key = default_key() if sampler.is_sde else None

    def x0(ts):
        return aj.sample(PB.model, PB.params, X_T, COND, schedule=PB.schedule, ts=ts,
                         sampler=sampler, key=key)

    padded = _pad(TS, 2)  # (concrete: a grid traced under jit is checked at run time)
    x0, x0_pad = jax.jit(lambda: (x0(TS), x0(padded)))()
    assert_padded_sample_is_the_sample(sampler, x0_pad, x0)


def _grid_and_schedule_derivatives_finite(sampler):
    # DTO's derivatives with respect to the schedule's parameters and the grid are
    # finite on a padded grid: a zero-length step's borrowed times are blocked from
    # the gradient, and the samplers' warm-up divisions are double-wheres.
    key = default_key() if sampler.is_sde else None

    def loss(ts, schedule):
        return jnp.sum(aj.sample(PB.model, PB.params, X_T, COND, schedule=schedule,
                                 ts=ts, sampler=sampler, key=key))

    d = jax.jit(jax.grad(loss, argnums=(0, 1)))(_pad(TS, 2), PB.schedule)
    assert _finite(d) and float(jnp.sum(jnp.abs(d[0]))) > 0


# One sampler of each family with divisions of its own in its coefficients (the
# multistep warm-ups of DPM-Solver++ and UniPC, the singlestep midpoint, the previous
# grid time of BELM, Adams–Bashforth weights, Heun's second evaluation, the SDE
# noise, exponential Runge–Kutta stages). Every sampler: the slow sweep below.
_FAMILIES = [aj.DPMSolverPP(), aj.DPMSolver2(), aj.UniPC(), aj.BELM(), aj.PNDM(),
             aj.Heun(), aj.SDEDPMSolver1(), aj.ExpRK("bosh3")]


@pytest.mark.parametrize("sampler", _FAMILIES, ids=repr)
def test_grid_and_schedule_derivatives_on_padded_grids(sampler):
    _grid_and_schedule_derivatives_finite(sampler)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", all_samplers, ids=repr)
def test_grid_and_schedule_derivatives_on_padded_grids_every_sampler(sampler):
    _grid_and_schedule_derivatives_finite(sampler)


def _strategy_cases():
    # Every strategy class and variant with a multistep sampler (its memory must
    # survive the skipped steps); the reversible rules with one sampler each
    # (fused "shared", fused "previous", separate); an SDE with the second-order
    # continuous adjoint (its multistep memory and the noise's cotangents).
    # Truncated(last=k) and InterpolatedAdjoint(every=k) count grid steps,
    # zero-length ones included (`aj.sample`'s docstring): on a padded grid they are
    # the same strategy with other step counts, so not compared here.
    cases = [(aj.DPMSolver2(), a) for a, _ in all_adjoints if not isinstance(
        a, (aj.ReversibleAdjoint, aj.Truncated, aj.InterpolatedAdjoint))]
    cases += [(s, aj.ReversibleAdjoint())
              for s in (aj.BELM(), aj.ReversibleHeun(),
                        aj.McCallumFoster(aj.DPMSolver2()))]
    cases += [(aj.SDEDPMSolver1(), aj.AdjointDEIS(order=2))]
    return cases


@pytest.mark.parametrize("case", _strategy_cases(), ids=lambda c: f"{c[0]!r}-{c[1]!r}")
def test_every_strategy_padded_grid_is_the_grid(case):
    # Zero-length steps at the end and in the middle of the grid.
    sampler, adjoint = case
    middle = jnp.concatenate([TS[:3], TS[2:3], TS[3:]])
    grids = [TS, _pad(TS, 2)]
    if not sampler.is_sde:  # (step i's key-drawn noise is fold_in(key, i))
        grids.append(middle)
    (v, g), *padded = _grads(sampler, adjoint, grids)
    for v_pad, g_pad in padded:
        assert np.allclose(v_pad, v, rtol=1e-13, atol=0)
        # Different programs (scan lengths): round-off, amplified by the backward
        # re-solves of the continuous adjoints.
        assert rel_err(g_pad, g) < 1e-11, rel_err(g_pad, g)


@pytest.mark.parametrize(
    "sampler,adjoint",
    [(aj.DPMSolver2(), aj.DTO()), (aj.BELM(), aj.ReversibleAdjoint()),
     (aj.DPMSolver2(), aj.AdjointDEIS(order=2)),
     (aj.DPMSolver2(), aj.AdjointDPM(solver=diffrax.Heun()))],
    ids=repr,
)
def test_vmap_over_padded_grids(sampler, adjoint):
    # Two grids of one length, padded differently: under vmap the zero-length
    # condition is batched and both branches are computed. The second grid's extra
    # zero-length steps borrow a real step's times; the multistep memory is then
    # inconsistent with them (r = 0: infinite partial derivatives), which must not
    # reach the gradient.
    ts6 = aj.time_grid(PB.schedule, 6, t_end=1e-3)
    grids = jnp.stack([_pad(ts6, 1), _pad(TS, 2)])

    def loss(p, x, ts):
        x0 = aj.sample(PB.model, p, x, COND, schedule=PB.schedule, ts=ts,
                       sampler=sampler, adjoint=adjoint)
        return jnp.sum(jnp.sin(x0) + 0.3 * x0**2)

    vg = jax.value_and_grad(loss, argnums=(0, 1))

    @jax.jit
    def both(p, x):
        return jax.vmap(vg, in_axes=(None, None, 0))(p, x, grids), [
            vg(p, x, ts) for ts in (ts6, TS)
        ]

    batched, singles = both(PB.params, X_T)
    assert _finite(batched)
    for k, (v, g) in enumerate(singles):
        assert np.allclose(batched[0][k], v, rtol=1e-13, atol=0)
        assert rel_err(jtu.tree_map(lambda a: a[k], batched[1]), g) < 1e-11


def test_first_step_must_have_nonzero_length():
    with pytest.raises(ValueError, match="must start with a step of nonzero length"):
        aj.sample(PB.model, PB.params, X_T, COND, schedule=PB.schedule,
                  ts=jnp.concatenate([TS[:1], TS]), sampler=aj.DPMSolver1())


def test_custom_strategies_need_nonzero_endpoint_steps():
    # A grid ending at σ = 0 must take its step to 0 last; the message's fix
    # (repeat the last time before 0) works and changes nothing.
    ts = aj.time_grid(PB.schedule, 5, t_end=0.0)
    kw = dict(schedule=PB.schedule, sampler=aj.DPMSolverPP(order=1),
              adjoint=aj.AdjointDEIS())
    with pytest.raises(ValueError, match="repeat the last time before 0"):
        aj.sample(PB.model, PB.params, X_T, COND, ts=_pad(ts, 1), **kw)
    fixed = jnp.concatenate([ts[:-1], ts[-2:]])
    loss = lambda x, ts_: jnp.sum(aj.sample(PB.model, PB.params, x, COND, ts=ts_, **kw))
    g = jax.grad(loss)(X_T, ts)
    g_fixed = jax.grad(loss)(X_T, fixed)
    assert rel_err(g_fixed, g) < 1e-12


def test_evaluation_counts_on_padded_grids():
    # The custom strategies skip zero-length steps (a lax.cond in their forward and
    # backward loops): a padded grid costs what the unpadded one does. DTO computes
    # and discards them (a differentiated cond made its gradient 1.5-2× slower on
    # every grid), so its padding costs evaluations: see `aj.adaptive_time_grid`.
    from adjoint_jax.bench import count_evals

    padded = _pad(TS, 5)
    for sampler, adjoint, extra in [
        (aj.DPMSolver2(), aj.AdjointDEIS(), 0),
        (aj.McCallumFoster(aj.DPMSolver1()), aj.ReversibleAdjoint(), 0),
        (aj.DPMSolver2(), aj.DTO(), 5),
    ]:
        def counts(ts, sampler=sampler, adjoint=adjoint):
            def f(m, p):
                return jax.grad(lambda p: jnp.sum(aj.sample(
                    m, p, X_T, None, schedule=PB.schedule, ts=ts, sampler=sampler,
                    adjoint=adjoint)))(p)
            c = count_evals(f, PB.model, PB.params)
            return c.forward, c.vjp

        (f0, v0), (f1, v1) = counts(TS), counts(padded)
        per_step = sampler.evals_per_step
        assert (f1, v1) == (f0 + extra * per_step, v0 + extra * per_step)


def test_skipped_scan_body_outputs_zeros_of_the_bodys_shapes():
    # The backward scans skip a zero-length step with `skip_body_if_zero`, whose zeros
    # take their shapes and dtypes from the body's trace inside `lax.cond`; with a
    # branch run alone (`jax.disable_jit()`, a concrete condition), from `eval_shape`.
    from adjoint_jax._adjoints._base import skip_body_if_zero

    def body(c, x):
        return c + jnp.sum(x), (2.0 * x, x[:1].astype(jnp.float32), None)

    carry, x = jnp.float64(1.5), jnp.arange(3.0)
    for zero in (True, False):
        expected = (
            (carry, (jnp.zeros(3), jnp.zeros(1, jnp.float32), None)) if zero
            else body(carry, x)
        )
        run = lambda z: skip_body_if_zero(z, body, carry, x)
        with jax.disable_jit():
            eager = run(jnp.asarray(zero))
        for got in (jax.jit(run)(zero), eager):
            assert jtu.tree_structure(got) == jtu.tree_structure(expected)
            for a, b in zip(jtu.tree_leaves(got), jtu.tree_leaves(expected)):
                assert a.dtype == b.dtype and a.shape == b.shape
                np.testing.assert_array_equal(a, b)
