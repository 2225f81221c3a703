"""`aj.sample` inside real JAX code, beyond the cross-strategy matrix: gradients with
respect to schedule parameters, fresh model callables, forward mode, the dtype
policy, and the validation of values and constructor arguments."""

import gc
import re

import diffrax
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import psutil
import pytest

import adjoint_jax as aj
from adjoint_jax.bench import MLPProblem

from .helpers import all_adjoints, all_samplers, default_key, rel_err, sample_kwargs
from .test_matrix import _matrix_pairs


PB = MLPProblem.make(jax.random.key(1), dim=3, width=8, cond_dim=2)
X_T = jax.random.normal(jax.random.key(2), (2, 3))
COND = jnp.array([0.3, -0.5])
TS = aj.time_grid(PB.schedule, 6, t_end=1e-3)
CUSTOM = [a for a, _ in all_adjoints if isinstance(a, aj.AbstractCustomAdjoint)]


def _model(p, x, t, c):
    return PB.model(p, x, t, c)


def _loss(x0):
    return jnp.sum(jnp.sin(x0) + 0.3 * x0**2)


def _schedule_loss(schedule, ts, sampler=aj.DPMSolver2(), adjoint=aj.DTO()):
    return _loss(aj.sample(_model, PB.params, X_T, COND, schedule=schedule, ts=ts,
                           sampler=sampler, adjoint=adjoint))


def _central(f, x, h):
    return (f(x + h) - f(x - h)) / (2 * h)


# ---- schedule parameters ------------------------------------------------------------
@pytest.mark.parametrize(
    "make, value",
    [
        (lambda b: aj.VPLinear(beta_max=b), 20.0),
        (lambda b: aj.VPLinear(beta_min=b), 0.1),
        (lambda s: aj.VPCosine(s=s), 0.008),
    ],
    ids=["beta_max", "beta_min", "cosine_s"],
)
def test_schedule_parameter_gradient_matches_finite_differences(make, value):
    def f(v):
        ts = aj.time_grid(PB.schedule, 8, t_end=1e-3, t_start=0.99)
        return _schedule_loss(make(v), ts)

    f(value)  # an earlier call with the same value must not freeze it as a constant
    g = jax.grad(f)(value)
    fd = _central(f, value, 1e-5 * value)
    assert g != 0.0
    np.testing.assert_allclose(g, fd, rtol=1e-6)
    # Another value afterwards is fine too (no "static arguments" error) and jitted.
    np.testing.assert_allclose(
        jax.jit(jax.grad(f))(1.1 * value),
        _central(f, 1.1 * value, 1e-5 * value),
        rtol=1e-6,
    )


def test_vpdiscrete_betas_differentiable_with_dto():
    betas = jnp.linspace(1e-4, 0.02, 100)
    direction = jnp.cos(jnp.arange(100.0)) * 1e-4

    def f(bs):
        sch = aj.VPDiscrete(bs)
        return _schedule_loss(sch, aj.time_grid(sch, 6, t_end=0.05))

    g = jax.grad(f)(betas)
    fd = _central(lambda s: f(betas + s * direction), 0.0, 1e-4)
    np.testing.assert_allclose(jnp.vdot(g, direction), fd, rtol=1e-6)
    # Traced betas outside (0, 1) are an error at run time, not a silent NaN.
    with pytest.raises(Exception, match=r"every beta in \(0, 1\)"):
        jax.block_until_ready(jax.jit(f)(betas.at[3].set(1.5)))


@pytest.mark.parametrize("adjoint", CUSTOM, ids=repr)
def test_custom_strategies_refuse_schedule_gradients(adjoint):
    sampler = (
        aj.ReversibleHeun()
        if isinstance(adjoint, aj.ReversibleAdjoint)
        else (aj.DPMSolver1())
    )

    def f(b):
        return _schedule_loss(aj.VPLinear(beta_max=b), TS, sampler, adjoint)

    with pytest.raises(
        ValueError,
        match="cannot differentiate with respect to the "
        "schedule's parameters; use `adjoint=aj.DTO\\(\\)`",
    ):
        jax.grad(f)(20.0)


def test_schedule_values_do_not_key_the_compilation():
    traces = []

    def model(p, x, t, c):
        traces.append(None)
        return PB.model(p, x, t, c)

    for b in [20.0, 19.0, 18.0]:
        aj.sample(
            model,
            PB.params,
            X_T,
            COND,
            schedule=aj.VPLinear(beta_max=b),
            ts=TS,
            sampler=aj.DPMSolver1(),
        )
    # Traced once (plus the eager shape check of each call), not once per value.
    assert len(traces) == 3 + 1


