"""The model zoo: the shipped digits ε-network (Equinox) and classifier (Flax), and
Flax models as `model`/`params` of `aj.sample`."""

import hashlib
import importlib.resources
import json
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
    # Concrete labels closed over inside jit: checked, not staged.
    labels = jnp.arange(4)
    np.testing.assert_array_equal(jax.jit(lambda: digits.cond(labels))(),
                                  digits.cond(labels))
    bad = labels + 7
    with pytest.raises(ValueError, match="labels in"):
        jax.jit(lambda: digits.cond(bad))()


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


def test_missing_flax_message(monkeypatch, tmp_path):
    # Checked on every call, before the cache.
    monkeypatch.setitem(sys.modules, "flax", None)
    with pytest.raises(ImportError, match=r"`pip install flax`"):
        aj.zoo.digits()
    with pytest.raises(ImportError, match=r"`pip install flax`"):
        aj.zoo.digits(path=tmp_path)


# ---- zoo files: checksums, `path`, error messages ----------------------------------
ZOO_FILES = ("digits.json", "digits_eps.eqx", "digits_classifier.msgpack")
WEIGHT_FILES = ZOO_FILES[1:]


def _shipped(name):
    return importlib.resources.files("adjoint_jax.zoo").joinpath(name)


@pytest.fixture
def zoo_copy(tmp_path):
    """A copy of the shipped zoo files, as `train_digits.py --out DIR` lays them out."""
    for name in ZOO_FILES:
        (tmp_path / name).write_bytes(_shipped(name).read_bytes())
    return tmp_path.resolve()


def _edit_info(directory, edit):
    file = directory / "digits.json"
    info = json.loads(file.read_text())
    edit(info)
    file.write_text(json.dumps(info, indent=2))


def _same_arrays(a, b):
    la, lb = jtu.tree_leaves(a), jtu.tree_leaves(b)
    return (
        jtu.tree_structure(a) == jtu.tree_structure(b)
        and len(la) == len(lb)
        and all(
            x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
            for x, y in zip(la, lb)
        )
    )


def _same_models(d1, d2):
    return (
        _same_arrays(d1.params, d2.params)
        and _same_arrays(d1.cond_table, d2.cond_table)
        and _same_arrays(d1.classifier_params, d2.classifier_params)
        and d1.info == d2.info
    )


def test_shipped_checksums():
    """The shipped `digits.json` records the size and SHA-256 of both weights files."""
    files = json.loads(_shipped("digits.json").read_text())["files"]
    assert set(files) == set(WEIGHT_FILES)
    for name in WEIGHT_FILES:
        data = _shipped(name).read_bytes()
        assert files[name] == {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
    from adjoint_jax.zoo._zoo import file_record

    assert file_record(str(_shipped(WEIGHT_FILES[0]))) == files[WEIGHT_FILES[0]]


def test_load_from_path(digits, zoo_copy):
    d = aj.zoo.digits(path=zoo_copy)
    assert d is not digits
    assert _same_models(d, digits)
    # Cached per resolved directory.
    assert aj.zoo.digits(str(zoo_copy)) is d
    assert aj.zoo.digits(zoo_copy / "." / ".." / zoo_copy.name) is d
    assert aj.zoo.digits() is digits
    shipped_dir = importlib.resources.files("adjoint_jax.zoo")
    assert aj.zoo.digits(path=shipped_dir) is digits
    for leaf in jtu.tree_leaves(d.params):
        assert leaf.dtype == jnp.float32
    x = jnp.zeros((2, 8, 8), jnp.float32)
    t = jnp.asarray(0.5, jnp.float32)
    np.testing.assert_array_equal(
        d.model(d.params, x, t, d.cond(jnp.array([1, 2]))),
        digits.model(digits.params, x, t, digits.cond(jnp.array([1, 2]))),
    )


@pytest.mark.parametrize("name", WEIGHT_FILES)
def test_bit_flip_fails_checksum(zoo_copy, name):
    file = zoo_copy / name
    data = bytearray(file.read_bytes())
    expected = hashlib.sha256(data).hexdigest()
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="Checksum mismatch") as e:
        aj.zoo.digits(path=zoo_copy)
    msg = str(e.value)
    assert str(file) in msg
    assert expected in msg and hashlib.sha256(data).hexdigest() in msg
    assert "corrupted or truncated" in msg
    assert f"train_digits.py --out {zoo_copy}" in msg


@pytest.mark.parametrize("name", WEIGHT_FILES)
def test_truncated_file(zoo_copy, name):
    file = zoo_copy / name
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated") as e:
        aj.zoo.digits(path=zoo_copy)
    assert str(file) in str(e.value)
    assert f"{len(data)} bytes" in str(e.value)
    assert f"{len(data) // 3} bytes" in str(e.value)


@pytest.mark.parametrize("name", ZOO_FILES)
def test_missing_file(zoo_copy, name):
    (zoo_copy / name).unlink()
    with pytest.raises(FileNotFoundError, match="Missing file") as e:
        aj.zoo.digits(path=zoo_copy)
    assert str(zoo_copy / name) in str(e.value)


