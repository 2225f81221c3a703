"""`aj.sample` with `aj.DTO`: finite differences, checkpointing, transforms, dtypes,
pytrees and input validation."""

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import adjoint_jax as aj
from adjoint_jax.bench import GaussianProblem, MLPProblem

from .helpers import all_samplers, default_key, rel_err, sample_kwargs, tree_allclose


BASE_SAMPLERS = [aj.DPMSolver1(), aj.DPMSolver2(), aj.SDEDPMSolver1()]


def _mlp(key=jax.random.key(1), **kw):
    return MLPProblem.make(key, dim=3, width=16, cond_dim=2, **kw)


def _loss(x0):
    return jnp.sum(jnp.sin(x0) + 0.3 * x0**2)


# DTO's checkpointed variants equal DTO for every sampler in the cross-strategy
# matrix (tests/test_matrix.py); here, more binomial checkpoints than steps.
def test_more_checkpoints_than_steps(getkey):
    pb = _mlp()
    x_T = jax.random.normal(getkey(), (2, 3))
    cond = jax.random.normal(getkey(), (2,))
    results = []
    for adjoint in [aj.DTO(), aj.DTO(checkpoints=100)]:
        kw = sample_kwargs(pb.schedule, 17, aj.DPMSolver2(), adjoint)
        results.append(
            jax.grad(lambda p, x, c: _loss(aj.sample(pb.model, p, x, c, **kw)),
                     argnums=(0, 1, 2))(pb.params, x_T, cond)
        )
    assert tree_allclose(results[1], results[0], rtol=1e-10, atol=1e-12)


def test_jitted_gradient_does_not_recompile(getkey):
    pb = _mlp()
    traces = []

    @jax.jit
    def grad_fn(p, x, ts):
        traces.append(None)
        return jax.grad(lambda xx: _loss(aj.sample(
            pb.model, p, xx, None, schedule=pb.schedule, ts=ts,
            sampler=aj.DPMSolver1(), adjoint=aj.DTO())))(x)

    ts = aj.time_grid(pb.schedule, 8, t_end=1e-3)
    g1 = grad_fn(pb.params, jax.random.normal(getkey(), (3,)), ts)
    g2 = grad_fn(pb.params, jax.random.normal(getkey(), (3,)), ts * 0.999)
    assert len(traces) == 1
    assert not np.allclose(g1, g2)


def test_jit_of_sample_with_traced_ts_checks_values(getkey):
    pb = _mlp()
    f = jax.jit(lambda ts: aj.sample(pb.model, pb.params, jnp.ones(3), None,
                                     schedule=pb.schedule, ts=ts,
                                     sampler=aj.DPMSolver1()))
    f(aj.time_grid(pb.schedule, 4, t_end=1e-3))
    with pytest.raises(Exception, match="must be decreasing"):
        jax.block_until_ready(f(jnp.array([0.5, 0.6, 0.1, 0.01, 0.001])))
    with pytest.raises(Exception, match="must start with a step of nonzero length"):
        jax.block_until_ready(f(jnp.full(5, 0.5)))


def _temp_bytes(checkpoints, n):
    pb = MLPProblem.make(jax.random.key(0), dim=16, width=256, cond_dim=2)
    x_T = jnp.zeros((64, 16))
    kw = sample_kwargs(pb.schedule, n, aj.DPMSolver1(), aj.DTO(checkpoints=checkpoints))
    f = jax.jit(jax.grad(lambda p: _loss(aj.sample(pb.model, p, x_T, None, **kw))))
    return f.lower(pb.params).compile().memory_analysis().temp_size_in_bytes


def test_binomial_checkpointing_uses_less_memory():
    full = _temp_bytes(None, 128)
    steps = _temp_bytes("steps", 128)
    binom = _temp_bytes(8, 128)
    # Everything: ≥ N activations of 64×256; per-step states: N states of 64×16;
    # binomial: 8 states.
    assert binom < steps < full, (binom, steps, full)
    assert binom < full / 4, (binom, full)


@pytest.mark.parametrize("sampler", all_samplers, ids=repr)
def test_float32_close_to_float64(sampler):
    pb64 = GaussianProblem.make(4)
    pb32 = GaussianProblem.make(4, dtype=jnp.float32)
    x_T = jnp.array([0.3, -1.2, 2.0, 0.7])
    kw = sample_kwargs(pb64.schedule, 20, sampler, aj.DTO(), key=default_key())

    def run(pb, x):
        def f(p, xx):
            x0 = aj.sample(pb.model, p, xx, None, **kw)
            return _loss(x0), x0

        (_, x0), g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(pb.params, x)
        return x0, g

    # Both precisions in one compiled program.
    (x64, g64), (x32, g32) = jax.jit(
        lambda: (run(pb64, x_T), run(pb32, x_T.astype(jnp.float32))))()
    assert x32.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jtu.tree_leaves(g32))
    assert rel_err(x32.astype(jnp.float64), x64) < 1e-3
    for a, b in zip(jtu.tree_leaves(g32), jtu.tree_leaves(g64)):
        assert rel_err(a.astype(jnp.float64), b) < 1e-3


