"""The cross-strategy matrix: every valid (sampler, adjoint) pair of
`tests/helpers.py`, under `jit`, checked for what research code relies on:

- the forward value is the sampler's whatever the strategy; exact strategies equal
  `aj.DTO()` and central finite differences (float64);
- `vmap(grad)` equals a Python loop, and so does `grad(vmap)` (for each strategy
  class with an ODE and an SDE sampler, and for every reversible pair);
- a model closing over a `jit` tracer and over a `vmap` tracer works, and the
  gradient through a closed-over array equals the gradient through `params`;
- per-step (`aj.Scheduled`) conditioning with equal values sums to the constant
  conditioning's gradient;
- all of it on a grid whose last step has zero length (a padded grid; the step is
  the identity, `tests/test_zero_length_steps.py`);
- a second call does not recompile;
- a float32 state with a model computing and returning bfloat16 (the dtype policy:
  outputs are cast to the state's dtype) gives gradients in the inputs' dtypes, close
  to float64's (for the first enrolled variant of each adjoint class).

A new sampler or strategy is enrolled by one line in `tests/helpers.py`. (AdjointDPM,
whose backward solve sees only the sampler's final state, runs with DPMSolver2.) Each pair
compiles two functions with three or four traced solves between them (compilation,
not running, is what costs here).
"""

import functools

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
    diffusers_samplers,
    rel_err,
    sample_kwargs,
    tree_allclose,
    tree_norm,
    tree_sub,
    valid_pairs,
)


PB = MLPProblem.make(jax.random.key(1), dim=3, width=8, cond_dim=2)
N = 5
# The grid's last step has zero length (a padded grid, as `aj.adaptive_time_grid`
# returns): the identity for every pair, so every check below holds with it.
TS = jnp.concatenate(
    [aj.time_grid(PB.schedule, N, t_end=1e-3), jnp.array([1e-3])]
)
# (Sliced here, not inside the compiled programs: a grid computed under `jit` is
# traced, and `aj.sample` then checks it at run time, a host callback that keeps the
# program out of the persistent compilation cache.)
TS_UNPADDED = TS[:-1]
X_T = jax.random.normal(jax.random.key(2), (2, 3))
COND = jnp.array([0.3, -0.5])
# Per-step conditioning with one value per grid step, all equal: its per-step
# gradients must sum to the constant conditioning's.
SCHED = aj.Scheduled(jnp.tile(COND, (N + 1, 1)))
# Two (weights, x_T) examples for the vmap checks; the first is the base point.
W_BATCH = jtu.tree_map(
    lambda a, k: jnp.stack([a, a + 0.1 * jax.random.normal(k, a.shape)]),
    PB.params,
    dict(zip(sorted(PB.params), jax.random.split(jax.random.key(3), len(PB.params)))),
)
X_BATCH = jnp.stack([X_T, jax.random.normal(jax.random.key(4), (2, 3))])


def _loss(x0):
    return jnp.sum(jnp.sin(x0) + 0.3 * x0**2)


def _pid(pair):
    return f"{pair[0]!r}-{pair[1]!r}"


def _index(tree, i):
    return jtu.tree_map(lambda v: v[i], tree)


def _kw(sampler, adjoint):
    return {**sample_kwargs(PB.schedule, N, sampler, adjoint, key=default_key()),
            "ts": TS}


