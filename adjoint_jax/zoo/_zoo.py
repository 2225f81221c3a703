"""Loading the shipped digits models (`aj.zoo.digits()`)."""

import functools
import hashlib
import importlib.resources
import io
import json
import os
import pathlib
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree

from .._misc import is_concrete
from .._schedule import AbstractSchedule, VPLinear
from ._digits import IMAGE_SHAPE, DigitsEpsNet


_EPS_FILE = "digits_eps.eqx"
_CLASSIFIER_FILE = "digits_classifier.msgpack"
_INFO_FILE = "digits.json"
_WEIGHT_FILES = (_EPS_FILE, _CLASSIFIER_FILE)
_ALL_FILES = f"{_INFO_FILE}, {_EPS_FILE} and {_CLASSIFIER_FILE}"


class DigitsModel(eqx.Module):
    """`model(params, x, t, cond) -> ε` for `aj.sample`: rebuilds the Equinox network
    from its arrays `params` and calls it. `cond=None` means the null (unconditional)
    embedding."""

    static: Any
    null_cond: Array

    def __call__(self, params, x, t, cond):
        net = eqx.combine(params, self.static)
        return net(x, t, self.null_cond if cond is None else cond)


class Digits(eqx.Module):
    """The trained digits models: a class-conditional ε-network (Equinox) and a digit
    classifier (Flax linen), returned by `aj.zoo.digits()`.

    **Fields:**

    - `model`, `params`: the ε-network, ready for `aj.sample(model, params, x_T, cond,
        schedule=..., ...)`. `params` is the network's arrays (float32); `model` is
        batch-aware: x of shape `(..., 8, 8)` and cond of shape `(..., cond_dim)`
        broadcast over their leading dimensions (`cond=None`: unconditional).
    - `schedule`: the noise schedule it was trained with (`aj.VPLinear()`).
    - `shape`: one image's shape, `(8, 8)`: one grey channel, values in [-1, 1]
        (background −1, ink +1).
    - `num_classes`: 10.
    - `cond_table`: the learned class embeddings, shape `(num_classes + 1,
        cond_dim)`; row `num_classes` is the null embedding.
    - `classifier_params`, `classifier_module`: the Flax classifier's variables and
        its `flax.linen.Module`, for differentiating with respect to its weights:
        `classifier_module.apply(classifier_params, images)` returns
        `(logits, embedding)`.

    **Methods:** `cond(labels)`, `cond_null(shape)`, `classify(images)`,
    `embed(images)`; the property `info` holds the training record (hyperparameters,
    the classifier's held-out accuracy and the measured accuracy on class-conditional
    samples).

    All methods are jit-able and differentiable with respect to their array inputs.

    !!! Example

        ```python
        d = aj.zoo.digits()
        labels = jnp.arange(10)
        x_T = jax.random.normal(jax.random.key(0), (10, *d.shape), jnp.float32)
        ts = aj.time_grid(d.schedule, 25, t_end=1e-3)
        x0 = aj.sample(d.model, d.params, x_T, d.cond(labels), schedule=d.schedule,
                       ts=ts, sampler=aj.DPMSolver2())
        acc = jnp.mean(jnp.argmax(d.classify(x0), -1) == labels)
        ```
    """

    model: DigitsModel
    params: PyTree
    schedule: AbstractSchedule
    cond_table: Array
    classifier_params: PyTree
    classifier_module: Any = eqx.field(static=True)
    shape: tuple[int, ...] = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)
    # The training record (`digits.json`) as JSON text: static and hashable.
    _info_json: str = eqx.field(static=True, default="{}", repr=False)

    @property
    def cond_dim(self) -> int:
        return self.cond_table.shape[-1]

    @property
    def info(self) -> dict:
        """The training record written by `examples/train_digits.py` (the loaded
        `digits.json`, a fresh copy)."""
        return json.loads(self._info_json)

    def cond(self, labels: ArrayLike) -> Array:
        """The conditioning for integer class labels: `cond_table[labels]`, shape
        `labels.shape + (cond_dim,)`, float32. A continuous vector (optimise it, or
        blend two classes' vectors)."""
        labels = jnp.asarray(labels)
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise TypeError(
                f"`cond(labels)` needs integer class labels; got dtype {labels.dtype}."
            )
        if is_concrete(labels) and labels.size:
            # (In NumPy: a concrete array closed over inside `jit` stages jnp ops.)
            lo, hi = int(np.min(np.asarray(labels))), int(np.max(np.asarray(labels)))
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(
                    f"`cond(labels)` needs labels in [0, {self.num_classes}); got "
                    f"{lo}..{hi}."
                )
        return self.cond_table[labels]

    def cond_null(self, shape: tuple[int, ...] = ()) -> Array:
        """The null (unconditional) conditioning, broadcast to `shape + (cond_dim,)`.

        `model(params, x, t, None)` uses it too. For classifier-free guidance use the
        model ε = ε(z_null) + w (ε(z) − ε(z_null)): at w = 1.5 the classifier
        recognises about 99% of class-conditional samples (90–94% at w = 1)."""
        return jnp.broadcast_to(
            self.cond_table[self.num_classes], tuple(shape) + (self.cond_dim,)
        )

    def classify(self, images: ArrayLike) -> Array:
        """The classifier's logits, shape `(..., num_classes)`, for images of shape
        `(..., 8, 8)` in [-1, 1] (float32)."""
        return self._apply(images)[0]

    def embed(self, images: ArrayLike) -> Array:
        """The classifier's penultimate-layer features, shape `(..., 64)`, for images
        of shape `(..., 8, 8)` in [-1, 1] (float32)."""
        return self._apply(images)[1]

    def _apply(self, images):
        images = jnp.asarray(images)
        if images.shape[-2:] != self.shape:
            raise ValueError(
                f"Digit images must have shape (..., 8, 8); got {images.shape}."
            )
        return self.classifier_module.apply(
            self.classifier_params, images.astype(jnp.float32)
        )