def test_pytree_state_and_cond(getkey):
    # x_T and cond as dicts; the model adds a scalar conditioning to both parts.
    sch = aj.VPLinear()

    def model(p, x, t, c):
        return {"a": jnp.tanh(p * x["a"] + c["z"]), "b": jnp.sin(x["b"] * t) * p}

    x_T = {"a": jax.random.normal(getkey(), (2, 2)), "b": jax.random.normal(getkey(), (3,))}
    cond = {"z": jnp.array(0.3)}
    kw = sample_kwargs(sch, 6, aj.DPMSolver2(), aj.DTO())
    out = aj.sample(model, jnp.array(0.7), x_T, cond, **kw)
    assert jtu.tree_structure(out) == jtu.tree_structure(x_T)
    g = jax.grad(lambda c: sum(jnp.sum(v) for v in jtu.tree_leaves(
        aj.sample(model, jnp.array(0.7), x_T, c, **kw))))(cond)
    assert jnp.isfinite(g["z"]) and g["z"] != 0


def test_equinox_module_model_is_differentiated(getkey):
    import equinox as eqx

    class Net(eqx.Module):
        w: jax.Array

        def __call__(self, params, x, t, c):
            return jnp.tanh(self.w * x) * params

    net = Net(jnp.array(0.5))
    sch = aj.VPLinear()
    kw = sample_kwargs(sch, 6, aj.DPMSolver1(), aj.DTO())
    x_T = jax.random.normal(getkey(), (3,))
    g = eqx.filter_grad(lambda m: jnp.sum(aj.sample(m, jnp.array(1.0), x_T, None, **kw)))(net)
    assert g.w != 0


# ---- bad input ---------------------------------------------------------------------
def _call(**over):
    pb = GaussianProblem.make(4)
    kw = dict(model=pb.model, params=pb.params, x_T=jnp.ones(4), cond=None,
              schedule=pb.schedule, ts=aj.time_grid(pb.schedule, 5, t_end=1e-3),
              sampler=aj.DPMSolver1(), adjoint=aj.DTO(), key=None)
    kw.update(over)
    return aj.sample(kw.pop("model"), kw.pop("params"), kw.pop("x_T"), kw.pop("cond"),
                     **kw)


def test_bad_ts():
    with pytest.raises(ValueError, match="`ts` must be decreasing"):
        _call(ts=jnp.array([1.0, 0.5, 0.6, 0.1]))
    with pytest.raises(ValueError, match="must start with a step of nonzero length"):
        _call(ts=jnp.array([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"`ts` must lie in \[schedule.t_min"):
        _call(ts=jnp.array([1.5, 0.5, 0.1]))
    with pytest.raises(ValueError, match=r"`ts` must lie in"):
        _call(ts=jnp.array([1.0, 0.5, -0.1]))
    with pytest.raises(ValueError, match=r"len\(ts\) >= 2"):
        _call(ts=jnp.array([1.0]))
    with pytest.raises(ValueError, match=r"len\(ts\) >= 2"):
        _call(ts=jnp.ones((2, 2)))


def test_bad_model_output():
    with pytest.raises(ValueError, match="`model`.*must return ε with the structure"):
        _call(model=lambda p, x, t, c: x[:2])


def test_bad_scheduled_length():
    with pytest.raises(ValueError, match=r"leading axis of length len\(ts\) - 1 = 5"):
        _call(cond=aj.Scheduled(jnp.zeros((4, 4))))


def test_sde_without_key():
    with pytest.raises(ValueError, match="stochastic and needs either `key="):
        _call(sampler=aj.SDEDPMSolver1())


def test_non_floating_x_T():
    with pytest.raises(TypeError, match="`x_T` must be a pytree of floating-point"):
        _call(x_T=jnp.ones(4, dtype=jnp.int32))


def test_bad_types():
    with pytest.raises(TypeError, match="`schedule`"):
        _call(schedule="vp")
    with pytest.raises(TypeError, match="`sampler`"):
        _call(sampler="ddim")
    with pytest.raises(TypeError, match="`adjoint`"):
        _call(adjoint="dto")
    with pytest.raises(ValueError, match="checkpoints"):
        aj.DTO(checkpoints=0)
    with pytest.raises(ValueError, match="checkpoints"):
        aj.DTO(checkpoints="all")
