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
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree

from ._adjoints._base import AbstractAdjoint, AbstractCustomAdjoint, Solve
from ._adjoints._dto import DTO
from ._misc import (
    check_value,
    describe_class_error,
    floats_to_arrays,
    index_tree,
    is_concrete,
    is_forward_mode,
    is_staged,
)
from ._model import Scheduled, check_model_output, split_model
from ._samplers._base import AbstractSampler
from ._schedule import AbstractSchedule


def check_types(
    model, schedule, sampler, adjoint=None, *, sampler_example: str = "aj.DPMSolver1()"
) -> None:
    """Raises a `TypeError` naming the argument if `model` is not callable or
    `schedule`, `sampler` or `adjoint` (when given) is not an instance of the library's
    class (a class passed for an instance included)."""
    for arg, value, example in (
        ("model", model, "my_model"),
        ("schedule", schedule, "aj.VPLinear()"),
        ("sampler", sampler, sampler_example),
        ("adjoint", adjoint, "aj.DTO()"),
    ):
        msg = describe_class_error(arg, value, example)
        if msg:
            raise TypeError(msg)
    if not callable(model):
        raise TypeError(f"`model` must be callable; got {type(model).__name__}.")
    for arg, value, base, example in (
        ("schedule", schedule, AbstractSchedule, "an `aj` schedule such as `aj.VPLinear()`"),
        ("sampler", sampler, AbstractSampler, f"an `aj` sampler such as `{sampler_example}`"),
        ("adjoint", adjoint, AbstractAdjoint, "an `aj` gradient strategy such as `aj.DTO()`"),
    ):
        if (value is not None or arg != "adjoint") and not isinstance(value, base):
            raise TypeError(f"`{arg}` must be {example}; got {type(value).__name__}.")


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
    noise: PyTree = None,
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
        `[schedule.t_min, schedule.t_max]`, except that it may end exactly at 0
        (σ = 0: the last step is the data prediction) and start exactly at
        `schedule.alpha_zero_time` (α = 0, e.g. t = 1 of `aj.FlowMatching()`; the
        model must then give its data prediction: wrap it with `aj.as_eps`). See
        `aj.time_grid` and `aj.diffusers_timesteps`. The strategies that solve a
        continuous adjoint need such endpoints in a concrete `ts` (not a traced
        argument).
    - `sampler`: the forward discretisation, e.g. `aj.DPMSolver1()`.
    - `adjoint`: how the gradient is obtained, e.g. `aj.DTO()` (default, exact) or
        `aj.AdjointDEIS(order=1)` (continuous adjoint, O(1) memory).
    - `key`: a PRNG key for stochastic samplers (`aj.SDEDPMSolver1()`,
        `aj.DDIM(eta > 0)`): step i's noise for the j-th of x_T's L leaves is
        `jax.random.normal(jax.random.split(jax.random.fold_in(key, i), L)[j],
        shape, ts.dtype)`, cast to the leaf's dtype. Ignored by deterministic
        samplers.
    - `noise`: instead of `key`, the stochastic sampler's per-step standard normal
        noises: a pytree like `x_T` whose leaves have a leading axis of length
        N = len(ts) − 1 (step i uses `noise[i]`). Differentiable: `aj.DTO()` returns
        ∂L/∂noise exactly; `aj.AdjointDEIS` and `aj.RecordedAdjoint` return it from
        their continuous adjoint (the noise's scale times the adjoint at the end of
        its step); the other strategies do not apply to stochastic samplers.

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
    check_types(model, schedule, sampler, adjoint)
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

    # A concrete grid (also one closed over inside the user's `jit`) is checked, and
    # its endpoints read, with NumPy: eagerly, and statically for the strategies.
    # Only a traced `ts` gets runtime checks.
    # (`jnp` operations inside a `jit` are traced even on constants, so NumPy.)
    xp = np if is_concrete(ts) else jnp
    if xp is np:
        ts = np.asarray(ts)
        ts = ts.astype(jax.dtypes.canonicalize_dtype(ts.dtype))
    else:
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

    if sampler.is_sde:
        if (key is None) == (noise is None):
            raise ValueError(
                f"`sampler={sampler!r}` is stochastic and needs either "
                "`key=jax.random.key(...)` or `noise=...` (one noise per step); got "
                + ("neither." if key is None else "both.")
            )
    else:
        key = None
        if noise is not None:
            raise ValueError(
                f"`noise=...` is for stochastic samplers; `sampler={sampler!r}` is "
                "deterministic."
            )
    if noise is not None:
        noise = _check_noise(noise, x_T, num_steps)

    model_call, model_arrays = split_model(model)
    theta = (model_arrays, params)
    cond0 = index_tree(cond_values, 0) if scheduled else cond_values
    has_x0 = check_model_output(model, model_call, theta, x_T, ts[0], cond0)

    # ---- value checks: eager when concrete, `eqx.error_if` under tracing -----------
    ts = check_value(
        ~xp.all(xp.isfinite(ts)),
        "`ts` contains NaN or inf; it must be a finite, strictly decreasing grid "
        "(see `aj.time_grid`).",
        ts,
    )
    ts = check_value(
        xp.any(ts[1:] >= ts[:-1]), "`ts` must be strictly decreasing.", ts
    )
    alpha_zero = schedule.alpha_zero_time
    inside = (ts >= schedule.t_min) & (ts <= schedule.t_max)
    ends_zero = ts[-1] == 0
    starts_zero = ts[0] == (np.nan if alpha_zero is None else alpha_zero)
    inside = xp.concatenate(
        [inside[:1] | starts_zero, inside[1:-1], inside[-1:] | ends_zero]
    )
    extra = "" if alpha_zero is None else f", its first may be {alpha_zero} (α = 0)"
    ts = check_value(
        ~xp.all(inside),
        f"`ts` must lie in [schedule.t_min, schedule.t_max] = [{schedule.t_min}, "
        f"{schedule.t_max}] (its last point may be 0, σ = 0{extra}).",
        ts,
    )
    static_ends = is_concrete((ends_zero, starts_zero))
    for flag, able, what in (
        (ends_zero, sampler.steps_to_sigma_zero, "end at σ = 0 (t = 0)"),
        (starts_zero, sampler.steps_from_alpha_zero, "start at α = 0"),
    ):
        if not able:
            ts = check_value(
                flag,
                f"`sampler={sampler!r}` cannot take a grid that {what}: end the grid "
                "at t > 0 (e.g. `schedule.t_min`) and start it below "
                "`alpha_zero_time`, or use `aj.DPMSolverPP()`, `aj.DDIM(eta)` or "
                "`aj.DPMSolver1()`/`aj.DPMSolver2()`, which can.",
                ts,
            )
    if not has_x0:
        ts = check_value(
            starts_zero,
            f"`ts` starts at α = 0 (t = {alpha_zero}), where x = σ ε carries no "
            "information about the data, so an ε-prediction model cannot give the "
            "first step: pass the network with its own parameterisation through "
            "`aj.as_eps(model, schedule, prediction='flow' | 'v' | 'x0')`.",
            ts,
        )
    if isinstance(adjoint, AbstractCustomAdjoint) and not static_ends:
        ts = check_value(
            ends_zero | starts_zero,
            f"`adjoint={adjoint!r}` differentiates the steps at a grid's endpoints "
            "(t = 0, or α = 0) exactly and needs to know them when the solve is "
            "traced: pass `ts` as a concrete array (close over it instead of "
            "passing it as an argument of your `jit`), or use `adjoint=aj.DTO()`.",
            ts,
        )

    # ---- forward mode: the strategies that have none say so in their own words -----
    reverse_only = adjoint.forward_mode_error()
    inputs = (params, x_T, cond_values, noise, model_arrays, ts, schedule)
    if reverse_only is not None and is_forward_mode(inputs):
        raise TypeError(reverse_only)

    solve = Solve(
        model_call,
        schedule,
        jnp.asarray(ts),
        sampler,
        key,
        scheduled,
        starts_at_alpha_zero=bool(starts_zero) if static_ends else False,
        ends_at_sigma_zero=bool(ends_zero) if static_ends else False,
    )
    try:
        if is_staged(inputs):
            # Inside the user's own `jit`: it is what compiles; adding one of ours
            # would only add a cache entry per traced model callable.
            return adjoint.loop(solve, theta, x_T, cond_values, noise)
        return _jitted_loop(adjoint, solve, theta, x_T, cond_values, noise)
    except TypeError as e:
        # Forward mode through a model that closes over the JVP-traced value: JAX's
        # own error ("can't apply forward-mode autodiff (jvp) to a custom_vjp
        # function") comes from inside; say what it means here.
        if reverse_only is not None and "forward-mode" in str(e):
            raise TypeError(reverse_only) from e
        raise


