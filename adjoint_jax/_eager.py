"""The compiled loop of eager `aj.sample` calls: a cache that is never stale.

Inside the user's own `jit`, `aj.sample` adds no `jit` of its own. Called eagerly (or
under an eager `jax.grad`/`jax.vmap`), it compiles its loop and keeps the compiled
program for the next call. Two things decide whether a call may reuse it.

**The key**: the non-array parts of the call (strategy, sampler, the schedule's
static bounds, the shapes and dtypes of the arrays, and the model callable). A plain
function or `functools.partial` used as (or inside) the model is *opened* into a
pytree first (`open_model`): its code object and the static parts of what it closes
over (or is partially applied to) key the compilation, and the arrays it closes over
become inputs. So a model built afresh on every call (a guidance wrapper created
inside the loss, closing over a value being differentiated) reuses the compiled loop:
its closed-over values are read anew on every call. Objects that cannot be opened (a
bound method, a callable class that is not a pytree, a bound Flax Linen module) are
keyed by their value when they hash and compare by value, else by identity; those
keyed by identity are held *weakly*, and their compiled loop is dropped when they are
garbage-collected. Objects that refuse `__hash__` or `__eq__` are keyed by identity.

**The signature**: what the model reads at call time that is *not* an input. Every
eager call traces the model once anyway (the shape check), into a jaxpr; that jaxpr's
text holds every Python number the model read (a global `SCALE = 2.0`, an attribute
`self.w = 0.5`: literals), and its constants are every array it read (a module-level
array, an attribute of a bound method's object, a Linen module's variables, a cell
of a closure that could not be opened). A cached loop is reused only if the jaxpr is
the same and each constant is the same object (a NumPy constant: the same values, as
NumPy arrays can be written in place); otherwise the loop is traced and compiled
anew. So reassigning a global array, or `h.p = ...` before calling `h.eps` again,
recompiles rather than returning the previous result. If a constant is a tracer (a
model that hides a value of an enclosing `jit`, `grad` or `vmap` in an object that
is not a pytree), nothing is cached: the loop runs inside the enclosing
transformation, which compiles it.

What recompiles, then: a changed closed-over or global Python number, a reassigned
global or attribute array, and a new object of a class that is not a pytree (write
such wrappers as `eqx.Module`s or `jax.tree_util.Partial`s, whose arrays are inputs).
What is beyond any check: Python state read only by a custom differentiation rule's
backward function inside the model (the jaxpr names that function, not what it
closes over).

Transfers: with its inputs on the device (and `ts` a device array), an eager call
transfers nothing to the device once it has seen the schedule's Python-float
hyperparameters: they are passed as arrays (so that changing one does not recompile),
made once per value and reused. A NumPy `ts` is transferred on every call.
"""

import dataclasses
import functools
import types
import weakref

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np


_COMPILED: dict = {}  # key -> _Entry
_MAX_COMPILED = 64
_OPEN_DEPTH = 4  # how deep nested closures are opened


# ---- opening functions into pytrees -------------------------------------------------
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
    # No None among the children (`()` and `{}` instead): a tree utility that treats
    # None as a leaf (`eqx.tree_at`, inside diffrax) would otherwise replace it.
    return (cells, fn.__defaults__ or (), fn.__kwdefaults__ or {}), aux


def _unflatten_function(aux, children):
    code, globals_, name, attrs = aux
    cells, defaults, kwdefaults = children
    fn = types.FunctionType(
        code,
        globals_.obj,
        name,
        tuple(defaults) or None,
        tuple(types.CellType(_unprotect(c)) for c in cells),
    )
    fn.__kwdefaults__ = dict(kwdefaults) or None
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


def open_model(tree, depth: int = 0, seen: frozenset = frozenset()):
    """`tree` with its plain functions and partials opened into pytrees (see the
    module's docstring), recursively through what they close over, up to
    `_OPEN_DEPTH` levels and never twice through the same object (a recursive
    closure stays opaque)."""
    if depth >= _OPEN_DEPTH:
        return tree

    def open_leaf(leaf):
        if id(leaf) in seen:
            return leaf
        inner = seen | {id(leaf)}
        if _openable(leaf):
            children, aux = _flatten_function(_OpenFunction(leaf))
            return _unflatten_function(aux, open_model(children, depth + 1, inner))
        if type(leaf) is functools.partial:
            func, args, keywords = open_model(
                (leaf.func, leaf.args, leaf.keywords), depth + 1, inner
            )
            return _OpenPartial(func, args, keywords)
        return leaf

    return jtu.tree_map(open_leaf, tree)