@functools.cache
def _checks(sampler, adjoint):
    """The jitted function computing most checks of one pair, and its trace log."""
    kw = _kw(sampler, adjoint)
    traces = []

    def loss(model, p, x, c):
        return _loss(aj.sample(model, p, x, c, **kw))

    def closing_over(weights):
        # The weights reach the model only through a closure.
        return lambda _, x, t, c: PB.model(weights, x, t, c)

    @jax.jit
    def run(params, x_T, sched, w_batch, x_batch, cond):
        traces.append(None)
        base = jax.value_and_grad(
            lambda p, x, c: loss(PB.model, p, x, c), argnums=(0, 1, 2)
        )(params, x_T, sched)

        # vmap(grad) with the model closing over the weights (a vmap tracer of a jit
        # tracer, differentiated through the closure) and constant conditioning.
        def per_example(w, x):
            return jax.grad(
                lambda w_, x_, c: loss(closing_over(w_), None, x_, c), argnums=(0, 1, 2)
            )(w, x, cond)

        g_vmap = jax.vmap(per_example)(w_batch, x_batch)
        # grad(vmap): example i's loss depends on (W_i, x_i) only.
        g_of_vmap = jax.grad(
            lambda ws, xs: jnp.sum(
                jax.vmap(lambda w, x: loss(PB.model, w, x, cond))(ws, xs)
            ),
            argnums=(0, 1),
        )(w_batch, x_batch) if _checks_grad_of_vmap(sampler, adjoint) else None
        if adjoint != aj.DTO():
            return base, g_vmap, g_of_vmap, None
        # DTO's row also samples on the grid without its zero-length last step: the
        # padded grid's sample must be the same (test_zero_length_steps.py).
        samples = [aj.sample(PB.model, params, x_T, cond, **{**kw, "ts": ts})
                   for ts in (TS, TS_UNPADDED)]
        return base, g_vmap, g_of_vmap, samples

    return lambda p, x, c=SCHED: run(p, x, c, W_BATCH, X_BATCH, COND), traces


def _dto(sampler):
    """DTO's value and gradients (per-step conditioning), the references of the exact
    strategies, and the loss as a function of (params, x_T, cond): all from DTO's own
    row of the matrix (its compiled program; no second compilation)."""
    run, _ = _checks(sampler, aj.DTO())
    loss = lambda p, x, c: run(p, x, c)[0][0]
    return loss, run(PB.params, X_T)[0]


def _finite_difference_check(forward, grads, seed):
    """Central differences of the forward loss along random directions agree with
    the gradient's directional derivatives (float64)."""
    args = (PB.params, X_T, SCHED)
    rng = np.random.default_rng(seed)
    for argnum in range(3):
        d = jtu.tree_map(lambda a: rng.standard_normal(np.shape(a)), args[argnum])
        # Small enough for reversible Heun's blown-up states at N = 5 (|x_0| ~ 5e3).
        eps = 1e-6

        def shifted(sign):
            new = list(args)
            new[argnum] = jtu.tree_map(
                lambda a, v: np.asarray(a) + sign * eps * v, args[argnum], d
            )
            return float(forward(*new))

        fd = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
        ad = sum(
            float(np.vdot(np.asarray(g), v))
            for g, v in zip(jtu.tree_leaves(grads[argnum]), jtu.tree_leaves(d))
        )
        assert abs(fd - ad) <= 1e-6 * abs(ad) + 1e-9, (argnum, fd, ad)


@functools.cache
def _bf16_grads(sampler, adjoint):
    kw = _kw(sampler, adjoint)
    bf16 = jnp.bfloat16

    def bf16_model(p, x, t, c):
        # Computes in bfloat16 and returns bfloat16 under a float32 state.
        return PB.model(p, x.astype(bf16), t.astype(bf16), c.astype(bf16))

    return jax.jit(
        jax.grad(
            lambda p, x, c: _loss(aj.sample(bf16_model, p, x, c, **kw)),
            argnums=(0, 1, 2),
        )
    )


def _leafwise_close(x, ref, *, rtol):
    """Every entry within `rtol` of its leaf's largest |entry| (and same structure)."""
    if jtu.tree_structure(x) != jtu.tree_structure(ref):
        return False
    leaves = zip(map(np.asarray, jtu.tree_leaves(x)),
                 map(np.asarray, jtu.tree_leaves(ref)))
    return all(
        np.all(np.abs(a - b) <= rtol * np.max(np.abs(b)) + 1e-12) for a, b in leaves
    )


def _rel(x, ref):
    """Relative error, 0 when both are exactly zero (a saturated tanh layer, as
    under reversible Heun's blow-up at N = 5, has zero gradients)."""
    return 0.0 if tree_norm(tree_sub(x, ref)) == 0.0 else rel_err(x, ref)


def _summed(grads):
    """(params, x_T, cond) gradients with per-step conditioning summed over steps."""
    return (grads[0], grads[1], np.sum(np.asarray(grads[2].values), 0))