def eps_net_spec(net: DigitsEpsNet, spec: Any, schedule_spec: Any) -> PyTree:
    """A filter specification for a `DigitsEpsNet`: `spec` for every leaf but those
    of `net.schedule`, which get `schedule_spec`.

    `digits_eps.eqx` holds the network's arrays without its schedule (`digits.json`
    describes the schedule), so `examples/train_digits.py` writes it with
    `eps_net_spec(net, eqx.default_serialise_filter_spec, lambda f, x: None)` and
    the file's contents do not depend on whether the schedule has array leaves."""
    return eqx.tree_at(
        lambda n: n.schedule, jax.tree.map(lambda _: spec, net), schedule_spec
    )


def _keep(f, x):
    return x


def file_record(path: str | os.PathLike[str]) -> dict:
    """`{"sha256": ..., "bytes": ...}` of a file: the entry that `digits.json` keeps
    under `"files"` for each weights file (`examples/train_digits.py` writes them)."""
    return _record(pathlib.Path(path).read_bytes())


def _record(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def digits(path: str | os.PathLike[str] | None = None) -> Digits:
    """Loads the digits models: the shipped ones, or those in the directory `path`.

    A class-conditional ε-prediction network (Equinox ResNet, 8×8 images, trained on
    `sklearn.datasets.load_digits` under `aj.VPLinear()`) and a Flax digit classifier;
    see `Digits` for what the returned object holds, and `examples/train_digits.py`
    for how they were trained. Needs Flax (`pip install flax`).

    Cached per resolved directory: later calls for the same directory return the
    same object without reading the files again (`aj.zoo.digits() is
    aj.zoo.digits()`).

    **Arguments:**

    - `path`: a directory holding `digits.json`, `digits_eps.eqx` and
        `digits_classifier.msgpack`, as `python examples/train_digits.py --out DIR`
        writes them. `None` (default): the files shipped with `adjoint_jax`.

    **Verified at load:** `digits.json` is valid JSON with the keys the loader needs
    (`schedule`, `eps_net`, `num_classes`); each weights file's size and SHA-256
    match the `"files"` entries of `digits.json`, checked before it is deserialised;
    the weights then deserialise into the shapes and dtypes that `digits.json`
    describes. A `digits.json` without `"files"` (written by an older
    `train_digits.py`) loads with a `UserWarning` that the weights cannot be
    verified.

    **Returns:** a `Digits`.

    **Raises:** every message names the offending file by its full path.

    - `ImportError`: Flax is not installed.
    - `FileNotFoundError`: `path` or one of the three files does not exist
        (`NotADirectoryError` if `path` is a file).
    - `ValueError`: `digits.json` is not valid JSON or lacks a required key; a
        weights file's SHA-256 or size differs from `digits.json` (corrupted or
        truncated: re-install `adjoint_jax`, or re-run `train_digits.py --out DIR`);
        a weights file fails to deserialise (the exception from Equinox or Flax is
        chained).
    """
    try:
        import flax.serialization  # noqa: F401

        from ._classifier import DigitsClassifier  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "`aj.zoo.digits()` needs Flax for its classifier: `pip install flax` "
            "(from a checkout of adjoint_jax, `pip install -e \".[examples]\"` "
            "installs it with the examples' other dependencies)."
        ) from e
    if path is None:
        shipped = importlib.resources.files(__package__)
        # Shipped files are a plain directory in any ordinary install: share the
        # cache entry with `digits(path=<that directory>)`.
        key = shipped.resolve() if isinstance(shipped, pathlib.Path) else None
    else:
        key = pathlib.Path(path).expanduser().resolve()
        if not key.exists():
            raise FileNotFoundError(
                f"No such directory: {key}. `aj.zoo.digits(path=...)` expects a "
                f"directory holding {_ALL_FILES}, as `python "
                "examples/train_digits.py --out DIR` writes them."
            )
        if not key.is_dir():
            raise NotADirectoryError(
                f"Not a directory: {key}. `aj.zoo.digits(path=...)` expects a "
                f"directory holding {_ALL_FILES}, not a file."
            )
    return _load(key)


