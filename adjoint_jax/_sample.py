"""`aj.sample`: the one entry point."""

import dataclasses
import functools
import types
import weakref
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, PyTree

from ._adjoints._base import AbstractAdjoint, Solve
from ._adjoints._dto import DTO
from ._misc import (
    check_value,
    describe_class_error,
    floats_to_arrays,
    index_tree,
    is_forward_mode,
    is_staged,
)
from ._model import Scheduled, check_model_output, split_model
from ._samplers._base import AbstractSampler
from ._schedule import AbstractSchedule


def sample(
    model: Callable,
    params: PyTree,
    x_T: PyTree,
    cond: PyTree = None,
    *,
    schedule: AbstractSchedule,
    ts: ArrayLike,
    sampler: AbstractSampler,
    adjoint: AbstractAdjoint = DTO(),
    key: Array | None = None,
) -> PyTree:
    """Samples x_0 from x_T with a diffusion model, differentiably.

    **Arguments:**

    - `model`: the ε-prediction network, `model(params, x, t, cond) -> ε` with ε of
        the same structure and shapes as `x`; `t` is a scalar in x's dtype. Use
        `aj.as_eps` for x0-, v- or flow-prediction networks. An Equinox module (or any
        pytree-callable) is allowed; its arrays are differentiated like `params`. The
        model may close over arrays, traced ones included (a `jit` or `vmap` tracer, a
        value being differentiated): every strategy differentiates them like `params`.
    - `params`: the network's parameters (any pytree; differentiable).
    - `x_T`: the initial noise at `ts[0]` (any pytree of floating arrays;
        differentiable). Batch dimensions belong to the model (or use `jax.vmap`).
    - `cond`: the conditioning: `None`, any pytree held constant over the solve, or an
        `aj.Scheduled` with one value per step (differentiable).
    - `schedule`: the noise schedule, e.g. `aj.VPLinear()`. Its parameters may be
        traced; `aj.DTO()` differentiates them.
    - `ts`: the strictly decreasing, finite time grid, `len(ts) = N + 1 >= 2`, inside
        `[schedule.t_min, schedule.t_max]`; see `aj.time_grid`.
    - `sampler`: the forward discretisation, e.g. `aj.DPMSolver1()`.
    - `adjoint`: how the gradient is obtained, e.g. `aj.DTO()` (default, exact) or
        `aj.AdjointDEIS(order=1)` (continuous adjoint, O(1) memory).
    - `key`: a PRNG key; required by SDE samplers (step i uses
        `jax.random.fold_in(key, i)`), ignored otherwise.

    **Returns:** x_0, with the structure and dtypes of `x_T`.

    **Dtypes.** The sampler state, and so x_0, keeps x_T's dtype. The model sees x in
    that dtype and t cast to it; whatever floating dtype it returns is cast back to
    x's (so a bfloat16 network under a float32 state works, and so does a float64
    `ts` with a float32 state: step coefficients are computed in `ts`'s dtype and
    rounded once). Cotangents summed over the steps for low-precision parameters are
    accumulated in float32 and returned in the parameters' dtype.

    **Transformations.** Composes with `jax.jit`, `jax.vmap` and `jax.grad` in any
    nesting. Forward mode (`jax.jvp`, `jax.jacfwd`) works with `aj.DTO()` and
    `aj.DTO(checkpoints="steps")`; the other strategies raise an error saying so.

    **Speed.** Inside your own `jax.jit`, `sample` adds no `jit` of its own: your
    compilation is the only one. Called outside `jit` (eager code, an eager
    `jax.grad`), it compiles its loop once and reuses it while the model callable is
    the same *or equivalent*: a plain function, `lambda` or `functools.partial` is
    keyed by its code and the non-array values it closes over, and the arrays it
    closes over are passed in, so a model built afresh on every call (a guidance
    wrapper created inside the loss, closing over the value being differentiated)
    does not recompile. What does recompile: a closed-over Python number that changes
    (pass it as an array instead), and a new object of a class that is not a pytree
    (write such wrappers as `eqx.Module`s or `jax.tree_util.Partial`s, whose arrays
    are inputs). Compiled loops of callables that no longer exist are released.

    !!! Example

        ```python
        x0 = aj.sample(model, params, x_T, cond, schedule=aj.VPLinear(),
                       ts=aj.time_grid(aj.VPLinear(), 20, t_end=1e-3),
                       sampler=aj.DPMSolver1(), adjoint=aj.AdjointDEIS())
        ```
    """
    # ---- static checks: types, shapes, combinations --------------------------------
    for arg, value, example in (
        ("model", model, "my_model"),
        ("schedule", schedule, "aj.VPLinear()"),
        ("sampler", sampler, "aj.DPMSolver1()"),
        ("adjoint", adjoint, "aj.DTO()"),
    ):
        msg = describe_class_error(arg, value, example)
        if msg:
            raise TypeError(msg)
    if not callable(model):
        raise TypeError(f"`model` must be callable; got {type(model).__name__}.")
    if not isinstance(schedule, AbstractSchedule):
        raise TypeError(
            "`schedule` must be an `aj` schedule such as `aj.VPLinear()`; got "
            f"{type(schedule).__name__}."
        )
    if not isinstance(sampler, AbstractSampler):
        raise TypeError(
            "`sampler` must be an `aj` sampler such as `aj.DPMSolver1()`; got "
            f"{type(sampler).__name__}."
        )
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(
            "`adjoint` must be an `aj` gradient strategy such as `aj.DTO()`; got "
            f"{type(adjoint).__name__}."
        )
    adjoint.check_sampler(sampler)

    x_leaves = jtu.tree_leaves(x_T)
    if not x_leaves:
        raise ValueError("`x_T` must contain at least one array.")
    for leaf in x_leaves:
        if not (hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)):
            dt = getattr(leaf, "dtype", type(leaf).__name__)
            raise TypeError(
                f"`x_T` must be a pytree of floating-point arrays; got a leaf of dtype "
                f"{dt}."
            )

    ts = jnp.asarray(ts)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(
            f"`ts` must be a 1-D array with len(ts) >= 2 (N + 1 times for N steps); "
            f"got shape {ts.shape}."
        )
    if not jnp.issubdtype(ts.dtype, jnp.floating):
        ts = ts.astype(jnp.result_type(float))
    num_steps = ts.shape[0] - 1

    scheduled = isinstance(cond, Scheduled)
    cond_values = cond.values if scheduled else cond
    if scheduled:
        leaves = jtu.tree_leaves(cond_values)
        if not leaves:
            raise ValueError(
                "`aj.Scheduled(values)` needs at least one array in values."
            )
        for leaf in leaves:
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != num_steps:
                raise ValueError(
                    "`cond=aj.Scheduled(values)` needs every leaf of `values` to "
                    "have a leading axis of length len(ts) - 1 = "
                    f"{num_steps}; got a leaf of "
                    f"shape {jnp.shape(leaf)}."
                )

    if sampler.is_sde and key is None:
        raise ValueError(
            f"`sampler={sampler!r}` is stochastic and needs `key=jax.random.key(...)`."
        )
    if not sampler.is_sde:
        key = None

    model_call, model_arrays = split_model(model)
    theta = (model_arrays, params)
    cond0 = index_tree(cond_values, 0) if scheduled else cond_values
    check_model_output(model, model_call, theta, x_T, ts[0], cond0)

    # ---- value checks: eager when concrete, `eqx.error_if` under tracing -----------
    ts = check_value(
        ~jnp.all(jnp.isfinite(ts)),
        "`ts` contains NaN or inf; it must be a finite, strictly decreasing grid "
        "(see `aj.time_grid`).",
        ts,
    )
    ts = check_value(
        jnp.any(ts[1:] >= ts[:-1]), "`ts` must be strictly decreasing.", ts
    )
    ts = check_value(
        (ts[0] > schedule.t_max) | (ts[-1] < schedule.t_min),
        f"`ts` must lie in [schedule.t_min, schedule.t_max] = [{schedule.t_min}, "
        f"{schedule.t_max}].",
        ts,
    )

    # ---- forward mode: the strategies that have none say so in their own words -----
    reverse_only = adjoint.forward_mode_error()
    inputs = (params, x_T, cond_values, model_arrays, ts, schedule)
    if reverse_only is not None and is_forward_mode(inputs):
        raise TypeError(reverse_only)

    solve = Solve(model_call, schedule, ts, sampler, key, scheduled)
    try:
        if is_staged(inputs):
            # Inside the user's own `jit`: it is what compiles; adding one of ours
            # would only add a cache entry per traced model callable.
            return adjoint.loop(solve, theta, x_T, cond_values)
        return _jitted_loop(adjoint, solve, theta, x_T, cond_values)
    except TypeError as e:
        # Forward mode through a model that closes over the JVP-traced value: JAX's
        # own error ("can't apply forward-mode autodiff (jvp) to a custom_vjp
        # function") comes from inside; say what it means here.
        if reverse_only is not None and "forward-mode" in str(e):
            raise TypeError(reverse_only) from e
        raise


