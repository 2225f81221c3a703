"""Model conventions: ε-prediction, conversion from other parameterisations, and
time-scheduled conditioning."""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from ._closure import closure_convert as _closure_convert
from ._convs import maybe_canonical_convs
from ._misc import first_dtype, fn_name
from ._schedule import AbstractSchedule


class Scheduled(eqx.Module):
    """Time-scheduled conditioning z_t: one conditioning value per sampler step.

    `values` is a pytree whose leaves carry a leading axis of length `len(ts) - 1`;
    value `i` is used on step `i` (from `ts[i]` to `ts[i + 1]`). Pass it as the `cond`
    argument of `aj.sample`; its gradient is an `aj.Scheduled` of the same structure,
    whose entry `i` is ∂L/∂z_i (Theorem 3 of the AdjointDEIS paper: the adjoint of a
    piecewise-constant z_t is the integral of a_xᵀ ∂f/∂z over the step where z_i is
    used). For conditioning held constant, pass the pytree itself instead.

    !!! Example

        ```python
        z = aj.Scheduled(jnp.tile(z0, (len(ts) - 1, 1)))
        gz = jax.grad(lambda z: loss(aj.sample(model, p, xT, z, ...)))(z)
        gz.values[i]  # gradient for step i's value
        ```
    """

    values: PyTree


_PREDICTIONS = ("eps", "x0", "v", "flow")


class AbstractPredictor(eqx.Module):
    """A model that gives both the noise prediction ε and the data prediction x̂_0
    from one evaluation: `predict(params, x, t, cond) -> (eps, x0)`; calling it gives
    ε. `aj.sample` asks a predictor for x̂_0 directly instead of deriving it from ε as
    (x − σ ε)/α, which is what a step from α = 0 (pure noise: t = 1 of a flow model,
    or of a zero-terminal-SNR schedule) needs. `aj.as_eps` and `aj.cfg` return
    predictors.
    """

    @abc.abstractmethod
    def predict(self, params, x, t, cond) -> tuple[PyTree, PyTree | None]:
        """(ε, x̂_0), each with the structure of `x`; x̂_0 may be None when the model
        has no data prediction of its own (it is then derived from ε)."""

    def __call__(self, params, x, t, cond):
        return self.predict(params, x, t, cond)[0]


class _AsEps(AbstractPredictor):
    model: Callable
    schedule: AbstractSchedule
    prediction: str = eqx.field(static=True)

    # With x = α x0 + σ ε, each parameterisation gives both predictions in closed
    # form, finite wherever the network's own output is (x0 and v at σ = 0, v and flow
    # at α = 0):
    #   eps:  x0 = (x − σ ε)/α;
    #   x0:   ε = (x − α x0)/σ;
    #   v:    v = α ε − σ x0  ⇒  ε = (α v + σ x)/(α² + σ²), x0 = (α x − σ v)/(α² + σ²);
    #   flow: u = α' x0 + σ' ε  ⇒  with D = α σ' − α' σ,
    #         ε = (α u − α' x)/D, x0 = (σ' x − σ u)/D   (α', σ' by forward-mode AD).
    def predict(self, params, x, t, cond):
        out = self.model(params, x, t, cond)
        out = jtu.tree_map(lambda o, xx: o.astype(xx.dtype), out, x)
        sch = self.schedule
        alpha, sigma = sch.alpha(t), sch.sigma(t)
        if self.prediction == "flow":
            _, dalpha = jax.jvp(sch.alpha, (t,), (jnp.ones_like(t),))
            _, dsigma = jax.jvp(sch.sigma, (t,), (jnp.ones_like(t),))

        def both(xx, o):
            a, s = alpha.astype(xx.dtype), sigma.astype(xx.dtype)
            if self.prediction == "eps":
                return o, (xx - s * o) / a
            if self.prediction == "x0":
                return (xx - a * o) / s, o
            if self.prediction == "v":
                norm = a * a + s * s
                return (a * o + s * xx) / norm, (a * xx - s * o) / norm
            da, ds = dalpha.astype(xx.dtype), dsigma.astype(xx.dtype)
            det = a * ds - da * s
            return (a * o - da * xx) / det, (ds * xx - s * o) / det

        pairs = jtu.tree_map(both, x, out)
        is_pair = lambda v: isinstance(v, tuple)
        eps = jtu.tree_map(lambda p: p[0], pairs, is_leaf=is_pair)
        x0 = jtu.tree_map(lambda p: p[1], pairs, is_leaf=is_pair)
        return eps, x0


