"""Time grids for the samplers."""

import jax
import jax.numpy as jnp
from jaxtyping import Array

from ._misc import is_concrete
from ._schedule import AbstractSchedule


_SPACINGS = ("logsnr", "time", "quadratic")


def time_grid(
    schedule: AbstractSchedule,
    num_steps: int,
    *,
    t_start: float | None = None,
    t_end: float,
    spacing: str = "logsnr",
) -> Array:
    """A decreasing grid of `num_steps + 1` times from `t_start` (noise) to `t_end`
    (data), for `aj.sample(..., ts=...)`.

    **Arguments:**

    - `schedule`: the noise schedule (needed for log-SNR spacing and the defaults).
    - `num_steps`: the number of sampler steps N ≥ 1.
    - `t_start`: the first (noisiest) time; defaults to `schedule.t_max`. It may be
        `schedule.alpha_zero_time` (α = 0, e.g. t = 1 of `aj.FlowMatching()`), with
        `spacing="time"` or `"quadratic"` (the log-SNR is −∞ there).
    - `t_end`: the last time, in `[schedule.t_min, t_start)`, or exactly 0 (σ = 0, the
        data): then the first N − 1 steps are spaced from `t_start` to
        `schedule.t_min` and the last step goes from there to 0.
    - `spacing`: `"logsnr"` (uniform in λ, DPM-Solver's recommendation for
        exponential integrators), `"time"` (uniform in t) or `"quadratic"` (uniform in
        √t, DDIM's "quad" spacing: finer near the data).

    **Returns:** an array of shape `(num_steps + 1,)`, strictly decreasing, with
    `ts[0] == t_start` and `ts[-1] == t_end` exactly. It is computed at once, also
    when called inside `jax.jit`, unless the schedule's parameters are traced: a
    grid built inside a jitted loss is then a constant of the program, which
    `aj.sample` checks when tracing (not with a runtime check, whose host callback
    would keep the program out of JAX's persistent compilation cache).

    For the exact grid a diffusers scheduler would use, see `aj.diffusers_timesteps`.

    !!! Example

        ```python
        ts = aj.time_grid(aj.VPLinear(), 20, t_end=1e-3, spacing="logsnr")
        ```
    """
    if not isinstance(schedule, AbstractSchedule):
        raise TypeError(
            "`time_grid(schedule, ...)` needs an `aj` schedule such as "
            f"`aj.VPLinear()`; got {type(schedule).__name__}."
        )
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be a positive int; got {num_steps!r}.")
    if spacing not in _SPACINGS:
        raise ValueError(f"`spacing` must be one of {_SPACINGS}; got {spacing!r}.")
    if t_start is None:
        t_start = schedule.t_max
    t_start = float(t_start)
    t_end = float(t_end)
    alpha_zero = schedule.alpha_zero_time
    start_ok = schedule.t_min < t_start <= schedule.t_max or (
        alpha_zero is not None and t_start == alpha_zero
    )
    end_ok = t_end == 0.0 or schedule.t_min <= t_end < t_start
    if not (start_ok and end_ok):
        extra = "" if alpha_zero is None else f" (or t_start = {alpha_zero}, α = 0)"
        raise ValueError(
            "`time_grid` needs schedule.t_min <= t_end < t_start <= schedule.t_max "
            f"= [{schedule.t_min}, {schedule.t_max}]{extra}, or t_end = 0 (σ = 0); got "
            f"t_start={t_start}, t_end={t_end}."
        )
    if spacing == "logsnr" and alpha_zero is not None and t_start == alpha_zero:
        raise ValueError(
            f"`time_grid`: log-SNR spacing cannot start at t_start={t_start}, where "
            "α = 0 and the log-SNR is −∞; use `spacing='time'` (or 'quadratic'), or "
            "`aj.diffusers_timesteps` for a diffusers scheduler's grid."
        )
    if not is_concrete(schedule):  # (its parameters are being differentiated)
        return _spaced(schedule, num_steps, t_start, t_end, spacing)
    # A concrete grid even inside `jit` (the arithmetic runs now): `aj.sample` then
    # checks it eagerly and knows its endpoints statically (see the docstring).
    with jax.ensure_compile_time_eval():
        return _spaced(schedule, num_steps, t_start, t_end, spacing)


def _spaced(schedule, num_steps, t_start, t_end, spacing):
    if t_end == 0.0:
        if num_steps == 1:
            return jnp.asarray([t_start, 0.0], jnp.result_type(float))
        inner = _spaced(schedule, num_steps - 1, t_start, schedule.t_min, spacing)
        return jnp.concatenate([inner, jnp.zeros((1,), inner.dtype)])
    dtype = jnp.result_type(float)
    a = jnp.asarray(t_start, dtype)
    b = jnp.asarray(t_end, dtype)
    if spacing == "logsnr":
        lams = jnp.linspace(schedule.lam(a), schedule.lam(b), num_steps + 1)
        ts = schedule.t_of_lam(lams)
    elif spacing == "time":
        ts = jnp.linspace(a, b, num_steps + 1)
    else:
        ts = jnp.linspace(jnp.sqrt(a), jnp.sqrt(b), num_steps + 1) ** 2
    return ts.at[0].set(a).at[-1].set(b)
