"""Time grids for the samplers."""

import jax.numpy as jnp
from jaxtyping import Array

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
    - `t_start`: the first (noisiest) time; defaults to `schedule.t_max`.
    - `t_end`: the last time, in `[schedule.t_min, t_start)`.
    - `spacing`: `"logsnr"` (uniform in λ, DPM-Solver's recommendation for
        exponential integrators), `"time"` (uniform in t) or `"quadratic"` (uniform in
        √t, DDIM's "quad" spacing: finer near the data).

    **Returns:** an array of shape `(num_steps + 1,)`, strictly decreasing, with
    `ts[0] == t_start` and `ts[-1] == t_end` exactly.

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
    if not (schedule.t_min <= t_end < t_start <= schedule.t_max):
        raise ValueError(
            "`time_grid` needs schedule.t_min <= t_end < t_start <= schedule.t_max "
            f"= [{schedule.t_min}, {schedule.t_max}]; got t_start={t_start}, "
            f"t_end={t_end}."
        )
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
