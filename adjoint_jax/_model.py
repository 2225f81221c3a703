"""Model conventions: ε-prediction, conversion from other parameterisations, and
time-scheduled conditioning."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

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
                lambda xx, o: ((xx - alpha.astype(xx.dtype) * o) / sigma.astype(xx.dtype)),
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
        raise ValueError(f"`prediction` must be one of {_PREDICTIONS}; got {prediction!r}.")
    if not isinstance(schedule, AbstractSchedule):
        raise TypeError(
            f"`as_eps(..., schedule)` needs an `aj` schedule; got {type(schedule).__name__}."
        )
    if not callable(model):
        raise TypeError("`as_eps(model, ...)` needs a callable model.")
    return _AsEps(model, schedule, prediction)


class ModelCall(eqx.Module):
    """Internal: ε(θ, x, t, z) with θ = (arrays of the model object, params).

    Splitting the arrays out of `model` means an Equinox module passed as `model` (or
    a wrapper such as `as_eps` holding a VPDiscrete schedule) is differentiated like
    `params`, never silently held constant.
    """

    static: Any

    def __call__(self, theta, x, t, z):
        model_arrays, params = theta
        model = eqx.combine(model_arrays, self.static)
        # The model sees t in the state's dtype, so float32 sampling stays float32.
        leaves = jtu.tree_leaves(x)
        t = jnp.asarray(t).astype(leaves[0].dtype)
        return model(params, x, t, z)
