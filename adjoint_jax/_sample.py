"""`aj.sample`: the one entry point."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, PyTree

from ._adjoints._base import AbstractAdjoint, Solve
from ._adjoints._dto import DTO
from ._misc import check_value, fn_name, index_tree
from ._model import ModelCall, Scheduled
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
        pytree-callable) is allowed; its arrays are differentiated like `params`.
    - `params`: the network's parameters (any pytree; differentiable).
    - `x_T`: the initial noise at `ts[0]` (any pytree of floating arrays;
        differentiable). Batch dimensions belong to the model (or use `jax.vmap`).
    - `cond`: the conditioning: `None`, any pytree held constant over the solve, or an
        `aj.Scheduled` with one value per step (differentiable).
    - `schedule`: the noise schedule, e.g. `aj.VPLinear()`.
    - `ts`: the strictly decreasing time grid, `len(ts) = N + 1 >= 2`, inside
        `[schedule.t_min, schedule.t_max]`; see `aj.time_grid`.
    - `sampler`: the forward discretisation, e.g. `aj.DPMSolver1()`.
    - `adjoint`: how the gradient is obtained, e.g. `aj.DTO()` (default, exact) or
        `aj.AdjointDEIS(order=1)` (continuous adjoint, O(1) memory).
    - `key`: a PRNG key; required by SDE samplers (step i uses
        `jax.random.fold_in(key, i)`), ignored otherwise.

    **Returns:** x_0, with the structure of `x_T`.

    Composes with `jax.jit`, `jax.vmap` and `jax.grad` in any nesting.

    !!! Example

        ```python
        x0 = aj.sample(model, params, x_T, cond, schedule=aj.VPLinear(),
                       ts=aj.time_grid(aj.VPLinear(), 20, t_end=1e-3),
                       sampler=aj.DPMSolver1(), adjoint=aj.AdjointDEIS())
        ```
    """
    # ---- static checks: types, shapes, combinations --------------------------------
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
            raise ValueError("`aj.Scheduled(values)` needs at least one array in values.")
        for leaf in leaves:
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != num_steps:
                raise ValueError(
                    "`cond=aj.Scheduled(values)` needs every leaf of `values` to have a "
                    f"leading axis of length len(ts) - 1 = {num_steps}; got a leaf of "
                    f"shape {jnp.shape(leaf)}."
                )

    if sampler.is_sde and key is None:
        raise ValueError(
            f"`sampler={sampler!r}` is stochastic and needs `key=jax.random.key(...)`."
        )
    if not sampler.is_sde:
        key = None

    model_arrays, model_static = eqx.partition(model, eqx.is_inexact_array)
    model_call = ModelCall(model_static)
    theta = (model_arrays, params)

    # The model's output must have the structure and shapes of x.
    cond0 = index_tree(cond_values, 0) if scheduled else cond_values
    out = jax.eval_shape(model_call, theta, x_T, ts[0], cond0)
    x_struct = jax.eval_shape(lambda: x_T)
    if jtu.tree_structure(out) != jtu.tree_structure(x_struct) or any(
        o.shape != x.shape for o, x in zip(jtu.tree_leaves(out), jtu.tree_leaves(x_struct))
    ):
        raise ValueError(
            f"`model` ({fn_name(model)}) must return ε with the structure and shapes "
            "of x; given x of shapes "
            f"{jtu.tree_map(lambda a: a.shape, x_struct)} it returned "
            f"{jtu.tree_map(lambda a: a.shape, out)}."
        )

    # ---- value checks: eager when concrete, `eqx.error_if` under tracing -----------
    ts = check_value(
        jnp.any(ts[1:] >= ts[:-1]), "`ts` must be strictly decreasing.", ts
    )
    ts = check_value(
        (ts[0] > schedule.t_max) | (ts[-1] < schedule.t_min),
        f"`ts` must lie in [schedule.t_min, schedule.t_max] = [{schedule.t_min}, "
        f"{schedule.t_max}].",
        ts,
    )

    solve = Solve(model_call, schedule, ts, sampler, key, scheduled)
    return _loop(adjoint, solve, theta, x_T, cond_values)


@eqx.filter_jit
def _loop(adjoint: AbstractAdjoint, solve: Solve, theta, x_T, cond):
    return adjoint.loop(solve, theta, x_T, cond)
