"""Model conventions: ε-prediction, conversion from other parameterisations, and
time-scheduled conditioning."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

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


class _AsEps(eqx.Module):
    model: Callable
    schedule: AbstractSchedule
    prediction: str = eqx.field(static=True)

    def __call__(self, params, x, t, cond):
        out = self.model(params, x, t, cond)
        if self.prediction == "eps":
            return out
        sch = self.schedule
        alpha, sigma = sch.alpha(t), sch.sigma(t)
        if self.prediction == "x0":
            # x = α x0 + σ ε  ⇒  ε = (x − α x0)/σ.
            return jtu.tree_map(
                lambda xx, o: (
                    (xx - alpha.astype(xx.dtype) * o) / sigma.astype(xx.dtype)
                ),
                x,
                out,
            )
        if self.prediction == "v":
            # v = α ε − σ x0 and x = α x0 + σ ε  ⇒  ε = (α v + σ x)/(α² + σ²).
            def _v(xx, o):
                a, s = alpha.astype(xx.dtype), sigma.astype(xx.dtype)
                return (a * o + s * xx) / (a * a + s * s)

            return jtu.tree_map(_v, x, out)
        # flow: u = dx/dt = α' x0 + σ' ε  ⇒  ε = (α u − α' x)/(α σ' − α' σ).
        _, dalpha = jax.jvp(sch.alpha, (t,), (jnp.ones_like(t),))
        _, dsigma = jax.jvp(sch.sigma, (t,), (jnp.ones_like(t),))

        def _f(xx, o):
            a, s = alpha.astype(xx.dtype), sigma.astype(xx.dtype)
            da, ds = dalpha.astype(xx.dtype), dsigma.astype(xx.dtype)
            return (a * o - da * xx) / (a * ds - da * s)

        return jtu.tree_map(_f, x, out)


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

    **Returns:** a callable `eps_model(params, x, t, cond)` (an `eqx.Module`).
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


class ModelCall(eqx.Module):
    """Internal: ε(θ, x, t, z) with θ = (the arrays of the model callable, `params`).

    This is the one place where the model is called, so the dtype policy lives here:

    - the model sees `x` in the sampler state's dtype (x_T's) and `t` cast to it;
    - its output is cast, leaf by leaf, to the dtype of `x` (so a bfloat16 network
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
        out = model(params, x, t, z)
        return jtu.tree_map(lambda o, xx: o.astype(xx.dtype), out, x)


class _Call(eqx.Module):
    """The user's model behind a uniform `(params, x, t, z)` call."""

    model: Callable

    def __call__(self, params, x, t, z):
        return self.model(params, x, t, z)


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
    jaxpr (`eqx.filter_closure_convert`) makes those values explicit constants, which
    then travel in θ and get cotangents like `params`. `x`, `t` and `z` are example
    arguments (shapes and dtypes only; `t` in x's dtype).
    """
    arrays, params = theta
    fn = eqx.combine(arrays, model.static)
    t = jnp.asarray(t).astype(first_dtype(x))
    converted = eqx.filter_closure_convert(fn, params, x, t, z)
    new_arrays, new_static = eqx.partition(converted, eqx.is_array)
    return ModelCall(new_static), (new_arrays, params)


def check_model_output(model: Callable, model_call: ModelCall, theta, x, t, z) -> None:
    """Eagerly (shapes only) checks that the model returns ε with the structure and
    shapes of `x` and floating dtypes; raises errors that name `model`."""
    arrays, params = theta
    raw = eqx.combine(arrays, model_call.static)
    t = jnp.asarray(t).astype(first_dtype(x))
    out = eqx.filter_eval_shape(raw, params, x, t, z)
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