@functools.cache
def _load(directory: pathlib.Path | None) -> Digits:
    import flax.serialization

    from ._classifier import DigitsClassifier

    shipped = importlib.resources.files(__package__)
    is_shipped = directory is None or (
        isinstance(shipped, pathlib.Path) and directory == shipped.resolve()
    )
    root = shipped if directory is None else directory
    if is_shipped:
        remedy = (
            "These are the files shipped with adjoint_jax: re-install the package "
            "(in a source checkout, restore them with git or re-run `python "
            "examples/train_digits.py --out adjoint_jax/zoo`)."
        )
    else:
        remedy = (
            f"Re-run `python examples/train_digits.py --out {root}` to rewrite "
            "the three files, or copy them again from an intact source."
        )

    # ---- digits.json -----------------------------------------------------------
    info_file = root.joinpath(_INFO_FILE)
    raw = _read(info_file, remedy)
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{info_file} is not valid JSON ({e}); expected the training record "
            f"written by `examples/train_digits.py`. {remedy}"
        ) from e
    if not isinstance(info, dict):
        raise ValueError(
            f"{info_file} holds a JSON {type(info).__name__}; expected an object "
            f"(the training record written by `examples/train_digits.py`). {remedy}"
        )
    sch = _require(info, info_file, "schedule", dict)
    name = _require(sch, info_file, "schedule.name", str)
    if name != "VPLinear":
        raise ValueError(
            f"{info_file}: unknown schedule {name!r}; expected 'VPLinear'."
        )
    number = (int, float)
    beta_min = _require(sch, info_file, "schedule.beta_min", number)
    beta_max = _require(sch, info_file, "schedule.beta_max", number)
    try:
        schedule = VPLinear(beta_min=beta_min, beta_max=beta_max)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{info_file}: invalid 'schedule' ({_describe(e)}).") from e
    hp = _require(info, info_file, "eps_net", dict)
    num_classes = _require(info, info_file, "num_classes", int)
    records = _file_records(info, info_file, remedy)
    if records is None:
        warnings.warn(
            f"{info_file} has no 'files' checksums (written by an older "
            "`examples/train_digits.py`), so the weights in "
            f"{root} cannot be verified. Re-run `python examples/train_digits.py "
            f"--out {root}` to write them with checksums.",
            UserWarning,
            stacklevel=3,
        )

    def weights(name):
        file = root.joinpath(name)
        data = _read(file, remedy)
        if records is not None:
            expected = records[name]
            actual = _record(data)
            if actual != expected:
                raise ValueError(
                    f"Checksum mismatch for {file}: expected sha256 "
                    f"{expected['sha256']} ({expected['bytes']} bytes, recorded in "
                    f"{info_file}), got sha256 {actual['sha256']} "
                    f"({actual['bytes']} bytes). The file is corrupted or "
                    f"truncated. {remedy}"
                )
        return file, data

    # ---- ε-network (Equinox) ---------------------------------------------------
    def skeleton():
        net = DigitsEpsNet(schedule, **hp, key=jax.random.key(0))
        return net, jnp.zeros((num_classes + 1, hp["cond_dim"]), jnp.float32)

    try:
        like = eqx.filter_eval_shape(skeleton)
    except Exception as e:
        raise ValueError(
            f"{info_file}: its 'eps_net' hyperparameters {hp} do not build the "
            f"ε-network ({_describe(e)}). {remedy}"
        ) from e
    file, data = weights(_EPS_FILE)
    what = (
        f"the ε-network's weights (a DigitsEpsNet with {hp} and a "
        f"({num_classes + 1}, {hp['cond_dim']}) class table, as {info_file} "
        "describes)"
    )
    buffer = io.BytesIO(data)
    spec = eqx.default_deserialise_filter_spec
    try:
        net, table = eqx.tree_deserialise_leaves(
            buffer, like, filter_spec=(eps_net_spec(like[0], spec, _keep), spec)
        )
    except Exception as e:
        raise ValueError(
            f"{file} could not be deserialised as {what}: {_describe(e)}. {remedy}"
        ) from e
    if buffer.tell() != len(data):
        raise ValueError(
            f"{file} has {len(data) - buffer.tell()} bytes beyond {what}; the "
            f"file does not match {info_file}. {remedy}"
        )
    net = eqx.tree_at(lambda n: n.schedule, net, schedule)
    # The schedule stays out of `params`: they are the network's trained arrays.
    params, static = eqx.partition(net, eps_net_spec(net, eqx.is_inexact_array, False))

    # ---- classifier (Flax) -----------------------------------------------------
    clf = DigitsClassifier(num_classes=num_classes)
    file, data = weights(_CLASSIFIER_FILE)
    what = f"the classifier's variables (DigitsClassifier(num_classes={num_classes}))"
    try:
        restored = flax.serialization.msgpack_restore(data)
    except Exception as e:
        raise ValueError(
            f"{file} could not be deserialised as {what}: {_describe(e)}. {remedy}"
        ) from e
    expected = jax.eval_shape(
        clf.init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32),
    )
    problems = _compare_leaves(restored, expected)
    if problems:
        problems = "; ".join(problems)
        raise ValueError(f"{file} does not hold {what}: {problems}. {remedy}")
    clf_params = jax.tree.map(jnp.asarray, restored)

    return Digits(
        model=DigitsModel(static, table[num_classes]),
        params=params,
        schedule=schedule,
        cond_table=table,
        classifier_params=clf_params,
        classifier_module=clf,
        shape=IMAGE_SHAPE,
        num_classes=num_classes,
        _info_json=json.dumps(info),
    )