# ---- the compiled loop of eager calls ------------------------------------------------
# An eager `sample` (not inside the user's `jit`) compiles its loop, keyed on the
# non-array parts of its arguments: the strategy, the sampler, the schedule's static
# bounds and the model callable.
#
# A plain function or `functools.partial` used as (or inside) the model is opened
# into a pytree first: its code object and the static parts of what it closes over
# (or is partially applied to) key the compilation, and the arrays it closes over
# become inputs. So a model built afresh on every call (a guidance wrapper created
# inside the loss, closing over a value being differentiated) reuses the compiled
# loop instead of recompiling, as long as its code and its closed-over non-array
# values are the same. Objects that cannot be opened are keyed by identity and held
# *weakly*: when they are garbage-collected, their compiled loop is dropped too (each
# compiled loop is a `jax.jit` of its own, which frees its executables), so nothing
# is kept that is never given back. The schedule's Python-float parameters are passed
# as arrays, so the compilation is never keyed on their values either. A list the
# function closes over is not opened (it is kept, and keyed, as the same object), so
# appending to it from the model works as in plain Python.
_COMPILED: dict = {}
_MAX_COMPILED = 64
_OPEN_DEPTH = 4  # how deep nested closures are opened


class _Id:
    """Hashable by the identity of a (long-lived) object it holds strongly: a
    function's globals or attribute dictionary."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, _Id) and other.obj is self.obj


class _OpenFunction:
    """A plain Python function seen as a pytree: its closure's contents, defaults and
    keyword defaults are the children; its code, globals, name and attributes the
    static part. Calling it calls the function."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.fn, name)


