"""Convolutions that stay fast inside loops on XLA:CPU.

**The problem.** XLA:CPU hands a convolution to its fast kernels (YNNPACK, Eigen)
only when its dimension numbers are canonical: input NHWC, kernel HWIO, output NHWC
(`PotentiallyImplementedAsEigenConvolution`). Its `ConvCanonicalization` pass, which
rewrites any other convolution as transpose → canonical conv → transpose, visits
only the module's entry computation (`xla/service/cpu/conv_canonicalization.cc`).
A non-canonical convolution inside a `while` body (`lax.scan`, `fori_loop`) is left
as it is and compiled to XLA's generic loop-nest convolution, 10–70× slower
(jax-ml/jax#12868 is the forward-pass version of this). A network written in
NHWC/HWIO is canonical in its forward pass, but JAX's transpose rule of a
convolution is not: the gradient with respect to the input is a convolution with
the reversed kernel declared HWOI (`b01f_01oi->b01f`), the gradient with respect to
the kernel one declared `f01b_i01o->01bf`. So every backward pass over sampler steps
(the backward scan of `aj.DTO`, the VJP scans of the custom adjoints) ran its
convolution gradients on the slow path: on `aj.zoo.digits()`, a scan of 20 VJPs
took 580–1000 ms against 67–100 ms unrolled.

**The fix.** `canonical_convs(f)` traces `f` to a jaxpr and evaluates it again with
every convolution (with one feature and batch group) replaced by `_conv`: the
operands are transposed to NHWC/HWIO, a canonical convolution is applied, and the
result is transposed back (XLA folds the transposes into neighbouring fusions, and
they are identities for an NHWC/HWIO network). `_conv` carries a custom JVP whose
tangent convolutions are *declared* in the layouts whose JAX transposes are
canonical (below), so the convolutions of every VJP taken through it (inside a scan
or not, by JAX's own AD or by an adjoint's) are canonical too. The values and
derivatives are those of the original convolution: only dimension numbers and
explicit transposes change. `ModelCall` applies it to the model on the CPU backend.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.extend import core as jex_core


_CONV = "conv_general_dilated"
_INLINE = ("jit", "pjit", "closed_call", "core_call")


# Tests switch the rewrite on or off regardless of the backend.
_STATE = {"force": None}


def _enabled() -> bool:
    if _STATE["force"] is not None:
        return _STATE["force"]
    return jax.default_backend() == "cpu"


def _canonical_specs(nd: int):
    """(lhs, rhs, out) specs of the canonical layouts for `nd`-dimensional operands:
    (batch, feature, spatial...) indices of NHWC, (out, in, spatial...) of HWIO."""
    ns = nd - 2
    nhwc = (0, nd - 1) + tuple(range(1, nd - 1))
    hwio = (nd - 1, nd - 2) + tuple(range(ns))
    return nhwc, hwio, nhwc


def _bind(lhs, rhs, params, specs):
    return lax.conv_general_dilated_p.bind(
        lhs, rhs, **{**params, "dimension_numbers": lax.ConvDimensionNumbers(*specs)}
    )


def _perm_to(spec) -> tuple[int, ...]:
    """The permutation taking an activation with (batch, feature, spatial...) spec
    `spec` to NHWC, i.e. (batch, spatial..., feature)."""
    return (spec[0],) + tuple(spec[2:]) + (spec[1],)


@functools.cache
def _core(params_key):
    """The canonical NHWC/HWIO convolution with the given (hashable) parameters, as a
    `jax.custom_jvp` function of (x, w)."""
    params = dict(params_key)
    nd = len(params["dimension_numbers"].lhs_spec)
    nhwc, hwio, _ = _canonical_specs(nd)
    ns = nd - 2
    sp = tuple(range(1, nd - 1))

    @jax.custom_jvp
    def conv(x, w):
        return _bind(x, w, params, (nhwc, hwio, nhwc))

    # Derivation. The convolution is bilinear, so its tangent is
    # conv(ẋ, w) + conv(x, ẇ); we write each term as the *same* convolution with
    # operands in permuted layouts (so values and derivatives are unchanged), chosen
    # so that JAX's transpose rules produce canonical convolutions:
    # - ∂/∂x: the transpose of conv(ẋ, K; rhs spec R) w.r.t. ẋ is conv(ḡ, rev(K))
    #   with R's in/out entries swapped. Declaring the kernel as K = w with its last
    #   two axes swapped and R = HWOI makes the transposed kernel spec HWIO.
    # - ∂/∂w: the transpose w.r.t. the kernel is conv(x, ḡ) with the batch and
    #   feature entries of x's and ḡ's specs swapped and the output spec taken from
    #   the kernel's. Declaring x as x' = (C, spatial..., N) with spec "f01b", ẇ as
    #   (I, spatial..., O) with spec "i01o" and the output as (spatial..., N, O) with
    #   spec "01bf" makes the transposed convolution NHWC/HWIO → NHWC exactly.
    def conv_jvp(primals, tangents):
        x, w = primals
        xd, wd = tangents
        y = conv(x, w)
        out = None
        if not isinstance(xd, SymbolicZero):
            hwoi = (nd - 2, nd - 1) + tuple(range(ns))
            out = _bind(xd, jnp.swapaxes(w, -1, -2), params, (nhwc, hwoi, nhwc))
        if not isinstance(wd, SymbolicZero):
            x_t = jnp.transpose(x, (nd - 1,) + sp + (0,))  # (C, spatial..., N)
            w_t = jnp.transpose(wd, (ns,) + tuple(range(ns)) + (ns + 1,))  # (I, sp, O)
            f01b = (nd - 1, 0) + sp
            i01o = (nd - 1, 0) + sp
            o01bf = (ns, ns + 1) + tuple(range(ns))  # output (spatial..., N, O)
            y_t = _bind(x_t, w_t, params, (f01b, i01o, o01bf))
            # (spatial..., N, O) → (N, spatial..., O)
            term = jnp.transpose(y_t, (ns,) + tuple(range(ns)) + (ns + 1,))
            out = term if out is None else out + term
        if out is None:
            out = jnp.zeros_like(y)
        return y, out

    conv.defjvp(conv_jvp, symbolic_zeros=True)
    return conv


def _key(params) -> tuple:
    return tuple(sorted(params.items(), key=lambda kv: kv[0]))


def _conv(lhs, rhs, params):
    """`conv_general_dilated` with `params`, computed in NHWC/HWIO by `_core`."""
    dn = params["dimension_numbers"]
    nd = lhs.ndim
    nhwc, hwio, _ = _canonical_specs(nd)
    canon = {**params, "dimension_numbers": lax.ConvDimensionNumbers(nhwc, hwio, nhwc)}
    try:
        core = _core(_key(canon))
    except TypeError:  # an unhashable parameter: leave this convolution alone
        return lax.conv_general_dilated_p.bind(lhs, rhs, **params)
    perm_l = _perm_to(dn.lhs_spec)
    # kernel spec (out, in, spatial...) → layout (spatial..., in, out)
    perm_r = tuple(dn.rhs_spec[2:]) + (dn.rhs_spec[1], dn.rhs_spec[0])
    x = lhs if perm_l == tuple(range(nd)) else jnp.transpose(lhs, perm_l)
    w = rhs if perm_r == tuple(range(nd)) else jnp.transpose(rhs, perm_r)
    y = core(x, w)
    perm_o = _perm_to(dn.out_spec)
    if perm_o == tuple(range(nd)):
        return y
    return jnp.transpose(y, tuple(int(i) for i in np.argsort(perm_o)))


def _rewritable(params) -> bool:
    return params["feature_group_count"] == 1 and params["batch_group_count"] == 1


def has_convs(jaxpr) -> bool:
    """Whether `jaxpr` (or a jaxpr nested in it) has a convolution."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == _CONV:
            return True
        for sub in jex_core.jaxprs_in_params(eqn.params):
            if has_convs(sub):
                return True
    return False