def _describe(e: BaseException) -> str:
    """`"Type: message"` of an exception, and of its root cause if it has one (e.g.
    the `EOFError` under Equinox's `TreePathError`)."""

    def one(x):
        return f"{type(x).__name__}: {str(x).strip().rstrip('.')}"

    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    return one(e) if root is e else f"{one(e)} ({one(root)})"


def _read(file, remedy: str) -> bytes:
    try:
        return file.read_bytes()
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"Missing file {file}: the digits models need {_ALL_FILES} in one "
            f"directory. {remedy}"
        ) from e
    except OSError as e:
        raise OSError(f"Cannot read {file}: {e}. {remedy}") from e


def _require(table: dict, info_file, key: str, types):
    """`table[last part of key]`, checked to be of `types`; a `ValueError` naming
    `info_file` and the dotted key otherwise."""
    value = table.get(key.rsplit(".", 1)[-1])
    wanted = types if isinstance(types, tuple) else (types,)
    if value is None:
        raise ValueError(
            f"{info_file} lacks the required key {key!r}; expected the training "
            "record written by `examples/train_digits.py`."
        )
    if isinstance(value, bool) or not isinstance(value, wanted):
        names = " or ".join(t.__name__ for t in wanted)
        raise ValueError(
            f"{info_file}: {key!r} must be of type {names}; got {value!r}."
        )
    return value