def as_eps(model: Callable, schedule: AbstractSchedule, prediction: str) -> Callable:
    """Wraps a network with another output parameterisation as the ε-prediction model
    `aj.sample` expects.

    **Arguments:**

    - `model`: `model(params, x, t, cond)` returning, for `prediction=`

        - `"x0"`: the predicted clean sample x̂_0, so ε = (x − α_t x̂_0)/σ_t;
        - `"v"`: the velocity v = α_t ε − σ_t x_0 (Salimans & Ho), so
            ε = (α_t v + σ_t x)/(α_t² + σ_t²);
        - `"flow"`: the flow-matching velocity u = dx_t/dt = α'_t x_0 + σ'_t ε, so
            ε = (α_t u − α'_t x)/(α_t σ'_t − α'_t σ_t) (α', σ' by forward-mode AD
            of the schedule);
        - `"eps"`: ε itself (returned unchanged).

    - `schedule`: the schedule the network was trained with.
    - `prediction`: one of `"eps"`, `"x0"`, `"v"`, `"flow"`.

    **Returns:** a callable `eps_model(params, x, t, cond)` (an `eqx.Module`, an
    `aj.AbstractPredictor`: `aj.sample` also takes its data prediction directly,
    which lets a sampler start at α = 0, e.g. a flow model from t = 1).
    """
    if prediction not in _PREDICTIONS:
        raise ValueError(
            f"`prediction` must be one of {_PREDICTIONS}; got {prediction!r}."
        )
    if not isinstance(schedule, AbstractSchedule):
        raise TypeError(
            "`as_eps(..., schedule)` needs an `aj` schedule; got "
            f"{type(schedule).__name__}."
        )
    if not callable(model):
        raise TypeError("`as_eps(model, ...)` needs a callable model.")
    return _AsEps(model, schedule, prediction)


class _CFG(AbstractPredictor):
    model: Callable
    guidance_scale: Any
    null_cond: PyTree

    # ε = ε(z_null) + w (ε(z) − ε(z_null)), and the same combination of the data
    # predictions (x = α x̂_0 + σ ε is linear, so the two stay consistent).
    def predict(self, params, x, t, cond):
        if cond is None:
            raise ValueError(
                "`aj.cfg` needs a conditioning `cond` (the null conditioning is its "
                "`null_cond`); got cond=None."
            )
        null = _broadcast_null(self.null_cond, cond)
        both = jtu.tree_map(lambda c, n: jnp.stack([c, n]), cond, null)
        if isinstance(self.model, AbstractPredictor):
            call = lambda c: self.model.predict(params, x, t, c)
        else:
            call = lambda c: (self.model(params, x, t, c), None)
        # One batched evaluation of the conditional and the unconditional branch.
        eps2, x02 = jax.vmap(call)(both)
        w = jnp.asarray(self.guidance_scale)

        def mix(v):
            c, n = v[0], v[1]
            return n + w.astype(v.dtype) * (c - n)

        eps = jtu.tree_map(mix, eps2)
        return eps, None if x02 is None else jtu.tree_map(mix, x02)


def _broadcast_null(null_cond, cond):
    """`null_cond` broadcast to the structure, shapes and dtypes of `cond`, or an
    error naming `null_cond` and what it should have been."""
    if jtu.tree_structure(null_cond) != jtu.tree_structure(cond):
        # A single array (or number) for a one-leaf `cond` is its own prefix.
        if not (jtu.treedef_is_leaf(jtu.tree_structure(null_cond))
                and len(jtu.tree_leaves(cond)) == 1):
            raise ValueError(
                "`aj.cfg(model, guidance_scale, null_cond)`: `null_cond` must have "
                f"the structure of `cond`, {jtu.tree_structure(cond)}; got "
                f"{jtu.tree_structure(null_cond)}."
            )
        null_cond = jtu.tree_unflatten(jtu.tree_structure(cond), [null_cond])

    def one(path, n, c):
        try:
            return jnp.broadcast_to(jnp.asarray(n).astype(c.dtype), jnp.shape(c))
        except ValueError:
            raise ValueError(
                f"`aj.cfg(model, guidance_scale, null_cond)`: `null_cond"
                f"{jtu.keystr(path)}` of shape {jnp.shape(n)} does not broadcast to "
                f"the shape {jnp.shape(c)} of `cond{jtu.keystr(path)}`."
            ) from None

    return jtu.tree_map_with_path(one, null_cond, cond)