def _is_first_variant(adjoint):
    """Whether `adjoint` is the first enrolled instance of its class."""
    first = next(a for a, _ in all_adjoints if type(a) is type(adjoint))
    return first == adjoint


def _checks_grad_of_vmap(sampler, adjoint):
    # vmap(grad), on every pair, batches every sampler's step and every strategy's
    # backward pass. grad(vmap) batches the same functions and differs only in the
    # order of JAX's own transformations around the engine's one custom VJP, which
    # the samplers share: it runs with each strategy class's first variant on an
    # ODE and an SDE sampler, and on every reversible pair (ReversibleAdjoint's
    # backward is the sampler's own inverse step). (A trace of grad(vmap) is about a
    # fifth of a pair's compile time.)
    if isinstance(adjoint, aj.ReversibleAdjoint):
        return True
    return _is_first_variant(adjoint) and sampler in (aj.DPMSolver2(), aj.DDIM(eta=1.0))


def _matrix_pairs():
    # A reversible sampler meets the strategies other than ReversibleAdjoint only
    # through `init`/`step`/`output`, like any sampler; so it runs with the first
    # variant of each strategy class (the variants, e.g. DTO(checkpoints=3) or
    # AdjointDEIS(order=2), run with the explicit samplers). AdjointDPM solves the
    # continuous adjoint with diffrax from the final state whatever the forward
    # sampler; a row costs ~13 s of compilation, so it runs with one sampler (its
    # samplers and orders are tested in test_adjoint_dpm.py).
    # The samplers with a start-up evaluation (reversible Heun, leapfrog: their step 0
    # runs outside the scan, and the recorded and interpolated adjoints take steps
    # their own way) run with every class; McCallumFoster and BELM with DTO, the
    # continuous adjoint and ReversibleAdjoint; BDIA and EDICT, which have BELM's
    # interface (two x-sized slots, `rebuild = "shared"`), with ReversibleAdjoint.
    # Truncated runs a sampler through DTO's own step loop (after a detached part):
    # a multistep, a stochastic and a start-up sampler cover its paths.
    def keep(s, a):
        if any(s == d for d in diffusers_samplers) or s == aj.ExpRK("bosh3"):
            return a in (aj.DTO(), aj.AdjointDEIS())
        if isinstance(a, aj.AdjointDPM):  # its backward solve never sees the sampler
            return s == aj.DPMSolver2()
        if isinstance(a, aj.Truncated):
            return s in (aj.DPMSolver2(), aj.DDIM(eta=1.0), aj.ReversibleHeun())
        if not isinstance(s, aj.AbstractReversibleSampler):
            # A strategy's variants (DTO(checkpoints=3), AdjointDEIS(order=2), …)
            # share their class's interface with the samplers, which the first
            # variant meets with every explicit sampler: the others run with a
            # multistep ODE sampler and an SDE one (its noise in the backward pass).
            return _is_first_variant(a) or s in (aj.DPMSolver2(), aj.DDIM(eta=1.0))
        if not _is_first_variant(a) or isinstance(a, aj.AdjointDPM):
            return False
        if s.startup_eval:
            return True
        if isinstance(s, (aj.BDIA, aj.EDICT)):  # (checked against DTO there)
            return isinstance(a, aj.ReversibleAdjoint)
        return isinstance(a, (aj.DTO, aj.AdjointDEIS, aj.ReversibleAdjoint))

    return [(s, a, e) for s, a, e in valid_pairs() if keep(s, a)]


