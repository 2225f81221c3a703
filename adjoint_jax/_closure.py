"""Closure conversion that tolerates shardings.

A custom VJP must see every array its output depends on as an input, so the model is
closure-converted before it enters one: traced once into a jaxpr whose constants (the
arrays it closes over, jit/vmap/grad tracers included) become pytree leaves.
`eqx.filter_closure_convert` does this but refuses a later call whose arguments
differ from the example's in *any* part of their abstract value. Under JAX sharding
the abstract value also holds a sharding (explicit mesh axes) and the manual axes an
array varies over (`shard_map`, `pmap`), and those legitimately differ between the
example (x_T, a concrete t) and the calls inside a sampler's loops (a scalar t
indexed inside a loop is `P()` under an explicit mesh; a state is varying inside
`shard_map`). Here only shapes, dtypes and the static parts must match: the jaxpr is
re-evaluated on the call's arguments, so every primitive recomputes its output's
sharding and varying axes from them. A model that closes over no array is not
converted at all under explicit mesh axes (`Direct`).
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu


def _struct(a) -> tuple:
    return (jnp.shape(a), jnp.result_type(a))


class Direct(eqx.Module):
    """`fn` itself, when it closes over no array and explicit mesh axes are in use:
    called directly, so it is traced afresh at every call, under whatever mesh
    context the call is in (a jaxpr is evaluated under the mesh context it was
    traced in, which inside `jax.sharding.auto_axes` is the wrong one)."""

    fn: Callable

    def __call__(self, *args):
        return self.fn(*args)


class ClosureConverted(eqx.Module):
    """`fn` traced once into a jaxpr. Its own arrays (`fn_arrays`) and the traced
    values it closes over (`consts`) are pytree leaves, so they are differentiated
    like any argument; calling it evaluates the jaxpr on them and the arguments."""

    # A leaf, not static (as in equinox): transformations that look for sub-jaxprs
    # see it.
    jaxpr: Any
    consts: list
    fn_arrays: list
    in_structs: tuple = eqx.field(static=True)
    in_static: Any = eqx.field(static=True)
    out_treedef: Any = eqx.field(static=True)
    out_static: Any = eqx.field(static=True)

    def __call__(self, *args):
        dynamic, static = eqx.partition(args, eqx.is_array)
        leaves, treedef = jtu.tree_flatten(dynamic)
        structs = (treedef, tuple(_struct(a) for a in leaves))
        same_static = eqx.tree_equal(static, self.in_static) is True
        if structs != self.in_structs or not same_static:
            raise ValueError(
                "A closure-converted model was called with arguments whose structure, "
                f"shapes or dtypes differ from its example: {structs} vs "
                f"{self.in_structs}. This is a bug in adjoint_jax; please report it."
            )
        out = jax.core.eval_jaxpr(self.jaxpr, self.consts, *self.fn_arrays, *leaves)
        return eqx.combine(jtu.tree_unflatten(self.out_treedef, out), self.out_static)


def closure_convert(fn: Callable, *args) -> Direct | ClosureConverted:
    """`fn` (a function or a callable pytree such as an Equinox module) with every
    array it closes over (jit, vmap or grad tracers included) made a pytree leaf;
    `args` are example arguments (shapes and dtypes only matter: later calls may
    differ in sharding and varying manual axes). When it closes over no array,
    `fn` itself (`Direct`)."""
    fn_arrays, fn_static = eqx.partition(fn, eqx.is_array)
    fn_leaves, fn_treedef = jtu.tree_flatten(fn_arrays)
    dynamic, static = eqx.partition(args, eqx.is_array)
    leaves, treedef = jtu.tree_flatten(dynamic)
    out_box = []

    def flat_fn(fn_flat, flat):
        f = eqx.combine(jtu.tree_unflatten(fn_treedef, fn_flat), fn_static)
        out = f(*eqx.combine(jtu.tree_unflatten(treedef, flat), static))
        out_dynamic, out_static = eqx.partition(out, eqx.is_array)
        out_leaves, out_treedef = jtu.tree_flatten(out_dynamic)
        out_box.append((out_treedef, out_static))
        return out_leaves

    closed = jax.make_jaxpr(flat_fn)(fn_leaves, leaves)
    mesh = jax.sharding.get_abstract_mesh()
    if not closed.consts and not mesh.empty and mesh.explicit_axes:
        # Under explicit mesh axes a model closing over nothing is called directly
        # (see `Direct`). Otherwise the jaxpr is evaluated: the model is traced once
        # however often a strategy calls it, and a closed-over concrete array stays
        # a leaf, so that a cache keyed on the model's structure (diffrax's
        # `filter_jit` inside `aj.AdjointDPM`) sees a reassigned global's value.
        return Direct(fn)
    out_treedef, out_static = out_box[0]
    return ClosureConverted(
        jaxpr=closed.jaxpr,
        consts=list(closed.consts),
        fn_arrays=fn_leaves,
        in_structs=(treedef, tuple(_struct(a) for a in leaves)),
        in_static=static,
        out_treedef=out_treedef,
        out_static=out_static,
    )