def cfg(model: Callable, guidance_scale, null_cond: PyTree) -> "AbstractPredictor":
    """Classifier-free guidance (Ho & Salimans 2022) as a model of the same signature:
    `cfg(model, w, null_cond)(params, x, t, cond) = ε(z_null) + w (ε(z) − ε(z_null))`,
    with ε(z) = `model(params, x, t, cond)` and ε(z_null) = `model(params, x, t,
    null_cond)`.

    **Arguments:**

    - `model`: the ε-model (or any `aj.AbstractPredictor`, e.g. `aj.as_eps(...)`;
        then the data predictions are combined the same way).
    - `guidance_scale`: w (w = 1: the conditional model; w = 0: the unconditional
        one; 3–8 typical for text-to-image). It may be traced and is differentiable:
        `jax.grad` with respect to it works with every strategy.
    - `null_cond`: the unconditional conditioning (e.g. the empty prompt's
        embedding), broadcast to the shape of `cond`; differentiable too.

    **Returns:** an `aj.AbstractPredictor` (an `eqx.Module`). Both branches are
    evaluated in one batched call (`jax.vmap` over the pair (cond, null_cond), x and t
    shared), so a network pays one batched evaluation, not two.

    !!! Example

        ```python
        guided = aj.cfg(model, 4.0, null_embedding)
        x0 = aj.sample(guided, params, x_T, prompt_embedding, schedule=..., ts=...,
                       sampler=aj.DPMSolverPP())
        ```
    """
    if not callable(model):
        raise TypeError(f"`cfg(model, ...)` needs a callable model; got {model!r}.")
    if isinstance(guidance_scale, int | float) and not isinstance(guidance_scale, bool):
        guidance_scale = np.asarray(guidance_scale, np.float64)  # an array leaf
    if jnp.ndim(guidance_scale) != 0:
        raise ValueError(
            "`cfg(..., guidance_scale)` must be a scalar; got shape "
            f"{jnp.shape(guidance_scale)}."
        )
    return _CFG(model, guidance_scale, null_cond)


class ModelCall(eqx.Module):
    """Internal: the model's predictions (ε, x̂_0 or None) at (θ, x, t, z), with
    θ = (the arrays of the model callable, `params`). x̂_0 comes from the model itself
    when it is an `aj.AbstractPredictor` (such as `aj.as_eps(...)`), else it is None
    and the sampler's model wrapper derives it from ε.

    This is the one place where the model is called, so the dtype policy lives here:

    - the model sees `x` in the sampler state's dtype (x_T's) and `t` cast to it;
    - its outputs are cast, leaf by leaf, to the dtype of `x` (so a bfloat16 network
        under a float32 state, or a float64 one under float32 under x64, just works;
        `check_model_output` refuses non-floating outputs eagerly).

    Splitting the arrays out of the model callable means an Equinox module passed as
    `model` (or a wrapper such as `as_eps` holding a `VPDiscrete` schedule) is
    differentiated like `params`, never silently held constant. After
    `closure_convert`, the arrays also include every array the callable closes over
    (jit or vmap tracers included), so those are differentiated like `params` too.
    """

    static: Any

    def __call__(self, theta, x, t, z):
        arrays, params = theta
        model = eqx.combine(arrays, self.static)
        t = jnp.asarray(t).astype(first_dtype(x))
        eps, x0 = maybe_canonical_convs(model)(params, x, t, z)
        cast = lambda tree: jtu.tree_map(lambda o, xx: o.astype(xx.dtype), tree, x)
        return cast(eps), None if x0 is None else cast(x0)


class _Call(eqx.Module):
    """The user's model behind a uniform `(params, x, t, z) -> (ε, x̂_0 or None)`."""

    model: Callable

    def __call__(self, params, x, t, z):
        if isinstance(self.model, AbstractPredictor):
            return self.model.predict(params, x, t, z)
        return self.model(params, x, t, z), None