def test_bad_directory(zoo_copy):
    with pytest.raises(FileNotFoundError, match="No such directory") as e:
        aj.zoo.digits(path=zoo_copy / "nowhere")
    assert str(zoo_copy / "nowhere") in str(e.value)
    with pytest.raises(NotADirectoryError, match="Not a directory") as e:
        aj.zoo.digits(path=zoo_copy / "digits.json")
    assert str(zoo_copy / "digits.json") in str(e.value)


def test_no_checksums_warns(digits, zoo_copy):
    """A `digits.json` from before the checksums loads, with a warning."""
    _edit_info(zoo_copy, lambda info: info.pop("files"))
    with pytest.warns(UserWarning, match="cannot be verified") as w:
        d = aj.zoo.digits(path=zoo_copy)
    [warning] = [x for x in w if "cannot be verified" in str(x.message)]
    assert str(zoo_copy / "digits.json") in str(warning.message)
    assert warning.filename == __file__  # points at the caller
    assert _same_arrays(d.params, digits.params)
    assert _same_arrays(d.classifier_params, digits.classifier_params)


@pytest.mark.parametrize("name", WEIGHT_FILES)
def test_garbage_with_matching_checksum(zoo_copy, name):
    """A corrupted file whose checksum was recorded anyway: a ValueError naming the
    file (Equinox's TreePathError and msgpack's errors are chained, not raised)."""
    file = zoo_copy / name
    garbage = b"definitely not a weights file " * 100
    file.write_bytes(garbage)
    record = {"sha256": hashlib.sha256(garbage).hexdigest(), "bytes": len(garbage)}
    _edit_info(zoo_copy, lambda info: info["files"].update({name: record}))
    with pytest.raises(ValueError, match="could not be deserialised") as e:
        aj.zoo.digits(path=zoo_copy)
    assert type(e.value) is ValueError
    assert str(file) in str(e.value)
    assert e.value.__cause__ is not None


def _record_file(directory, name, data):
    (directory / name).write_bytes(data)
    record = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _edit_info(directory, lambda info: info["files"].update({name: record}))


def test_wrong_contents_with_matching_checksum(zoo_copy):
    import flax.serialization

    # Valid msgpack, but not the classifier's variables.
    data = flax.serialization.msgpack_serialize(
        {"params": {"head": {"bias": np.zeros(3, np.float32)}}}
    )
    _record_file(zoo_copy, "digits_classifier.msgpack", data)
    with pytest.raises(ValueError, match="does not hold") as e:
        aj.zoo.digits(path=zoo_copy)
    assert str(zoo_copy / "digits_classifier.msgpack") in str(e.value)
    assert "11 missing arrays: ['params']['conv1a']" in str(e.value)
    assert "expected shape (10,)" in str(e.value)


def test_trailing_bytes_with_matching_checksum(zoo_copy):
    file = zoo_copy / "digits_eps.eqx"
    _record_file(zoo_copy, "digits_eps.eqx", file.read_bytes() + b"\0" * 7)
    with pytest.raises(ValueError, match="7 bytes beyond") as e:
        aj.zoo.digits(path=zoo_copy)
    assert str(file) in str(e.value)


def test_hyperparameters_do_not_match_weights(zoo_copy):
    _edit_info(zoo_copy, lambda info: info["eps_net"].update(channels=32))
    with pytest.raises(ValueError, match="could not be deserialised") as e:
        aj.zoo.digits(path=zoo_copy)
    assert str(zoo_copy / "digits_eps.eqx") in str(e.value)
    assert str(zoo_copy / "digits.json") in str(e.value)


def test_bad_json(zoo_copy):
    info_file = zoo_copy / "digits.json"
    info_file.write_text('{"schedule": ')
    with pytest.raises(ValueError, match="not valid JSON") as e:
        aj.zoo.digits(path=zoo_copy)
    assert str(info_file) in str(e.value)
    assert isinstance(e.value.__cause__, json.JSONDecodeError)
    info_file.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected an object") as e:
        aj.zoo.digits(path=zoo_copy)
    assert str(info_file) in str(e.value)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda info: info.pop("eps_net"), "required key 'eps_net'"),
        (lambda info: info.pop("num_classes"), "required key 'num_classes'"),
        (lambda info: info["schedule"].pop("beta_max"), "'schedule.beta_max'"),
        (lambda info: info["schedule"].update(name="Cosine"), "unknown schedule"),
        (lambda info: info.update(num_classes="10"), "must be of type int"),
        (lambda info: info["eps_net"].pop("cond_dim"), "'eps_net' hyperparameters"),
        (
            lambda info: info["files"].pop("digits_eps.eqx"),
            "'files' must map 'digits_eps.eqx'",
        ),
        (
            lambda info: info["files"]["digits_classifier.msgpack"].update(sha256="0"),
            "64 hex digits",
        ),
    ],
)
def test_json_lacks_keys(zoo_copy, edit, match):
    _edit_info(zoo_copy, edit)
    with pytest.raises(ValueError, match=match) as e:
        aj.zoo.digits(path=zoo_copy)
    assert str(zoo_copy / "digits.json") in str(e.value)