def _eval(jaxpr, consts, args):
    env = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        with eqn.ctx.manager:
            if name == _CONV and _rewritable(eqn.params):
                outs = [_conv(*invals, eqn.params)]
            elif name in _INLINE:
                cj = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
                if hasattr(cj, "jaxpr"):
                    inner, inner_consts = cj.jaxpr, cj.consts
                else:
                    inner, inner_consts = cj, ()
                outs = _eval(inner, inner_consts, invals)
            elif name in ("checkpoint", "remat") and has_convs(eqn.params["jaxpr"]):
                inner = eqn.params["jaxpr"]
                outs = jax.checkpoint(
                    lambda *a, inner=inner: _eval(inner, (), a),
                    prevent_cse=eqn.params["prevent_cse"],
                    policy=eqn.params["policy"],
                )(*invals)
            else:
                params = eqn.primitive.get_bind_params(eqn.params)
                outs = eqn.primitive.bind(*invals, **params)
                if not eqn.primitive.multiple_results:
                    outs = [outs]
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def canonical_convs(fn):
    """`fn` with every convolution computed in NHWC/HWIO, with a derivative rule
    whose convolutions are NHWC/HWIO as well (see the module docstring). `fn` is
    traced once per call of the wrapper (a function without convolutions is then
    evaluated from that trace unchanged). Outputs are pytrees of arrays; the
    arguments' non-array leaves (a Python number in `cond`) stay static."""

    def wrapped(*args):
        dynamic, static = eqx.partition(args, eqx.is_array)
        flat, in_tree = jax.tree_util.tree_flatten(dynamic)
        closed, out_shape = jax.make_jaxpr(
            lambda *leaves: fn(
                *eqx.combine(jax.tree_util.tree_unflatten(in_tree, leaves), static)
            ),
            return_shape=True,
        )(*flat)
        if has_convs(closed.jaxpr):
            outs = _eval(closed.jaxpr, closed.consts, flat)
        else:  # evaluate the trace rather than tracing `fn` a second time
            outs = jex_core.jaxpr_as_fun(closed)(*flat)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped


def maybe_canonical_convs(fn):
    """`canonical_convs(fn)` on the CPU backend (where the slow path exists), else
    `fn`."""
    return canonical_convs(fn) if _enabled() else fn
