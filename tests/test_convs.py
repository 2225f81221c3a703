"""The CPU convolution-layout fix (`adjoint_jax/_convs.py`): every convolution of a
gradient, inside the sampler's scans included, reaches XLA in NHWC/HWIO (the only
layout XLA:CPU runs on its fast kernels inside a loop), with values and derivatives
unchanged."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import adjoint_jax as aj
from adjoint_jax import _convs

from .helpers import all_eqns, tree_allclose


CANONICAL = {
    3: lax.ConvDimensionNumbers((0, 2, 1), (2, 1, 0), (0, 2, 1)),
    4: lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)),
}


@contextlib.contextmanager
def convs_fix(on: bool):
    old = _convs._STATE["force"]
    _convs._STATE["force"] = on
    try:
        yield
    finally:
        _convs._STATE["force"] = old


def conv_specs(jaxpr):
    """Dimension numbers (and group counts) of every convolution in `jaxpr` and the
    jaxprs nested in it."""
    return [eqn.params["dimension_numbers"] for eqn in all_eqns(jaxpr)
            if eqn.primitive.name == "conv_general_dilated"]


def odd_layouts(w1, w2, w3, x):
    """NHWC/HWIO, then NCHW-like with strides, dilations and asymmetric padding, then
    a 1-D convolution: each must come out equal and canonical."""
    y = lax.conv_general_dilated(x, w1, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jnp.tanh(y)  # (2, 8, 8, 5)
    y = lax.conv_general_dilated(
        y, w2, (2, 1), ((1, 1), (0, 2)), rhs_dilation=(1, 2),
        dimension_numbers=("NHCW", "OIHW", "NCHW"),
    )  # (2, 6, 4, 3)
    y = jnp.sin(y).reshape(2, 6, 12)
    y = lax.conv_general_dilated(y, w3, (1,), "VALID", dimension_numbers=("NCH", "OIH", "NCH"))
    return jnp.sum(jnp.cos(y))


def test_canonical_convs_values_derivatives_and_layouts(getkey):
    w1 = jax.random.normal(getkey(), (3, 3, 4, 5))
    w2 = jax.random.normal(getkey(), (6, 8, 3, 3))
    w3 = jax.random.normal(getkey(), (2, 6, 3))
    x = jax.random.normal(getkey(), (2, 8, 8, 4))
    args = (w1, w2, w3, x)
    fixed = _convs.canonical_convs(odd_layouts)
    assert np.allclose(odd_layouts(*args), fixed(*args), rtol=1e-13)
    grads = jax.grad(odd_layouts, argnums=(0, 1, 2, 3))(*args)
    assert tree_allclose(grads, jax.grad(fixed, argnums=(0, 1, 2, 3))(*args), rtol=1e-12)
    tangents = jax.tree.map(lambda a: jax.random.normal(getkey(), a.shape), args)
    _, jvp_ref = jax.jvp(odd_layouts, args, tangents)
    _, jvp_fix = jax.jvp(fixed, args, tangents)
    assert np.allclose(jvp_ref, jvp_fix, rtol=1e-12)
    # The forward pass and both gradients are canonical, in every dimension count.
    specs = conv_specs(jax.make_jaxpr(jax.grad(fixed, argnums=(0, 1, 2, 3)))(*args).jaxpr)
    assert len(specs) == 9
    assert all(s == CANONICAL[len(s.lhs_spec)] for s in specs)
    # Without the rewrite JAX's own gradient is not.
    plain = conv_specs(jax.make_jaxpr(jax.grad(odd_layouts, argnums=(0, 1, 2, 3)))(*args).jaxpr)
    assert any(s != CANONICAL[len(s.lhs_spec)] for s in plain)


def test_grouped_conv_left_alone(getkey):
    """Grouped convolutions are not rewritten (and stay correct)."""
    w = jax.random.normal(getkey(), (3, 3, 2, 4))
    x = jax.random.normal(getkey(), (1, 6, 6, 4))
    f = lambda w, x: jnp.sum(jnp.sin(lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)))
    g = _convs.canonical_convs(f)
    assert tree_allclose(jax.grad(f, (0, 1))(w, x), jax.grad(g, (0, 1))(w, x), rtol=1e-12)


class ConvEps:
    """A small ε-network written NCHW/OIHW, as `eqx.nn.Conv2d` and PyTorch ports are:
    its forward convolutions are non-canonical too."""

    def __call__(self, params, x, t, cond):
        w1, w2 = params
        h = lax.conv_general_dilated(x, w1, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
        h = jnp.tanh(h + t + cond)
        return 0.3 * lax.conv_general_dilated(h, w2, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))


@pytest.mark.parametrize(
    "sampler,adjoint",
    [
        (aj.DPMSolver2(), aj.DTO()),
        (aj.DPMSolver2(), aj.AdjointDEIS()),
        (aj.AsyncLeapfrog(), aj.ReversibleAdjoint()),
    ],
    ids=repr,
)
def test_sampler_gradients_unchanged_and_canonical(sampler, adjoint, getkey):
    """Through `aj.sample`: the gradient with the fix equals the gradient without it,
    and every convolution of the jitted gradient (the scans' bodies included) is
    NHWC/HWIO."""
    params = (0.3 * jax.random.normal(getkey(), (4, 2, 3, 3)), 0.3 * jax.random.normal(getkey(), (2, 4, 3, 3)))
    x_T = jax.random.normal(getkey(), (2, 2, 5, 5))
    cond = jnp.asarray(0.1)
    schedule = aj.VPLinear()
    ts = jnp.linspace(1.0, 1e-3, 5)

    def loss(params, x_T, cond):
        x0 = aj.sample(ConvEps(), params, x_T, cond, schedule=schedule, ts=ts,
                       sampler=sampler, adjoint=adjoint)
        return jnp.sum(jnp.sin(x0))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    with convs_fix(False):
        ref = grad(params, x_T, cond)
    with convs_fix(True):
        got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, x_T, cond)
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(params, x_T, cond).jaxpr
    assert tree_allclose(got, ref, rtol=1e-11, atol=1e-13)
    specs = conv_specs(jaxpr)
    assert specs and all(s == CANONICAL[4] for s in specs)


def test_counted_model_gradients_are_canonical(getkey):
    """`compare`'s evaluation counter wraps the model in its own custom VJP, which
    `aj.sample`'s rewrite does not enter: the counter rewrites the model itself, so
    the counted gradient (run for every pair by `adjoint-jax compare`) keeps every
    convolution NHWC/HWIO and its value."""
    from adjoint_jax.bench import EvalCount
    from adjoint_jax.bench._count import counting_model

    params = (0.3 * jax.random.normal(getkey(), (4, 2, 3, 3)), 0.3 * jax.random.normal(getkey(), (2, 4, 3, 3)))
    x_T = jax.random.normal(getkey(), (2, 2, 5, 5))
    ts = jnp.linspace(1.0, 1e-3, 5)

    def loss(model, params):
        x0 = aj.sample(model, params, x_T, jnp.asarray(0.1), schedule=aj.VPLinear(), ts=ts,
                       sampler=aj.DPMSolver2(), adjoint=aj.DTO())
        return jnp.sum(jnp.sin(x0))

    count = EvalCount()
    with convs_fix(True):
        counted = jax.grad(lambda p: loss(counting_model(ConvEps(), count), p))
        specs = conv_specs(jax.make_jaxpr(counted)(params).jaxpr)
        got = jax.jit(counted)(params)
    assert specs and all(s == CANONICAL[4] for s in specs)
    with convs_fix(False):
        ref = jax.grad(lambda p: loss(ConvEps(), p))(params)
    assert tree_allclose(got, ref, rtol=1e-11, atol=1e-13)
    assert count.forward == 4 and count.vjp == 4  # one evaluation per step