def _check_noise(noise, x_T, num_steps: int):
    """The explicit noise, checked against x_T (structure, a leading axis of N on
    every leaf, floating dtype) and cast to x_T's dtypes."""
    x_struct = jax.eval_shape(lambda: x_T)
    if jtu.tree_structure(noise) != jtu.tree_structure(x_struct):
        raise ValueError(
            "`noise` must have the structure of `x_T` (one array per leaf, with a "
            f"leading axis of length N = {num_steps}); got structure "
            f"{jtu.tree_structure(noise)} for x_T's {jtu.tree_structure(x_struct)}."
        )
    for n, x in zip(jtu.tree_leaves(noise), jtu.tree_leaves(x_struct)):
        if jnp.shape(n) != (num_steps, *x.shape):
            raise ValueError(
                f"`noise` leaves must have shape (N, *x.shape) = {(num_steps, *x.shape)}"
                f" (step i uses noise[i]); got {jnp.shape(n)}."
            )
        if not jnp.issubdtype(jnp.result_type(n), jnp.floating):
            raise TypeError(
                f"`noise` must be floating-point; got dtype {jnp.result_type(n)}."
            )
    return jtu.tree_map(lambda n, x: jnp.asarray(n).astype(x.dtype), noise, x_struct)


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
    """Hashable by the identity of an object it holds strongly: a function's globals
    or attribute dictionary (in the static part of an opened function), or a
    closed-over list, kept as one object rather than opened (lists are what models
    append to, counters and logs, and a rebuilt copy would lose that)."""

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


def _protect(value):
    return _Id(value) if type(value) is list else value


def _unprotect(value):
    return value.obj if type(value) is _Id else value


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
    adjoint, solve, theta, x_T, cond, noise = eqx.combine(
        dynamic, jtu.tree_unflatten(treedef, leaves)
    )
    return adjoint.loop(solve, theta, x_T, cond, noise)


def _jitted_loop(adjoint, solve, theta, x_T, cond, noise):
    solve = dataclasses.replace(
        solve, schedule=floats_to_arrays(solve.schedule), model=_open(solve.model)
    )
    dynamic, static = eqx.partition(
        (adjoint, solve, theta, x_T, cond, noise), eqx.is_array
    )
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