class StepModel:
    """The model as a sampler sees it during one step: θ, the step's conditioning and
    the schedule bound in.

    - `eps(x, t)`: ε;
    - `eps.x0(x, t)`: the data prediction x̂_0 (the model's own when it is an
        `aj.AbstractPredictor`, else (x − σ_t ε)/α_t);
    - `eps.predict(x, t)`: both, from one evaluation.

    A plain function `eps(x, t)` can stand in for it wherever a sampler only needs ε
    (tests and benchmarks call samplers that way).
    """

    def __init__(
        self, model: "ModelCall", schedule: AbstractSchedule, theta, z,
        may_be_first: bool = True,
    ):
        self._model, self._schedule, self._theta, self._z = model, schedule, theta, z
        # False when the caller knows this is not step 0 (so a start-up evaluation
        # needs no `lax.cond`).
        self.may_be_first = may_be_first

    def predict(self, x, t, derive: bool = True):
        """(ε, x̂_0); with `derive=False`, x̂_0 is None unless the model gives its
        own (a sampler that only needs x̂_0 at α = 0, where an ε-model is refused,
        then adds no operations for it)."""
        eps, x0 = self._model(self._theta, x, t, self._z)
        if x0 is None and derive:
            alpha, sigma = self._schedule.alpha(t), self._schedule.sigma(t)
            x0 = jtu.tree_map(
                lambda xx, e: (xx - sigma.astype(xx.dtype) * e) / alpha.astype(xx.dtype),
                x,
                eps,
            )
        return eps, x0

    def __call__(self, x, t):
        return self._model(self._theta, x, t, self._z)[0]

    def x0(self, x, t):
        return self.predict(x, t)[1]


def split_model(model: Callable) -> tuple[ModelCall, PyTree]:
    """`(ModelCall, its arrays)`: the arrays of `model` (an Equinox module's weights,
    a wrapper's schedule) travel with `params` in θ = (arrays, params)."""
    arrays, static = eqx.partition(_Call(model), eqx.is_array)
    return ModelCall(static), arrays


def closure_convert(
    model: ModelCall, theta, x, t, z
) -> tuple[ModelCall, tuple[PyTree, PyTree]]:
    """The model with every array it closes over hoisted into θ's first slot.

    A custom VJP must see every array its output depends on as an input: a model
    that closes over a traced value (`lambda p, x, t, c: net(W, x, t)` inside a
    `jit`, a `vmap` or a `grad` with respect to W) would otherwise crash
    (`No constant handler`) or refuse the gradient. Tracing the model once into a
    jaxpr (`adjoint_jax._closure`) makes those values explicit constants, which
    then travel in θ and get cotangents like `params`. `x`, `t` and `z` are example
    arguments (shapes and dtypes only; `t` in x's dtype).
    """
    arrays, params = theta
    fn = eqx.combine(arrays, model.static)
    t = jnp.asarray(t).astype(first_dtype(x))
    converted = _closure_convert(fn, params, x, t, z)
    new_arrays, new_static = eqx.partition(converted, eqx.is_array)
    return ModelCall(new_static), (new_arrays, params)


def check_model_output(model: Callable, model_call: ModelCall, theta, x, t, z):
    """Eagerly (shapes only) checks that the model returns ε with the structure and
    shapes of `x` and floating dtypes; raises errors that name `model`. Returns
    whether the model gives its own data prediction x̂_0, and the model's trace: the
    closed jaxpr of one evaluation with every array argument (θ's leaves, x, t and
    z's arrays) an input, so its constants are what the model reads besides its
    arguments (see `aj.sample`'s eager cache)."""
    arrays, params = theta
    raw = eqx.combine(arrays, model_call.static)
    dynamic, static = eqx.partition((raw, params, x, z), eqx.is_array)

    def evaluate(dynamic, t):
        fn, params, x, z = eqx.combine(dynamic, static)
        return fn(params, x, t, z)

    t = jax.ShapeDtypeStruct((), first_dtype(x))  # abstract: no transfer of t
    closed, (out, x0) = jax.make_jaxpr(evaluate, return_shape=True)(dynamic, t)
    x_struct = jax.eval_shape(lambda: x)
    shapes = lambda tree: jtu.tree_map(lambda a: a.shape, tree)
    if jtu.tree_structure(out) != jtu.tree_structure(x_struct) or any(
        not hasattr(o, "shape") or o.shape != xx.shape
        for o, xx in zip(jtu.tree_leaves(out), jtu.tree_leaves(x_struct))
    ):
        raise ValueError(
            f"`model` ({fn_name(model)}) must return ε with the structure and shapes "
            f"of x; given x of shapes {shapes(x_struct)} it returned "
            f"{jtu.tree_map(lambda a: getattr(a, 'shape', a), out)}."
        )
    for o, xx in zip(jtu.tree_leaves(out), jtu.tree_leaves(x_struct)):
        if not jnp.issubdtype(o.dtype, jnp.floating):
            raise TypeError(
                f"`model` ({fn_name(model)}) returned ε of dtype {o.dtype}; it must "
                f"return floating-point arrays (they are cast to the state's dtype, "
                f"here {xx.dtype})."
            )
    return x0 is not None, closed