# ---- fresh callables ----------------------------------------------------------------
def _rss_growth_mib(fn, calls):
    for _ in range(3):
        fn()
    gc.collect()
    before = psutil.Process().memory_info().rss
    for _ in range(calls):
        jax.block_until_ready(fn())
    gc.collect()
    return (psutil.Process().memory_info().rss - before) / 2**20


_TINY = MLPProblem.make(jax.random.key(1), dim=2, width=4, cond_dim=2)
_TINY_KW = dict(
    schedule=_TINY.schedule,
    ts=aj.time_grid(_TINY.schedule, 2, t_end=1e-3),
    sampler=aj.DPMSolver1(),
    adjoint=aj.AdjointDEIS(),
)


def test_fresh_lambdas_hold_memory_flat_and_do_not_recompile():
    traces = []

    def loss(z):
        # A new lambda per call, closing over the value being differentiated, as a
        # guidance wrapper built inside the loss is.
        def fresh(p, x, t, c):
            traces.append(None)
            return _TINY.model(p, x, t, z)

        return jnp.sum(
            aj.sample(fresh, _TINY.params, jnp.ones((1, 2)), None, **_TINY_KW)
        )

    grad = jax.grad(loss)
    z = jnp.array([0.2, 0.1])
    growth = _rss_growth_mib(lambda: grad(z), 120)
    assert growth < 40, f"RSS grew by {growth:.1f} MiB over 120 calls"
    # Traced for the loop once; afterwards each call only runs the eager shape check.
    assert len(traces) <= 3 + 2 + 120
    # And the gradient through the closure is the gradient through `cond`.
    ref = jax.grad(
        lambda c: jnp.sum(
            aj.sample(_TINY.model, _TINY.params, jnp.ones((1, 2)), c, **_TINY_KW)
        )
    )(z)
    np.testing.assert_allclose(grad(z), ref, rtol=1e-12)


class _Scale:  # a callable that is not a pytree: keyed by identity, cannot be opened
    def __init__(self, w):
        self.w = w

    def __call__(self, p, x, t, c):
        return self.w * _TINY.model(p, x, t, c)


def test_fresh_opaque_callables_release_their_compilations():
    from adjoint_jax import _eager

    grad = jax.grad(
        lambda x: jnp.sum(aj.sample(_Scale(1.0), _TINY.params, x, None, **_TINY_KW))
    )
    x = jnp.ones((1, 2))
    grad(x)
    entries = len(_eager._COMPILED)
    growth = _rss_growth_mib(lambda: grad(x), 10)
    # Each call compiles (a new object is a new function to JAX), but what it
    # compiled is dropped with the object (kept, it was ~5 MiB per call).
    assert len(_eager._COMPILED) <= entries
    assert growth < 20, f"RSS grew by {growth:.1f} MiB over 10 calls"


def test_same_model_callable_compiles_once_eagerly():
    traces = []

    def model(p, x, t, c):
        traces.append(None)
        return PB.model(p, x, t, c)

    grad = jax.grad(
        lambda x: _loss(
            aj.sample(
                model,
                PB.params,
                x,
                COND,
                schedule=PB.schedule,
                ts=TS,
                sampler=aj.DPMSolver2(),
                adjoint=aj.AdjointDEIS(),
            )
        )
    )
    grad(X_T)
    n = len(traces)
    for k in range(3):
        grad(X_T + k)
    # Each further eager call only runs the shape check (one abstract evaluation).
    assert len(traces) == n + 3


# ---- forward mode -------------------------------------------------------------------
def _f(adjoint, sampler=None):
    sampler = sampler or (
        aj.ReversibleHeun()
        if isinstance(adjoint, aj.ReversibleAdjoint)
        else aj.DPMSolver1()
    )
    return lambda x: _loss(
        aj.sample(
            _model,
            PB.params,
            x,
            COND,
            schedule=PB.schedule,
            ts=TS,
            sampler=sampler,
            adjoint=adjoint,
        )
    )


