"""Loading the shipped digits models (`aj.zoo.digits()`)."""

import functools
import importlib.resources
import json
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PyTree

from .._misc import is_concrete
from .._schedule import AbstractSchedule, VPLinear
from ._digits import IMAGE_SHAPE, DigitsEpsNet


_EPS_FILE = "digits_eps.eqx"
_CLASSIFIER_FILE = "digits_classifier.msgpack"
_INFO_FILE = "digits.json"


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

    @property
    def cond_dim(self) -> int:
        return self.cond_table.shape[-1]

    @property
    def info(self) -> dict:
        """The training record written by `examples/train_digits.py`."""
        return dict(_read_info())

    def cond(self, labels: ArrayLike) -> Array:
        """The conditioning for integer class labels: `cond_table[labels]`, shape
        `labels.shape + (cond_dim,)`, float32. A continuous vector (optimise it, or
        blend two classes' vectors)."""
        labels = jnp.asarray(labels)
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise TypeError(
                f"`cond(labels)` needs integer class labels; got dtype {labels.dtype}."
            )
        if (
            is_concrete(labels)
            and labels.size
            and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes)
        ):
            raise ValueError(
                f"`cond(labels)` needs labels in [0, {self.num_classes}); got "
                f"{int(labels.min())}..{int(labels.max())}."
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


@functools.cache
def _read_info() -> dict:
    text = importlib.resources.files(__package__).joinpath(_INFO_FILE).read_text()
    return json.loads(text)


@functools.cache
def digits() -> Digits:
    """Loads the shipped digits models (cached: later calls return the same object).

    A class-conditional ε-prediction network (Equinox ResNet, 8×8 images, trained on
    `sklearn.datasets.load_digits` under `aj.VPLinear()`) and a Flax digit classifier;
    see `Digits` for what the returned object holds, and `examples/train_digits.py`
    for how they were trained. Needs Flax (`pip install adjoint_jax[examples]`).

    **Returns:** a `Digits`.
    """
    try:
        import flax.serialization

        from ._classifier import DigitsClassifier
    except ImportError as e:
        raise ImportError(
            "`aj.zoo.digits()` needs Flax for its classifier: "
            "`pip install adjoint_jax[examples]`."
        ) from e
    info = _read_info()
    files = importlib.resources.files(__package__)
    sch = info["schedule"]
    if sch["name"] != "VPLinear":
        raise ValueError(f"Unknown schedule {sch['name']!r} in {_INFO_FILE}.")
    schedule = VPLinear(beta_min=sch["beta_min"], beta_max=sch["beta_max"])
    hp = info["eps_net"]
    num_classes = info["num_classes"]

    def skeleton():
        net = DigitsEpsNet(schedule, **hp, key=jax.random.key(0))
        return net, jnp.zeros((num_classes + 1, hp["cond_dim"]), jnp.float32)

    like = eqx.filter_eval_shape(skeleton)
    with files.joinpath(_EPS_FILE).open("rb") as f:
        net, table = eqx.tree_deserialise_leaves(f, like)
    params, static = eqx.partition(net, eqx.is_inexact_array)

    raw = files.joinpath(_CLASSIFIER_FILE).read_bytes()
    clf_params = jax.tree.map(jnp.asarray, flax.serialization.msgpack_restore(raw))
    clf = DigitsClassifier(num_classes=num_classes)

    return Digits(
        model=DigitsModel(static, table[num_classes]),
        params=params,
        schedule=schedule,
        cond_table=table,
        classifier_params=clf_params,
        classifier_module=clf,
        shape=IMAGE_SHAPE,
        num_classes=num_classes,
    )