@pytest.mark.parametrize("pair", _matrix_pairs(), ids=_pid)
def test_matrix(pair):
    sampler, adjoint, exact = pair
    run, traces = _checks(sampler, adjoint)
    (value, grads), g_vmap, g_of_vmap, samples = run(PB.params, X_T)
    assert all(np.all(np.isfinite(g)) for g in jtu.tree_leaves(grads))
    assert isinstance(grads[2], aj.Scheduled)

    # Same forward value whatever the strategy; exact strategies equal DTO and
    # finite differences. (Approximate strategies are far from DTO at N = 5; their
    # accuracy is tested where it means something, in test_continuous_adjoints.py.)
    forward, (value_dto, grads_dto) = _dto(sampler)
    assert np.allclose(value, value_dto, rtol=1e-12)
    assert jtu.tree_structure(grads) == jtu.tree_structure(grads_dto)
    if exact:
        assert tree_allclose(grads, grads_dto, rtol=1e-8, atol=1e-10)
        _finite_difference_check(forward, grads, seed=0)

    # Example 0 of the vmap is the base point with constant conditioning: the
    # per-step gradients sum to its gradient, and the gradient through the
    # closed-over weights is the gradient through `params`.
    # (Leaf by leaf, as below: SDEDPMSolverPP's adjoints reach 1e4 and cancel to
    # 1e-6 in some weights.)
    assert _leafwise_close(_index(g_vmap, 0), _summed(grads), rtol=1e-9)

    # vmap(grad) (through the closure) and grad(vmap) equal a Python loop over the
    # examples of the gradient through `params` (the loop calls the same jitted
    # function, which must not recompile).
    # (Each leaf to 1e-9 / 1e-10 of its own largest entry: the SDE rows' adjoints
    # reach 1e6 and cancel down to O(10) in some weights, where the two programs'
    # round-off differs by up to 4e-9 absolute; EDICT's reach 1e7, with 1e-5
    # differences in O(1) entries.)
    for i in range(2):
        (_, loop_grads), *_ = run(_index(W_BATCH, i), X_BATCH[i])
        loop = _summed(loop_grads)
        assert _leafwise_close(_index(g_vmap, i), loop, rtol=1e-9)
        if g_of_vmap is not None:
            assert _leafwise_close(_index(g_of_vmap, i), loop[:2], rtol=1e-10)

    assert len(traces) == 1
    if samples is not None:  # one zero-length step changes no sample
        assert_padded_sample_is_the_sample(sampler, *samples)
    if not _is_first_variant(adjoint) or sampler in diffusers_samplers:
        return
    # A float32 state with a model that computes and returns bfloat16 (weights in
    # bfloat16): the policy casts ε to the state's dtype; every cotangent comes back
    # in its input's dtype; the gradient is float64's with the same rounded weights
    # up to bfloat16 round-off. (Once per sampler and adjoint class: the dtype
    # policy lives in the model call and in each class's backward, which a class's
    # variants share. The diffusers schedulers' samplers, built from the same steps'
    # parts, are not repeated here: each one's float32 state is checked against
    # float64 with DTO in test_sample.py, and in bfloat16 against diffusers in its
    # test_diffusers_* file.)
    f32 = lambda tree: jtu.tree_map(lambda a: a.astype(jnp.float32), tree)
    p16 = jtu.tree_map(lambda a: a.astype(jnp.bfloat16), PB.params)
    (_, g64), *_ = run(jtu.tree_map(lambda a: a.astype(jnp.float64), p16), X_T)
    g16 = _bf16_grads(sampler, adjoint)(p16, f32(X_T), f32(SCHED))
    dtypes = lambda tree: jtu.tree_map(lambda a: a.dtype, tree)
    assert dtypes(g16) == dtypes((p16, f32(X_T), f32(SCHED)))
    # bfloat16's unit round-off is 2⁻⁸ ≈ 4e-3; measured over the matrix the error
    # stays below 0.2, except AdjointDEIS' backward re-solve of the SDE path, whose
    # drift (see its docstring) amplifies the noise to 0.7.
    sde_resolve = sampler.is_sde and isinstance(adjoint, aj.AdjointDEIS)
    for part16, part64 in zip(g16, g64):
        err = _rel(part16, part64)
        assert err < (1.0 if sde_resolve else 0.3), err


def test_invalid_pairs_raise_naming_both():
    for sampler in all_samplers:
        for adjoint, _ in all_adjoints:
            try:
                adjoint.check_sampler(sampler)
            except ValueError as e:
                msg = str(e)
                assert repr(adjoint) in msg and repr(sampler) in msg, msg
                with pytest.raises(ValueError):
                    aj.sample(PB.model, PB.params, X_T, COND, **_kw(sampler, adjoint))


def test_matrix_covers_every_strategy_and_sampler():
    pairs = _matrix_pairs()
    assert {repr(s) for s, _, _ in pairs} == {repr(s) for s in all_samplers}
    assert {repr(a) for _, a, _ in pairs} == {repr(a) for a, _ in all_adjoints}