@pytest.mark.parametrize("adjoint", [aj.DTO(), aj.DTO(checkpoints="steps")], ids=repr)
def test_dto_forward_mode(adjoint):
    f = _f(adjoint)
    v = jnp.ones_like(X_T)
    _, tangent = jax.jvp(f, (X_T,), (v,))
    np.testing.assert_allclose(tangent, jnp.vdot(jax.grad(f)(X_T), v), rtol=1e-10)
    x0 = lambda x: aj.sample(
        _model,
        PB.params,
        x,
        COND,
        schedule=PB.schedule,
        ts=TS,
        sampler=aj.DPMSolver1(),
        adjoint=adjoint,
    )
    np.testing.assert_allclose(jax.jacfwd(x0)(X_T), jax.jacrev(x0)(X_T), rtol=1e-9)
    # Hessian-vector product (jvp of grad) against differences of gradients.
    hvp = jax.jvp(jax.grad(f), (X_T,), (v,))[1]
    fd = (jax.grad(f)(X_T + 1e-5 * v) - jax.grad(f)(X_T - 1e-5 * v)) / 2e-5
    np.testing.assert_allclose(hvp, fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "adjoint",
    [a for a, _ in all_adjoints if a.forward_mode_error() is not None],
    ids=repr,
)
def test_reverse_only_strategies_say_so(adjoint):
    f = _f(adjoint)
    pattern = re.escape(repr(adjoint)) + r".*forward-mode.*aj\.DTO\(\)"
    with pytest.raises(TypeError, match=pattern):
        jax.jvp(f, (X_T,), (jnp.ones_like(X_T),))
    with pytest.raises(TypeError, match=pattern):
        jax.jacfwd(f)(X_T)
    with pytest.raises(TypeError, match=pattern):  # forward mode inside jit
        jax.jit(lambda x: jax.jvp(f, (x,), (jnp.ones_like(x),)))(X_T)


def test_grad_of_grad_through_binomial_checkpointing_says_so():
    f = _f(aj.DTO(checkpoints=2))
    jax.grad(f)(X_T)  # first order is fine
    with pytest.raises(RuntimeError, match=r"DTO\(checkpoints=2\).*aj\.DTO\(\)"):
        jax.grad(lambda x: jnp.sum(jax.grad(f)(x)))(X_T)


def test_second_order_through_reversible_adjoint_is_exact():
    v = jnp.ones_like(X_T)
    hvp = lambda adj: jax.jvp(jax.grad(_f(adj, aj.AsyncLeapfrog())), (X_T,), (v,))[1]
    np.testing.assert_allclose(hvp(aj.ReversibleAdjoint()), hvp(aj.DTO()), rtol=1e-9)


# ---- dtypes -------------------------------------------------------------------------
def test_model_output_dtype_is_cast_to_the_state():
    p32 = jtu.tree_map(lambda a: a.astype(jnp.float32), PB.params)
    x32, c32 = X_T.astype(jnp.float32), COND.astype(jnp.float32)

    def model64(p, x, t, c):  # returns float64 under a float32 state
        return PB.model(
            jtu.tree_map(lambda a: a.astype(jnp.float64), p),
            x.astype(jnp.float64),
            t.astype(jnp.float64),
            c.astype(jnp.float64),
        )

    for adjoint in [
        aj.DTO(),
        aj.AdjointDEIS(),
        aj.ReversibleAdjoint(),
        aj.AdjointDPM(),
    ]:
        sampler = (
            aj.McCallumFoster(aj.DPMSolver2())
            if isinstance(adjoint, aj.ReversibleAdjoint)
            else aj.DPMSolver2()
        )
        kw = sample_kwargs(PB.schedule, 6, sampler, adjoint)
        x0 = aj.sample(model64, p32, x32, c32, **kw)
        assert x0.dtype == jnp.float32
        g = jax.grad(
            lambda p, x: jnp.sum(aj.sample(model64, p, x, c32, **kw)), argnums=(0, 1)
        )(p32, x32)
        assert {a.dtype for a in jtu.tree_leaves(g)} == {jnp.dtype(jnp.float32)}


def test_non_floating_model_output_is_refused():
    with pytest.raises(
        TypeError, match=r"`model` \(<lambda>\) returned ε of dtype int32"
    ):
        aj.sample(
            lambda p, x, t, c: jnp.zeros(x.shape, jnp.int32),
            PB.params,
            X_T,
            COND,
            **sample_kwargs(PB.schedule, 4, aj.DPMSolver1(), aj.DTO()),
        )


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=lambda d: d.__name__)
def test_adjoint_dpm_in_16_bit(dtype):
    p = jtu.tree_map(lambda a: a.astype(dtype), PB.params)
    kw = sample_kwargs(PB.schedule, 6, aj.DPMSolver1(), aj.AdjointDPM())
    f = lambda x: jnp.sum(
        aj.sample(PB.model, p, x, COND.astype(dtype), **kw).astype(jnp.float32)
    )
    g = jax.jit(jax.grad(f))(X_T.astype(dtype))
    g_ref = jax.grad(lambda x: jnp.sum(aj.sample(PB.model, PB.params, x, COND, **kw)))(
        X_T
    )
    assert g.dtype == dtype
    assert rel_err(g, g_ref) < 0.05