class _Opaque:
    """A closed-over list, kept as one object (by identity) rather than opened: lists
    are what models append to (counters, logs), and a rebuilt copy would lose that."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, _Opaque) and other.obj is self.obj


def _protect(value):
    return _Opaque(value) if type(value) is list else value


def _unprotect(value):
    return value.obj if type(value) is _Opaque else value


def _flatten_function(f: _OpenFunction):
    fn = f.fn
    cells = tuple(_protect(c.cell_contents) for c in fn.__closure__ or ())
    # Attributes (set by decorators) key the compilation only when there are any: a
    # fresh lambda's empty `__dict__` is a new object each time.
    attrs = _Id(fn.__dict__) if fn.__dict__ else None
    aux = (fn.__code__, _Id(fn.__globals__), fn.__name__, attrs)
    return (cells, fn.__defaults__, fn.__kwdefaults__), aux


def _unflatten_function(aux, children):
    code, globals_, name, attrs = aux
    cells, defaults, kwdefaults = children
    fn = types.FunctionType(
        code,
        globals_.obj,
        name,
        defaults,
        tuple(types.CellType(_unprotect(c)) for c in cells),
    )
    fn.__kwdefaults__ = kwdefaults
    if attrs is not None:
        fn.__dict__ = attrs.obj  # the same dict, so that flattening again is stable
    return _OpenFunction(fn)


jtu.register_pytree_node(_OpenFunction, _flatten_function, _unflatten_function)


class _OpenPartial:
    """A `functools.partial` seen as a pytree (its arguments are the children)."""

    __slots__ = ("func", "args", "keywords")

    def __init__(self, func, args, keywords):
        self.func, self.args, self.keywords = func, args, keywords

    def __call__(self, *args, **kwargs):
        return self.func(*self.args, *args, **{**self.keywords, **kwargs})


jtu.register_pytree_node(
    _OpenPartial,
    lambda p: ((p.func, p.args, p.keywords), None),
    lambda _, children: _OpenPartial(*children),
)


def _openable(fn) -> bool:
    if type(fn) is not types.FunctionType:
        return False
    try:
        for cell in fn.__closure__ or ():
            cell.cell_contents  # an unbound cell cannot be reconstructed
    except ValueError:
        return False
    return True


def _open(tree, depth: int = 0, seen: frozenset = frozenset()):
    """`tree` with its plain functions and partials opened into pytrees (see above),
    recursively through what they close over, up to `_OPEN_DEPTH` levels and never
    twice through the same object (a recursive closure stays opaque)."""
    if depth >= _OPEN_DEPTH:
        return tree

    def open_leaf(leaf):
        if id(leaf) in seen:
            return leaf
        inner = seen | {id(leaf)}
        if _openable(leaf):
            opened = _open(_flatten_function(_OpenFunction(leaf))[0], depth + 1, inner)
            return _unflatten_function(
                _flatten_function(_OpenFunction(leaf))[1], opened
            )
        if type(leaf) is functools.partial:
            func, args, keywords = _open(
                (leaf.func, leaf.args, leaf.keywords), depth + 1, inner
            )
            return _OpenPartial(func, args, keywords)
        return leaf

    return jtu.tree_map(open_leaf, tree)


class _Ref:
    """A hashable stand-in for an identity-hashed static leaf, holding it weakly when
    it can."""

    __slots__ = ("_id", "_weak", "_strong", "__weakref__")

    def __init__(self, obj):
        self._id = id(obj)
        try:
            self._weak, self._strong = weakref.ref(obj), None
        except TypeError:
            self._weak, self._strong = None, obj

    def get(self):
        return self._strong if self._weak is None else self._weak()

    def __hash__(self):
        return self._id

    def __eq__(self, other):
        if not isinstance(other, _Ref) or other._id != self._id:
            return False
        obj = self.get()
        return obj is not None and obj is other.get()


def _by_identity(leaf) -> bool:
    h = type(leaf).__hash__
    return h is None or h is object.__hash__


def _run(key, dynamic):
    treedef, keyed = key
    leaves = [k.get() if isinstance(k, _Ref) else k for k in keyed]
    adjoint, solve, theta, x_T, cond = eqx.combine(
        dynamic, jtu.tree_unflatten(treedef, leaves)
    )
    return adjoint.loop(solve, theta, x_T, cond)


def _jitted_loop(adjoint, solve, theta, x_T, cond):
    solve = dataclasses.replace(
        solve, schedule=floats_to_arrays(solve.schedule), model=_open(solve.model)
    )
    dynamic, static = eqx.partition((adjoint, solve, theta, x_T, cond), eqx.is_array)
    leaves, treedef = jtu.tree_flatten(static)
    keyed = tuple(_Ref(v) if _by_identity(v) else v for v in leaves)
    key = (treedef, keyed)
    fn = _COMPILED.get(key)
    if fn is None:
        fn = jax.jit(functools.partial(_run, key))
        _COMPILED[key] = fn
        for leaf, k in zip(leaves, keyed):
            if isinstance(k, _Ref) and k._weak is not None:
                weakref.finalize(leaf, _COMPILED.pop, key, None)
        while len(_COMPILED) > _MAX_COMPILED:  # a bound for objects held strongly
            _COMPILED.pop(next(iter(_COMPILED)))
    return fn(dynamic)
