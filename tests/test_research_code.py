"""Patterns of research code that once gave stale or crashing results: eager calls of
models that read globals or attributes, Python numbers in `cond` and `params`,
unhashable model callables (bound Flax Linen modules), and the messages for
mis-shaped guidance and non-numeric conditioning."""

import diffrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import adjoint_jax as aj
from adjoint_jax import _eager
from adjoint_jax.bench import MLPProblem

from .helpers import rel_err, tree_norm


PB = MLPProblem.make(jax.random.key(3), dim=2, width=4, cond_dim=2)
X_T = jax.random.normal(jax.random.key(4), (2, 2))
COND = jnp.array([0.3, -0.5])
TS = aj.time_grid(PB.schedule, 3, t_end=1e-3)

# One strategy of every way the model reaches a loop: DTO's own, the engine's custom
# VJP (continuous, interpolated, reversible), truncation, AdjointDPM's diffrax solve.
# (DTO(checkpoints="steps") and RecordedAdjoint take DTO's and AdjointDEIS' paths.)
STRATEGIES = [
    aj.DTO(),
    aj.AdjointDEIS(),
    aj.InterpolatedAdjoint(every=2),
    aj.ReversibleAdjoint(),
    aj.Truncated(last=1),
    aj.AdjointDPM(solver=diffrax.Heun()),
]


def _kw(adjoint):
    reversible = isinstance(adjoint, aj.ReversibleAdjoint)
    sampler = aj.AsyncLeapfrog() if reversible else aj.DPMSolver1()
    return dict(schedule=PB.schedule, ts=TS, sampler=sampler, adjoint=adjoint)


def _loss(x0):
    return jnp.sum(jnp.sin(x0) + 0.3 * x0**2)


def _close(x, ref, tol=1e-12):
    """Same structure, and every leaf within `tol` of the reference in norm."""
    assert jtu.tree_structure(x) == jtu.tree_structure(ref)
    return all(
        (tree_norm(a) == 0) if tree_norm(b) == 0 else rel_err(a, b) <= tol
        for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(ref))
    )


def _value_and_grad(model, adjoint, params=None, cond=COND):
    params = PB.params if params is None else params
    return jax.value_and_grad(
        lambda x: _loss(aj.sample(model, params, x, cond, **_kw(adjoint)))
    )(X_T)


# ---- eager calls are never stale ----------------------------------------------------
_W = jnp.asarray(1.0)  # read by `_global_model` at call time, reassigned by the test


def _global_model(p, x, t, c):
    return _W * PB.model(p, x, t, c)


def _explicit_model(p, x, t, c):
    w, p = p
    return w * PB.model(p, x, t, c)


class _Holder:  # not a pytree: its bound method is keyed as one object
    def __init__(self, w):
        self.w = w

    def eps(self, p, x, t, c):
        return self.w * PB.model(p, x, t, c)


@pytest.mark.parametrize("adjoint", STRATEGIES, ids=repr)
def test_eager_calls_read_current_globals_and_attributes(adjoint):
    global _W
    ref = lambda w: _value_and_grad(_explicit_model, adjoint, params=(w, PB.params))
    holder = _Holder(jnp.asarray(1.0))
    try:
        for w in (1.0, 2.0):
            _W = jnp.asarray(w)
            holder.w = jnp.asarray(w)
            expected = ref(jnp.asarray(w))
            assert _close(_value_and_grad(_global_model, adjoint), expected)
            assert _close(_value_and_grad(holder.eps, adjoint), expected)
    finally:
        _W = jnp.asarray(1.0)


_SCALE = 2.0  # a global Python number, a literal in the trace


def test_a_reassigned_global_number_recompiles():
    global _SCALE
    model = lambda p, x, t, c: _SCALE * PB.model(p, x, t, c)
    out = {}
    try:
        for s in (2.0, 3.0):
            _SCALE = s
            out[s] = aj.sample(model, PB.params, X_T, COND, **_kw(aj.DTO()))
    finally:
        _SCALE = 2.0
    scaled = lambda p, x, t, c: 3.0 * PB.model(p, x, t, c)
    ref = aj.sample(scaled, PB.params, X_T, COND, **_kw(aj.DTO()))
    np.testing.assert_allclose(out[3.0], ref, rtol=1e-14)
    assert not np.allclose(out[2.0], out[3.0])