# ---- keys ---------------------------------------------------------------------------
class _Ref:
    """A hashable stand-in for an identity-keyed static leaf, holding it weakly when
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


_VALUE_TYPES = (bool, int, float, complex, str, bytes, type(None))


def _by_identity(leaf) -> bool:
    """Whether a static leaf is keyed by identity: unless it hashes and compares
    equal to itself by value (objects that refuse `__hash__` or `__eq__`, such as a
    bound Linen module, are keyed by identity)."""
    if type(leaf) in _VALUE_TYPES:
        return False
    h = type(leaf).__hash__
    if h is None or h is object.__hash__:
        return True
    try:
        hash(leaf)
        return (leaf == leaf) is not True
    except Exception:
        return True


# ---- signatures ---------------------------------------------------------------------
class Signature:
    """What a traced model read that is not an input (see the module's docstring):
    its jaxpr's text and its constants (NumPy ones copied)."""

    __slots__ = ("text", "consts")

    def __init__(self, closed_jaxpr):
        self.text = str(closed_jaxpr.jaxpr)
        self.consts = tuple(
            np.array(c) if isinstance(c, np.ndarray) else c for c in closed_jaxpr.consts
        )

    @property
    def traced(self) -> bool:
        """Whether the model hides a tracer of an enclosing transformation."""
        return any(isinstance(c, jax.core.Tracer) for c in self.consts)

    def __eq__(self, other):
        return (
            isinstance(other, Signature)
            and self.text == other.text
            and len(self.consts) == len(other.consts)
            and all(map(_same_const, self.consts, other.consts))
        )

    __hash__ = None


def _same_const(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    return False


# ---- the cache ----------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _device_float(value: float, x64: bool):
    del x64  # keys the cache: the array's dtype follows the flag
    return jax.numpy.asarray(np.float64(value))


def _device_floats(tree):
    """`tree` with its Python floats (a schedule's β, a sampler's coupling) as
    float64 arrays, so that compiled code is never keyed on a hyperparameter's value
    (changing β reuses the compilation, and the value can be traced). Each value's
    device array is made once and reused: an eager call transfers no hyperparameter
    it has seen before."""
    x64 = bool(jax.config.jax_enable_x64)
    return jtu.tree_map(lambda v: _device_float(v, x64) if type(v) is float else v, tree)


def _run(key, dynamic):
    treedef, keyed = key
    leaves = [k.get() if isinstance(k, _Ref) else k for k in keyed]
    adjoint, solve, theta, x_T, cond, noise = eqx.combine(
        dynamic, jtu.tree_unflatten(treedef, leaves)
    )
    return adjoint.loop(solve, theta, x_T, cond, noise)


def eager_loop(adjoint, solve, theta, x_T, cond, noise, signature: Signature):
    """`adjoint.loop(solve, theta, x_T, cond, noise)` through the cache; `solve`'s
    model is already opened (`open_model`) and `signature` is its trace's."""
    if signature.traced:
        return adjoint.loop(solve, theta, x_T, cond, noise)
    solve = dataclasses.replace(solve, schedule=_device_floats(solve.schedule))
    dynamic, static = eqx.partition(
        (adjoint, solve, theta, x_T, cond, noise), eqx.is_array
    )
    leaves, treedef = jtu.tree_flatten(static)
    keyed = tuple(_Ref(v) if _by_identity(v) else v for v in leaves)
    key = (treedef, keyed)
    entry = _COMPILED.get(key)
    if entry is None or entry[1] != signature:
        entry = (jax.jit(functools.partial(_run, key)), signature)
        if key not in _COMPILED:
            for leaf, k in zip(leaves, keyed):
                if isinstance(k, _Ref) and k._weak is not None:
                    weakref.finalize(leaf, _COMPILED.pop, key, None)
        _COMPILED[key] = entry
        while len(_COMPILED) > _MAX_COMPILED:  # a bound for objects held strongly
            _COMPILED.pop(next(iter(_COMPILED)))
    return entry[0](dynamic)