def test_reversible_adjoint_warns_on_16_bit_state():
    kw = sample_kwargs(PB.schedule, 4, aj.AsyncLeapfrog(), aj.ReversibleAdjoint())
    p = jtu.tree_map(lambda a: a.astype(jnp.float16), PB.params)
    with pytest.warns(UserWarning, match="Keep x_T in float32"):
        jax.grad(
            lambda x: jnp.sum(
                aj.sample(PB.model, p, x, COND.astype(jnp.float16), **kw)
            ).astype(jnp.float32)
        )(X_T.astype(jnp.float16))


def test_reversible_adjoint_float32_precision():
    """In float32 at N = 24 every reversible sampler's ReversibleAdjoint stays within
    2e-5 of its own DTO on this MLP, except reversible Heun, whose parasitic mode
    makes the discrete gradient itself ill-conditioned (its float32 DTO differs from
    float64 by ~1e-4; see its docstring), and EDICT, whose un-mixing multiplies the
    rebuilt states' round-off by 1/p² ≈ 1.16 per step (7e-5 measured)."""
    pb = MLPProblem.make(
        jax.random.key(1), dim=3, width=8, cond_dim=2, dtype=jnp.float32
    )
    x_T = jax.random.normal(jax.random.key(11), (2, 3), jnp.float32)
    ts = aj.time_grid(pb.schedule, 24, t_end=1e-3).astype(jnp.float32)
    errors = {}
    for sampler in [  # (BDIA shares BELM's backward pass)
        s for s in all_samplers
        if isinstance(s, aj.AbstractReversibleSampler) and s != aj.BDIA()
    ]:

        def grad(adjoint):
            f = lambda p: jnp.sum(
                jnp.sin(
                    aj.sample(
                        pb.model,
                        p,
                        x_T,
                        None,
                        schedule=pb.schedule,
                        ts=ts,
                        sampler=sampler,
                        adjoint=adjoint,
                    )
                )
            )
            return jax.jit(jax.grad(f))(pb.params)

        errors[repr(sampler)] = rel_err(grad(aj.ReversibleAdjoint()), grad(aj.DTO()))
    heun = errors.pop(repr(aj.ReversibleHeun()))
    edict = errors.pop(repr(aj.EDICT()))
    assert all(e < 2e-5 for e in errors.values()), errors
    assert heun < 1e-3
    assert edict < 2e-4


def test_mccallum_foster_warns_when_coupling_rounds_to_one():
    kw = sample_kwargs(PB.schedule, 4, aj.McCallumFoster(aj.DPMSolver1()), aj.DTO())
    p = jtu.tree_map(lambda a: a.astype(jnp.bfloat16), PB.params)
    with pytest.warns(UserWarning, match="rounds to 1.0 in the state's dtype bfloat16"):
        aj.sample(
            PB.model, p, X_T.astype(jnp.bfloat16), COND.astype(jnp.bfloat16), **kw
        )


# ---- validation ---------------------------------------------------------------------
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf], ids=["nan", "inf"])
def test_non_finite_ts_is_an_error_naming_ts(bad):
    ts = TS.at[3].set(bad)
    kw = dict(schedule=PB.schedule, sampler=aj.DPMSolver1())
    with pytest.raises(ValueError, match="`ts` contains NaN or inf"):
        aj.sample(_model, PB.params, X_T, COND, ts=ts, **kw)
    f = jax.jit(lambda ts: aj.sample(_model, PB.params, X_T, COND, ts=ts, **kw))
    with pytest.raises(Exception, match="`ts` contains NaN or inf"):
        jax.block_until_ready(f(ts))


@pytest.mark.parametrize("adjoint", [a for a, _ in all_adjoints], ids=repr)
def test_nan_from_the_model_propagates(adjoint):
    sampler = (
        aj.ReversibleHeun()
        if isinstance(adjoint, aj.ReversibleAdjoint)
        else (aj.DPMSolver1())
    )

    def model(p, x, t, c):  # NaN from the last step's evaluation on (t ≈ 0.025)
        return jnp.where(t < 0.05, jnp.nan, 1.0) * PB.model(p, x, t, c)

    kw = sample_kwargs(PB.schedule, 6, sampler, adjoint)
    f = lambda x: jnp.sum(aj.sample(model, PB.params, x, COND, **kw))
    value, grad = jax.jit(jax.value_and_grad(f))(X_T)
    assert jnp.isnan(value)
    assert jnp.all(jnp.isnan(grad))


