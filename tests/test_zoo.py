"""The model zoo: the shipped digits ε-network (Equinox) and classifier (Flax), and
Flax models as `model`/`params` of `aj.sample`."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import adjoint_jax as aj


flax = pytest.importorskip("flax")
import flax.linen as nn  # noqa: E402


# The test's sample accuracy may fall this far below the figure measured by
# `examples/train_digits.py` (500 samples, 25 steps): 64 samples at 20 steps have a
# binomial standard deviation of about 0.03 at the reported accuracy.
ACCURACY_MARGIN = 0.12


@pytest.fixture(scope="module")
def digits():
    return aj.zoo.digits()


def _finite_nonzero(tree):
    leaves = jtu.tree_leaves(tree)
    assert leaves
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves)
    assert sum(float(jnp.sum(jnp.abs(leaf))) for leaf in leaves) > 0


def test_import_does_not_import_flax():
    code = "import sys, adjoint_jax; assert 'flax' not in sys.modules, 'flax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_digits_object(digits):
    assert aj.zoo.digits() is digits  # cached
    assert digits.shape == (8, 8) and digits.num_classes == 10
    assert isinstance(digits.schedule, aj.VPLinear)
    z = digits.cond(jnp.array([[0, 1, 2], [3, 4, 5]]))
    assert z.shape == (2, 3, digits.cond_dim) and z.dtype == jnp.float32
    assert digits.cond_null((4,)).shape == (4, digits.cond_dim)
    images = jnp.zeros((2, 3, 8, 8), jnp.float32)
    assert digits.classify(images).shape == (2, 3, 10)
    assert digits.embed(images).shape[:2] == (2, 3)
    assert digits.classify(images[0, 0]).shape == (10,)
    for leaf in jtu.tree_leaves(digits.params):
        assert leaf.dtype == jnp.float32
    # Batch-aware model: leading dimensions of x and cond broadcast; None is
    # unconditional.
    x = jnp.zeros((5, 8, 8), jnp.float32)
    t = jnp.asarray(0.5, jnp.float32)
    assert digits.model(digits.params, x, t, digits.cond(jnp.int32(3))).shape == x.shape
    assert digits.model(digits.params, x[0], t, None).shape == (8, 8)
    eps64 = digits.model(
        digits.params, x.astype(jnp.float64), t, digits.cond_null((5,))
    )
    assert eps64.dtype == jnp.float64
    info = digits.info
    assert info["classifier_heldout_accuracy"] >= 0.95
    assert info["sample_accuracy"]["value"] >= 0.8
    with pytest.raises(ValueError, match="labels in"):
        digits.cond(jnp.array([10]))
    with pytest.raises(TypeError, match="integer"):
        digits.cond(jnp.array([1.0]))


def test_classifier_on_real_digits(digits):
    from sklearn.datasets import load_digits

    from adjoint_jax.zoo._digits import to_model_space

    data = load_digits()
    x = to_model_space(data.images[::9])
    pred = jnp.argmax(digits.classify(x), -1)
    assert float(jnp.mean(pred == data.target[::9])) >= 0.95


def test_class_conditional_samples(digits):
    """Sampling a batch with the shipped model: the classifier recognises the
    class-conditional samples about as often as `examples/train_digits.py` measured."""
    labels = jnp.arange(64) % 10
    x_T = jax.random.normal(jax.random.key(0), (64, 8, 8), jnp.float32)
    ts = aj.time_grid(digits.schedule, 20, t_end=1e-3)
    x0 = aj.sample(
        digits.model,
        digits.params,
        x_T,
        digits.cond(labels),
        schedule=digits.schedule,
        ts=ts,
        sampler=aj.DPMSolver2(),
        adjoint=aj.DTO(),
    )
    assert x0.shape == x_T.shape and x0.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(x0)))
    # Samples look like data: background near −1, ink near +1, inside the range.
    assert float(jnp.mean(jnp.abs(x0) <= 1.1)) > 0.95
    acc = float(jnp.mean(jnp.argmax(digits.classify(x0), -1) == labels))
    reported = digits.info["sample_accuracy"]["value"]
    assert acc >= reported - ACCURACY_MARGIN, (acc, reported)


def test_gradients_through_sample(digits):
    """∂L/∂(θ, x_T, z) of a classifier loss on the samples (Equinox ε-network,
    Flax classifier inside the loss), finite and nonzero; checked against a finite
    difference along a random direction in x_T."""
    labels = jnp.array([1, 7, 3, 8])
    ts = aj.time_grid(digits.schedule, 8, t_end=1e-3)
    x_T = jax.random.normal(jax.random.key(1), (4, 8, 8), jnp.float32)

    def loss(params, x_T, cond):
        x0 = aj.sample(
            digits.model,
            params,
            x_T,
            cond,
            schedule=digits.schedule,
            ts=ts,
            sampler=aj.DPMSolver2(),
            adjoint=aj.DTO(),
        )
        logits = digits.classify(x0)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    z = digits.cond(labels)
    value, grads = value_and_grad(digits.params, x_T, z)
    assert jnp.isfinite(value)
    for g in grads:
        _finite_nonzero(g)
    v = jax.random.normal(jax.random.key(2), x_T.shape, jnp.float32)
    v = v / jnp.linalg.norm(v)
    h = 1e-2
    fd = (
        value_and_grad(digits.params, x_T + h * v, z)[0]
        - value_and_grad(digits.params, x_T - h * v, z)[0]
    ) / (2 * h)
    ad = jnp.sum(grads[1] * v)
    assert abs(float(fd - ad)) <= 0.05 * abs(float(ad)) + 1e-3, (fd, ad)


def test_classifier_gradients(digits):
    """The Flax classifier and embedding are jit-able and differentiable with respect
    to the images and its own variables."""
    x = jax.random.uniform(jax.random.key(3), (3, 8, 8), jnp.float32, -1.0, 1.0)
    g_x = jax.jit(jax.grad(lambda x: jnp.sum(digits.embed(x) ** 2)))(x)
    _finite_nonzero(g_x)

    def loss(variables):
        logits, _ = digits.classifier_module.apply(variables, x)
        return jnp.sum(jax.nn.log_softmax(logits)[:, 2])

    _finite_nonzero(jax.jit(jax.grad(loss))(digits.classifier_params))


class _FlaxEps(nn.Module):
    """A tiny Flax ε-network on vectors, float64 under x64."""

    @nn.compact
    def __call__(self, x, t, cond):
        h = jnp.concatenate(
            [
                x,
                jnp.broadcast_to(cond, x.shape[:-1] + cond.shape[-1:]),
                jnp.broadcast_to(t, x.shape[:-1] + (1,)),
            ],
            axis=-1,
        )
        kw = dict(dtype=jnp.float64, param_dtype=jnp.float64)
        h = jnp.tanh(nn.Dense(16, **kw)(h))
        return nn.Dense(x.shape[-1], **kw)(h)


def test_flax_model_through_sample():
    """A Flax model works as `model`/`params`: `params` is its variables and `model`
    calls `apply`; gradients with respect to the variables, x_T and cond match
    finite differences."""
    net = _FlaxEps()
    x_T = jax.random.normal(jax.random.key(4), (5, 3), jnp.float64)
    cond = jnp.array([0.3, -0.2], jnp.float64)
    variables = net.init(jax.random.key(5), x_T, jnp.float64(0.5), cond)
    schedule = aj.VPLinear()
    ts = aj.time_grid(schedule, 10, t_end=1e-3)

    def model(p, x, t, c):
        return net.apply(p, x, t, c)

    def loss(p, x, c):
        x0 = aj.sample(
            model,
            p,
            x,
            c,
            schedule=schedule,
            ts=ts,
            sampler=aj.DPMSolver2(),
            adjoint=aj.DTO(),
        )
        return jnp.sum(jnp.sin(x0))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(variables, x_T, cond)
    for g in grads:
        _finite_nonzero(g)
    # Directional finite differences in every argument at once.
    key = jax.random.key(6)
    args = (variables, x_T, cond)
    dirs = jtu.tree_map(lambda a: jax.random.normal(key, a.shape, a.dtype), args)
    h = 1e-6
    plus = jtu.tree_map(lambda a, d: a + h * d, args, dirs)
    minus = jtu.tree_map(lambda a, d: a - h * d, args, dirs)
    loss_jit = jax.jit(loss)
    fd = (loss_jit(*plus) - loss_jit(*minus)) / (2 * h)
    ad = sum(
        jnp.sum(g * d) for g, d in zip(jtu.tree_leaves(grads), jtu.tree_leaves(dirs))
    )
    np.testing.assert_allclose(float(ad), float(fd), rtol=1e-6)


def test_missing_flax_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "flax", None)
    with pytest.raises(ImportError, match=r"adjoint_jax\[examples\]"):
        aj.zoo.digits.__wrapped__()