def _file_records(info: dict, info_file, remedy: str) -> dict | None:
    """The `"files"` entries of `digits.json` for the two weights files, or None
    if it has none; a `ValueError` naming `info_file` if they are malformed."""
    records = info.get("files")
    if records is None:
        return None
    out = {}
    for name in _WEIGHT_FILES:
        rec = records.get(name) if isinstance(records, dict) else None
        sha = rec.get("sha256") if isinstance(rec, dict) else None
        size = rec.get("bytes") if isinstance(rec, dict) else None
        if (
            not isinstance(sha, str)
            or len(sha) != 64
            or any(c not in "0123456789abcdefABCDEF" for c in sha)
            or isinstance(size, bool)
            or not isinstance(size, int)
        ):
            raise ValueError(
                f"{info_file}: 'files' must map {name!r} to "
                '{"sha256": <64 hex digits>, "bytes": <int>}; got '
                f"{rec!r}. {remedy}"
            )
        out[name] = {"sha256": sha.lower(), "bytes": size}
    return out


def _compare_leaves(restored, expected, limit: int = 3) -> list[str]:
    """Differences between the arrays of `restored` and the `ShapeDtypeStruct`s of
    `expected`, by path (at most `limit` of each kind)."""

    def describe(x):
        if isinstance(x, (np.ndarray, np.generic, jax.Array)):
            return tuple(x.shape), np.dtype(x.dtype)
        return None, type(x).__name__

    got = {
        jtu.keystr(p): describe(x) for p, x in jtu.tree_flatten_with_path(restored)[0]
    }
    want = {
        jtu.keystr(p): (tuple(x.shape), np.dtype(x.dtype))
        for p, x in jtu.tree_flatten_with_path(expected)[0]
    }

    def some(keys):
        more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    wrong = [
        f"{k} has shape {got[k][0]} and dtype {got[k][1]}, expected shape "
        f"{want[k][0]} and dtype {want[k][1]}"
        for k in want
        if k in got and got[k] != want[k]
    ]
    missing = [k for k in want if k not in got]
    unexpected = [k or "<root>" for k in got if k not in want]
    problems = wrong[:limit]
    if len(wrong) > limit:
        problems.append(f"... ({len(wrong) - limit} more arrays of the wrong shape)")
    if missing:
        problems.append(f"{len(missing)} missing arrays: {some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected entries: {some(unexpected)}")
    return problems
