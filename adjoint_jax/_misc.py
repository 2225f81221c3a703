"""Small internal helpers: pytree arithmetic, dtype handling, value checks."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree


def is_concrete(x) -> bool:
    """True if `x` holds a value now (not a tracer inside jit/grad/vmap)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jtu.tree_leaves(x))


def check_value(pred: Array, msg: str, carrier):
    """Raises `ValueError(msg)` now if `pred` is concretely true; otherwise attaches a
    runtime check to `carrier` (see `eqx.error_if`) and returns it."""
    if is_concrete(pred):
        if bool(pred):
            raise ValueError(msg)
        return carrier
    return eqx.error_if(carrier, pred, msg)


def lincomb(*pairs) -> PyTree:
    """Σ c_k x_k over pytrees: `lincomb((c1, x1), (c2, x2), ...)`.

    Each coefficient is a scalar array (any float dtype) that is cast to the dtype of
    every leaf it multiplies, so float32 states stay float32 whatever the dtype of
    the time grid. `x_k = None` terms are skipped.
    """
    pairs = [(c, x) for c, x in pairs if x is not None]
    if not pairs:
        return None

    def _leaf(*leaves):
        out = None
        for (c, _), leaf in zip(pairs, leaves):
            term = jnp.asarray(c).astype(leaf.dtype) * leaf
            out = term if out is None else out + term
        return out

    return jtu.tree_map(_leaf, *[x for _, x in pairs])


def tree_add(x: PyTree, y: PyTree) -> PyTree:
    return jtu.tree_map(lambda a, b: a + b, x, y)


def tree_zeros_like(x: PyTree) -> PyTree:
    return jtu.tree_map(jnp.zeros_like, x)


def first_dtype(x: PyTree):
    leaves = jtu.tree_leaves(x)
    return leaves[0].dtype


def tree_normal(key: Array, like: PyTree, dtype=None) -> PyTree:
    """Standard normal noise with the structure and shapes of `like`, drawn in `dtype`
    (default: each leaf's) and cast to each leaf's dtype."""
    leaves, treedef = jtu.tree_flatten(like)
    keys = jax.random.split(key, len(leaves))
    return jtu.tree_unflatten(
        treedef,
        [
            jax.random.normal(k, leaf.shape, dtype or leaf.dtype).astype(leaf.dtype)
            for k, leaf in zip(keys, leaves)
        ],
    )


def step_noise(key: Array, i: Array, like: PyTree, dtype=None) -> PyTree:
    """The noise of sampler step `i`: drawn from `jax.random.fold_in(key, i)` so any
    pass (forward, recomputation, backward reconstruction) can replay it. Drawing it
    in the time grid's dtype (`dtype`) makes float32 and float64 solves see the same
    noise up to rounding."""
    return tree_normal(jax.random.fold_in(key, i), like, dtype)


def index_tree(tree: PyTree, i) -> PyTree:
    return jtu.tree_map(lambda v: v[i], tree)


def fn_name(fn: Callable) -> str:
    return getattr(fn, "__name__", type(fn).__name__)
