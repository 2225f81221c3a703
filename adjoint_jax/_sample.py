"""`aj.sample`: the one entry point."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree

from ._adjoints._base import AbstractAdjoint, AbstractCustomAdjoint, Solve
from ._adjoints._dto import DTO
from ._eager import Signature, eager_loop, open_model
from ._misc import (
    check_value,
    describe_class_error,
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
    - `ts`: the decreasing, finite time grid, `len(ts) = N + 1 >= 2`, inside
        `[schedule.t_min, schedule.t_max]`, except that it may end exactly at 0
        (σ = 0: the last step is the data prediction) and start exactly at
        `schedule.alpha_zero_time` (α = 0, e.g. t = 1 of `aj.FlowMatching()`; the
        model must then give its data prediction: wrap it with `aj.as_eps`). See
        `aj.time_grid` and `aj.diffusers_timesteps`. A repeated time
        (`ts[i] == ts[i + 1]`, as in the padded grids of `aj.adaptive_time_grid`) is
        a zero-length step: the exact identity for every sampler and strategy, in
        value and gradient (the custom strategies skip it by a `lax.cond`; `aj.DTO()`
        and a `vmap` over grids compute it and discard it). The first step must have nonzero length. What
        counts grid steps counts it too: the samplers whose coefficients depend on
        N (`lower_order_final`, `aj.EulerChurn`'s γ), step i's key-drawn noise
        `fold_in(key, i)`, `aj.Truncated(last=k)` and
        `aj.InterpolatedAdjoint(every=k)`. The strategies that solve a
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
    the same *or equivalent* and reads the same values: a plain function, `lambda` or
    `functools.partial` is keyed by its code and the non-array values it closes over,
    and the arrays it closes over are passed in, so a model built afresh on every
    call (a guidance wrapper created inside the loss, closing over the value being
    differentiated) does not recompile. An eager call is never stale: whatever else
    the model reads (a module-level array or number, an attribute of a bound
    method's object, a bound Flax module's variables) is checked on every call, and a
    change recompiles. So does a changed closed-over Python number (pass it as an
    array instead) and a new object of a class that is not a pytree (write such
    wrappers as `eqx.Module`s or `jax.tree_util.Partial`s, whose arrays are inputs).
    Compiled loops of callables that no longer exist are released. The cache's
    design is in `adjoint_jax/_eager.py`.

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
    _check_x_T(x_T)
    ts_given = ts
    ts, xp = _as_grid(ts)
    num_steps = ts.shape[0] - 1
    scheduled = isinstance(cond, Scheduled)
    cond_values = cond.values if scheduled else cond
    _check_cond(cond_values, scheduled, num_steps)
    key, noise = _check_randomness(sampler, key, noise, x_T, num_steps)

    # Eagerly, the model is opened into a pytree (its closed-over arrays become
    # inputs) and its trace is the eager cache's signature (see `_eager.py`).
    staged = is_staged(
        (params, x_T, cond_values, noise, split_model(model)[1], ts, schedule)
    )
    model_call, model_arrays = split_model(model if staged else open_model(model))
    theta = (model_arrays, params)
    cond0 = index_tree(cond_values, 0) if scheduled else cond_values
    has_x0, trace = check_model_output(model, model_call, theta, x_T, ts[0], cond0)

    # ---- value checks: eager when concrete, `eqx.error_if` under tracing -----------
    ts, static_ends, ends_zero, starts_zero = _check_grid_values(
        ts, xp, schedule, sampler, adjoint, has_x0
    )

    # ---- forward mode: the strategies that have none say so in their own words -----
    reverse_only = adjoint.forward_mode_error()
    inputs = (params, x_T, cond_values, noise, model_arrays, ts, schedule)
    if reverse_only is not None and is_forward_mode(inputs):
        raise TypeError(reverse_only)

    solve = Solve(
        model_call,
        schedule,
        _on_device(ts, ts_given),
        sampler,
        key,
        scheduled,
        starts_at_alpha_zero=bool(starts_zero) if static_ends else False,
        ends_at_sigma_zero=bool(ends_zero) if static_ends else False,
        zero_steps=not is_concrete(ts) or bool(np.any(np.diff(np.asarray(ts)) == 0)),
    )
    try:
        if staged:
            # Inside the user's own `jit`: it is what compiles; adding one of ours
            # would only add a cache entry per traced model callable.
            return adjoint.loop(solve, theta, x_T, cond_values, noise)
        return eager_loop(
            adjoint, solve, theta, x_T, cond_values, noise, Signature(trace)
        )
    except TypeError as e:
        # Forward mode through a model that closes over the JVP-traced value: JAX's
        # own error ("can't apply forward-mode autodiff (jvp) to a custom_vjp
        # function") comes from inside; say what it means here.
        if reverse_only is not None and "forward-mode" in str(e):
            raise TypeError(reverse_only) from e
        raise


def _check_x_T(x_T) -> None:
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


def _as_grid(ts):
    """`ts` as a 1-D floating array, and the array module to check it with.

    A concrete grid (also one closed over inside the user's `jit`) is checked, and its
    endpoints read, with NumPy: eagerly, and statically for the strategies. Only a
    traced `ts` gets runtime checks. (`jnp` operations inside a `jit` are traced even
    on constants, so NumPy.)"""
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
    return ts, xp


def _on_device(ts, ts_given):
    """The checked grid as a device array: `ts_given` itself when it already was one
    of the same dtype (an eager call then transfers no grid to the device)."""
    if (
        isinstance(ts_given, jax.Array)
        and is_concrete(ts_given)
        and ts_given.dtype == ts.dtype
        and ts_given.ndim == 1
    ):
        return ts_given
    return jnp.asarray(ts)


_NUMBERS = (bool, int, float, complex)


def _check_cond(cond_values, scheduled: bool, num_steps: int) -> None:
    """Every leaf of the conditioning is an array or a Python number (a number is a
    constant, or traced where JAX traces it); a scheduled one has N values."""
    for path, leaf in jtu.tree_leaves_with_path(cond_values):
        if not (isinstance(leaf, _NUMBERS) or hasattr(leaf, "dtype")):
            raise TypeError(
                "`cond` must be a pytree of arrays and Python numbers; got a "
                f"{type(leaf).__name__} at cond{jtu.keystr(path)} ({leaf!r:.60}). "
                "Keep non-numeric settings out of `cond`: close over them in the "
                "model instead."
            )
    if not scheduled:
        return
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


def _check_randomness(sampler, key, noise, x_T, num_steps: int):
    """(key, noise) as the solve uses them: one of them for a stochastic sampler,
    neither for a deterministic one."""
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
    return key, noise


def _check_grid_values(ts, xp, schedule, sampler, adjoint, has_x0: bool):
    """`ts` with its value checks (raised now when concrete, attached with
    `eqx.error_if` when traced), whether its endpoints are known statically, and
    whether it ends at σ = 0 / starts at α = 0."""
    ts = check_value(
        ~xp.all(xp.isfinite(ts)),
        "`ts` contains NaN or inf; it must be a finite, strictly decreasing grid "
        "(see `aj.time_grid`).",
        ts,
    )
    ts = check_value(
        xp.any(ts[1:] > ts[:-1]),
        "`ts` must be decreasing (a repeated time is a zero-length step, the "
        "identity; see `aj.adaptive_time_grid`).",
        ts,
    )
    ts = check_value(
        ts[1] == ts[0],
        "`ts` must start with a step of nonzero length (`ts[1] < ts[0]`); repeated "
        "times (zero-length steps) may follow it.",
        ts,
    )
    alpha_zero = schedule.alpha_zero_time
    inside = (ts >= schedule.t_min) & (ts <= schedule.t_max)
    # A grid ending at 0 may repeat it (zero-length steps at the end).
    inside = inside | ((ts == 0) & (ts[-1] == 0))
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
    if isinstance(adjoint, AbstractCustomAdjoint) and len(ts) > 2:
        # Their exact endpoint steps are the first and the last step of the grid.
        ts = check_value(
            ends_zero & (ts[-2] == 0),
            f"`adjoint={adjoint!r}` takes the step to σ = 0 (t = 0) as the grid's "
            "last step, which must then have nonzero length: repeat the last time "
            "before 0 instead (zero-length steps before the last), or use "
            "`adjoint=aj.DTO()`.",
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
    return ts, static_ends, ends_zero, starts_zero


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
