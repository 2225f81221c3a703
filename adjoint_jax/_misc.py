"""Small internal helpers: pytree arithmetic, dtype handling, value checks and the
inspection of JAX tracers."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
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


def concrete_float(value) -> float | None:
    """`float(value)` if `value` is concrete (not traced), else None."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return float(np.asarray(value))
    except TypeError:
        return None


def cast(value, dtype) -> Array:
    """`value` as an array of `dtype` (a hyperparameter stored in float64, used in
    the dtype of the computation)."""
    return jnp.asarray(value).astype(dtype)


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


def accumulator_dtype(dtype):
    """The dtype in which cotangents of an input of `dtype` are summed over steps:
    at least float32, so that bfloat16/float16 parameters do not lose the sum of N
    per-step contributions to their 8- or 11-bit mantissa."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else dtype


def acc_zeros(x: PyTree) -> PyTree:
    """Zeros shaped like `x` in the accumulation dtype (see `accumulator_dtype`)."""
    if x is None:
        return None
    return jtu.tree_map(lambda v: jnp.zeros(v.shape, accumulator_dtype(v.dtype)), x)


def tree_acc(acc: PyTree, term: PyTree) -> PyTree:
    """`acc + term` leaf by leaf, with `term` cast to the accumulator's dtype."""
    if acc is None:
        return None
    return jtu.tree_map(lambda a, t: a + t.astype(a.dtype), acc, term)


def cast_like(x: PyTree, like: PyTree) -> PyTree:
    """`x` with every leaf cast to the dtype of the matching leaf of `like`; `None`
    leaves of `x` stay `None`."""
    return jtu.tree_map(
        lambda u, v: None if u is None else u.astype(v.dtype),
        x,
        like,
        is_leaf=lambda u: u is None,
    )


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


def check_unit_interval(arg: str, value, note: str) -> None:
    """Raises a `ValueError` naming `arg` unless `value` is a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"`{arg}` must be a number in (0, 1] ({note}); got {value!r}.")


def describe_class_error(arg: str, value, example: str) -> str | None:
    """The message for a class passed where an instance is expected (`aj.DTO` for
    `aj.DTO()`), or None if `value` is not a class."""
    if isinstance(value, type):
        return (
            f"`{arg}` must be an instance such as `{example}`; got the class "
            f"`{value.__module__.split('.')[0]}.{value.__name__}` itself (add the "
            "parentheses: `" + value.__name__ + "()`)."
        )
    return None


# ---- tracer inspection --------------------------------------------------------------
# Two questions about the inputs of `aj.sample`, answered by looking at their tracers:
# is the call being staged out by an enclosing `jit` (then `sample` adds no `jit` of
# its own), and is it being differentiated in forward mode (which the custom-VJP
# strategies cannot do; they say so in their own words instead of JAX's generic
# error). Tracers wrap the values of the enclosing transformation: a JVP or
# linearize tracer its `primal`, a batching tracer its `val`.
try:
    from jax._src.interpreters.ad import JVPTracer as _JVPTracer
    from jax._src.interpreters.partial_eval import (
        DynamicJaxprTracer as _StagingTracer,
    )
except ImportError:  # pragma: no cover - a JAX without these private names
    _JVPTracer = _StagingTracer = ()


def _inner(tracer):
    for name in ("primal", "val"):
        inner = getattr(tracer, name, None)
        if inner is not None:
            return inner
    return None


def is_staged(tree: PyTree) -> bool:
    """True if some leaf of `tree` is (or wraps) a tracer of an enclosing `jit`."""
    for leaf in jtu.tree_leaves(tree):
        while isinstance(leaf, jax.core.Tracer):
            if isinstance(leaf, _StagingTracer):
                return True
            leaf = _inner(leaf)
    return False


def is_forward_mode(tree: PyTree) -> bool:
    """True if some leaf of `tree` is differentiated in forward mode at the innermost
    level (`jax.jvp`, `jax.jacfwd`; not `jax.grad`, whose tracers are linearize
    tracers, nor the outer `jvp` of a Hessian-vector product)."""
    return any(isinstance(leaf, _JVPTracer) for leaf in jtu.tree_leaves(tree))