def test_unchanged_reads_reuse_the_compiled_loop():
    traces = []

    def model(p, x, t, c):
        traces.append(None)
        return _global_model(p, x, t, c)

    holder = _Holder(jnp.asarray(0.7))
    for m in (model, holder.eps):
        aj.sample(m, PB.params, X_T, COND, **_kw(aj.DTO()))
    n = len(traces)
    entries = dict(_eager._COMPILED)
    for _ in range(3):
        aj.sample(model, PB.params, X_T, COND, **_kw(aj.DTO()))
        aj.sample(holder.eps, PB.params, X_T, COND, **_kw(aj.DTO()))
    assert len(traces) == n + 3  # the shape check's trace only
    assert all(_eager._COMPILED[k] is v for k, v in entries.items() if k in
               _eager._COMPILED)


# ---- Python numbers are ordinary leaves ---------------------------------------------
def _scaled_model(p, x, t, c):
    emb, scale = c
    return (p["gain"] * scale) * PB.model(p["net"], x, t, emb)


@pytest.mark.parametrize("adjoint", STRATEGIES, ids=repr)
def test_python_numbers_in_cond_and_params(adjoint):
    def grads(gain, scale):
        f = lambda x, net, emb: _loss(aj.sample(
            _scaled_model, {"net": net, "gain": gain}, x, (emb, scale), **_kw(adjoint)
        ))
        return jax.grad(f, argnums=(0, 1, 2))(X_T, PB.params, COND)

    expected = grads(jnp.asarray(0.5), jnp.asarray(3.0))
    assert _close(grads(0.5, 3), expected)
    # A Python float is traced where JAX traces it: differentiated through the cond.
    g = jax.grad(
        lambda s: _loss(aj.sample(_scaled_model, {"net": PB.params, "gain": 0.5},
                                  X_T, (COND, s), **_kw(adjoint)))
    )(3.0)
    g_array = jax.grad(
        lambda s: _loss(aj.sample(_scaled_model, {"net": PB.params, "gain": 0.5},
                                  X_T, (COND, s), **_kw(adjoint)))
    )(jnp.asarray(3.0))
    np.testing.assert_allclose(g, g_array, rtol=1e-12)


def test_python_numbers_under_jit_and_in_closures():
    adjoint = aj.AdjointDEIS()

    @jax.jit
    def f(x):
        model = lambda p, x, t, c: 0.5 * _scaled_model(p, x, t, (c, 3.0))
        return jax.grad(lambda x: _loss(aj.sample(
            model, {"net": PB.params, "gain": 1.0}, x, COND, **_kw(adjoint)
        )))(x)

    expected = jax.grad(lambda x: _loss(aj.sample(
        _scaled_model, {"net": PB.params, "gain": jnp.asarray(0.5)}, x,
        (COND, jnp.asarray(3.0)), **_kw(adjoint)
    )))(X_T)
    np.testing.assert_allclose(f(X_T), expected, rtol=1e-12)


# ---- unhashable callables -----------------------------------------------------------
class _Linen(nn.Module):
    @nn.compact
    def __call__(self, x, t, c):
        h = jnp.concatenate([x, jnp.broadcast_to(c, x.shape[:-1] + c.shape)], -1)
        dense = lambda n: nn.Dense(n, param_dtype=x.dtype)
        return dense(2)(jnp.tanh(dense(8)(h))) * t


_LINEN = _Linen()
_VARS = _LINEN.init(jax.random.key(0), X_T, 0.5, COND)