def test_constructor_arguments_are_validated():
    with pytest.raises(ValueError, match=r"coupling=...\)` must lie in \(0, 1\]"):
        aj.McCallumFoster(aj.DPMSolver2(), coupling=jnp.array(1.5))
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        aj.McCallumFoster(aj.DPMSolver2(), coupling=-0.5)
    with pytest.raises(ValueError, match="must be a scalar"):
        aj.McCallumFoster(aj.DPMSolver2(), coupling=jnp.ones(2))
    with pytest.raises(
        ValueError,
        match=r"AdjointDPM\(solver=Euler\(\)\)` cannot solve "
        "the adjoint ODE: it needs an adaptive ODE solver",
    ):
        aj.AdjointDPM(solver=diffrax.Euler())
    with pytest.raises(ValueError, match="adaptive ODE solver"):
        aj.AdjointDPM(solver=diffrax.EulerHeun())  # an SDE solver
    with pytest.raises(TypeError, match=r"got the class `diffrax.Tsit5` itself"):
        aj.AdjointDPM(solver=diffrax.Tsit5)
    with pytest.raises(
        TypeError, match=r"got the class `adjoint_jax.DPMSolver2` itself"
    ):
        aj.McCallumFoster(aj.DPMSolver2)
    with pytest.raises(TypeError, match=r"rtol=..., atol=...\)` must be numbers"):
        aj.AdjointDPM(rtol="1e-6")
    with pytest.raises(ValueError, match="needs 0 < beta_min <= beta_max"):
        aj.VPLinear(beta_min=jnp.array(2.0), beta_max=1.0)
    with pytest.warns(UserWarning, match="set as static"):  # equinox's own warning
        with pytest.raises(TypeError, match="static bound"):
            aj.VPLinear(t_max=jnp.array(1.0))
    kw = dict(ts=TS, key=None)
    for arg, value, name in [
        ("sampler", aj.DPMSolver1, "adjoint_jax.DPMSolver1"),
        ("adjoint", aj.AdjointDEIS, "adjoint_jax.AdjointDEIS"),
        ("schedule", aj.VPLinear, "adjoint_jax.VPLinear"),
    ]:
        args = dict(
            schedule=PB.schedule, sampler=aj.DPMSolver1(), adjoint=aj.DTO(), **kw
        )
        args[arg] = value
        with pytest.raises(TypeError, match=rf"`{arg}` must be an instance .*`{name}`"):
            aj.sample(_model, PB.params, X_T, COND, **args)


def _suggested_adjoints(message: str):
    return re.findall(r"`adjoint=(aj\.[A-Za-z]+\([^`]*\))`", message)


def test_every_suggested_fix_works():
    """Each error about an invalid (sampler, adjoint) pair that suggests another
    strategy or a wrapped sampler suggests one that runs."""
    checked = 0
    # Each distinct suggested (sampler, adjoint) is run once, here or in the matrix
    # (test_matrix.py runs each of its pairs' gradient, finite, under jit and vmap).
    ran = {(repr(s), repr(a)) for s, a, _ in _matrix_pairs()}
    for sampler in all_samplers:
        for adjoint, _ in all_adjoints:
            try:
                adjoint.check_sampler(sampler)
                continue
            except ValueError as e:
                message = str(e)
            fixes = [
                (sampler, eval(a, {**vars(aj), "aj": aj}))
                for a in _suggested_adjoints(message)
            ]
            wrapped = re.findall(r"`(aj\.McCallumFoster\([^`]*\))`", message)
            fixes += [(eval(w, {**vars(aj), "aj": aj}), adjoint) for w in wrapped]
            assert fixes, message
            for smp, adj in fixes:
                adj.check_sampler(smp)  # accepted
                checked += 1
                if (repr(smp), repr(adj)) in ran:
                    continue
                ran.add((repr(smp), repr(adj)))
                kw = sample_kwargs(PB.schedule, 4, smp, adj, key=default_key())
                g = jax.grad(
                    lambda x: jnp.sum(aj.sample(_model, PB.params, x, COND, **kw))
                )(X_T)
                assert jnp.all(jnp.isfinite(g))
    assert checked >= 6