@pytest.mark.parametrize("adjoint", [aj.DTO(), aj.AdjointDEIS()], ids=repr)
def test_bound_linen_module_closed_over(adjoint):
    def loss(v, x):
        bound = _LINEN.bind(v)  # refuses __hash__: "modules that hold variables"
        return _loss(aj.sample(lambda p, x, t, c: bound(x, t, c), None, x, COND,
                               **_kw(adjoint)))

    def loss_apply(v, x):
        model = lambda p, x, t, c: _LINEN.apply(p, x, t, c)
        return _loss(aj.sample(model, v, x, COND, **_kw(adjoint)))

    expected = jax.grad(loss_apply, argnums=(0, 1))(_VARS, X_T)
    assert _close(jax.grad(loss, argnums=(0, 1))(_VARS, X_T), expected)
    assert _close(jax.jit(jax.grad(loss, argnums=(0, 1)))(_VARS, X_T),
                         expected)
    # Bound eagerly, then the variables change: the eager call reads them anew.
    v2 = jtu.tree_map(lambda a: 1.5 * a, _VARS)
    bound = _LINEN.bind(_VARS)
    model = lambda p, x, t, c: bound(x, t, c)
    aj.sample(model, None, X_T, COND, **_kw(adjoint))
    bound = _LINEN.bind(v2)
    model2 = lambda p, x, t, c: bound(x, t, c)
    np.testing.assert_allclose(
        aj.sample(model2, None, X_T, COND, **_kw(adjoint)),
        aj.sample(lambda p, x, t, c: _LINEN.apply(p, x, t, c), v2, X_T, COND,
                  **_kw(adjoint)),
        rtol=1e-13,
    )


class _NoEq:  # refuses both __hash__ and __eq__
    def __init__(self, w):
        self.w = w

    def __hash__(self):
        raise TypeError("unhashable")

    def __eq__(self, other):
        raise TypeError("no comparison")

    def __call__(self, p, x, t, c):
        return self.w * PB.model(p, x, t, c)


def test_callables_refusing_hash_and_eq():
    out = aj.sample(_NoEq(jnp.asarray(2.0)), PB.params, X_T, COND, **_kw(aj.DTO()))
    ref = aj.sample(_explicit_model, (jnp.asarray(2.0), PB.params), X_T, COND,
                    **_kw(aj.DTO()))
    np.testing.assert_allclose(out, ref, rtol=1e-14)


# ---- messages -----------------------------------------------------------------------
def test_cfg_names_null_cond():
    kw = _kw(aj.DTO())
    with pytest.raises(ValueError, match=r"`null_cond`.*structure"):
        aj.sample(aj.cfg(PB.model, 3.0, {"a": COND}), PB.params, X_T, COND, **kw)
    with pytest.raises(ValueError, match=r"`null_cond`.*shape \(3,\).*\(2,\)"):
        aj.sample(aj.cfg(PB.model, 3.0, jnp.zeros(3)), PB.params, X_T, COND, **kw)
    # Broadcastable null conditionings still work (a scalar zero).
    aj.sample(aj.cfg(PB.model, 3.0, 0.0), PB.params, X_T, COND, **kw)


def test_non_numeric_cond_leaf_names_cond_and_its_path():
    model = lambda p, x, t, c: PB.model(p, x, t, c["emb"])
    with pytest.raises(TypeError, match=r"`cond`.*str at cond\['name'\]"):
        aj.sample(model, PB.params, X_T, {"emb": COND, "name": "cat"},
                  **_kw(aj.DTO()))


def test_eager_call_transfers_nothing_once_warm():
    kw = dict(_kw(aj.AdjointDEIS()), ts=jnp.asarray(TS))
    sample = lambda x: aj.sample(PB.model, PB.params, x, COND, **kw)

    def value_and_vjp(ct):  # (jax.grad's own seed would be a transfer of JAX's)
        x0, pullback = jax.vjp(sample, X_T)
        return x0, pullback(ct)

    ct = jnp.ones_like(X_T)
    expected = value_and_vjp(ct)
    with jax.transfer_guard("disallow"):
        out = value_and_vjp(ct)
    assert _close(out, expected, tol=0)
