"""Error-controlled time grids: a forward solve with an embedded error estimate and a
PID step-size controller, whose accepted times become a fixed-length `ts` for
`aj.sample` (padded with zero-length steps, which every sampler and strategy takes as
the identity)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._model import Scheduled, StepModel, split_model
from ._samplers._base import AbstractSampler
from ._schedule import AbstractSchedule


def _check(sampler, rtol, atol, max_steps, pid):
    if not isinstance(sampler, AbstractSampler) or not getattr(
        sampler, "has_error_estimate", False
    ):
        raise TypeError(
            "`adaptive_time_grid(sampler=...)` needs a sampler with an embedded error "
            "estimate: `aj.ExpRK(tableau)` with tableau 'heun', 'bosh3', 'dopri5' or "
            f"'tsit5'; got {sampler!r}."
        )
    for name, v in (("rtol", rtol), ("atol", atol)):
        if not isinstance(v, int | float) or isinstance(v, bool) or v < 0:
            raise ValueError(f"`adaptive_time_grid({name}=...)` must be a number >= 0; "
                             f"got {v!r}.")
    if rtol == 0 and atol == 0:
        raise ValueError("`adaptive_time_grid`: rtol and atol cannot both be 0.")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(
            "`adaptive_time_grid(max_steps=...)` must be an int >= 1; got "
            f"{max_steps!r}."
        )
    if len(pid) != 3 or not all(isinstance(c, int | float) for c in pid):
        raise ValueError(
            f"`adaptive_time_grid(pid=...)` must be three numbers (pcoeff, icoeff, "
            f"dcoeff); got {pid!r}."
        )


def _error_norm(err: PyTree, x: PyTree, x_new: PyTree, rtol, atol) -> Array:
    """RMS over every entry of the batch (all leaves) of err/(atol + rtol·max(|x|,
    |x_new|)): one norm, so one grid for the batch."""
    sq = jtu.tree_map(
        lambda e, a, b: jnp.sum(
            (e / (atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b)))) ** 2
        ),
        err, x, x_new,
    )
    size = sum(jnp.size(e) for e in jtu.tree_leaves(err))
    return jnp.sqrt(sum(jtu.tree_leaves(sq)) / size)


def adaptive_time_grid(
    model,
    params: PyTree,
    x_T: PyTree,
    cond: PyTree,
    *,
    schedule: AbstractSchedule,
    sampler: AbstractSampler,
    rtol: float,
    atol: float,
    max_steps: int,
    t_start: float | Array | None = None,
    t_end: float | Array,
    pid: tuple[float, float, float] = (0.0, 1.0, 0.0),
    safety: float = 0.9,
) -> tuple[Array, Array]:
    """An error-controlled time grid for `aj.sample`: a forward solve from `x_T` with
    `sampler`'s embedded error estimate and a PID step-size controller in log-SNR,
    whose accepted times are returned as a grid of static length `max_steps + 1`,
    padded with repeated final times.

    A step t → s (h = λ_s − λ_t in log-SNR) is accepted when the RMS, over every entry
    of the batch, of err/(atol + rtol·max(|x_t|, |x_s|)) is at most 1 (one grid for
    the whole batch). The next h is h·clip(safety·e_n^{−β₁/k} e_{n−1}^{−β₂/k}
    e_{n−2}^{−β₃/k}, 0.2, 10), with k = (the embedded method's order) + 1 and
    (β₁, β₂, β₃) = (p + i + d, −(p + 2d), d) from `pid = (p, i, d)` (diffrax's
    convention; the default (0, 1, 0) is the integral controller). A rejected step is
    retried shorter and takes no grid slot. The first h is 1/16 of the log-SNR span.

    **Cost of the padding.** The strategies with their own backward pass
    (`aj.ReversibleAdjoint`, `aj.AdjointDEIS`, `aj.RecordedAdjoint`,
    `aj.InterpolatedAdjoint`, `aj.AdjointDPM`) skip zero-length steps (a `lax.cond`):
    the padding costs nothing. `aj.DTO()` computes and discards them (a
    differentiated cond would slow every DTO gradient 1.5-2×), so with DTO the
    padding costs what real steps do: keep `max_steps` near the steps you expect.

    **Gradients.** Nothing here is differentiated: the grid is a constant of the
    solve (a `stop_gradient` on every input). `aj.sample(..., ts=grid)` with any
    strategy then differentiates the solution *on this grid*: `aj.DTO()` gives its
    exact gradient, which is not the derivative of the adaptive solver's output
    with respect to x_T (the controller's decisions are not differentiated).

    **Arguments:** `model`, `params`, `x_T`, `cond` as for `aj.sample` (`cond` held
    constant; an `aj.Scheduled` is refused: its values belong to the steps of a grid
    that does not exist yet); `schedule`; `sampler`, with an embedded error estimate
    (`aj.ExpRK` with tableau "heun", "bosh3", "dopri5" or "tsit5"); `rtol`, `atol`;
    `max_steps`, the grid's static length; `t_start` (default `schedule.t_max`) and
    `t_end` (> 0: a last step to σ = 0 can be appended to the grid by hand); `pid`
    and `safety`, the controller's coefficients.

    **Returns:** `(ts, num_steps)`: the grid (shape `(max_steps + 1,)`, decreasing,
    `ts[0] = t_start`, `ts[num_steps:] = t_end`) and the number of accepted steps
    (an int32 array). If `t_end` is not reached within `max_steps` accepted steps (or
    10·`max_steps` attempts), the grid carries an `eqx.error_if` error saying so.

    **Transformations.** Jit-compatible (a `lax.while_loop`); called outside `jit`
    it compiles once per model, sampler, `max_steps` and controller, whatever the
    values of x_T, the parameters or the tolerances.

    !!! Example

        ```python
        ts, n = aj.adaptive_time_grid(model, params, x_T, cond, schedule=schedule,
                                      sampler=aj.ExpRK("tsit5"), rtol=1e-5, atol=1e-5,
                                      max_steps=64, t_end=1e-3)
        x0 = aj.sample(model, params, x_T, cond, schedule=schedule, ts=ts,
                       sampler=aj.ExpRK("tsit5"), adjoint=aj.DTO())
        ```
    """
    _check(sampler, rtol, atol, max_steps, pid)
    if isinstance(cond, Scheduled):
        raise ValueError(
            "`adaptive_time_grid(cond=...)` must be constant over the solve; an "
            "`aj.Scheduled` has one value per step of a grid that does not exist yet."
        )
    t_start = schedule.t_max if t_start is None else t_start
    if isinstance(t_end, int | float) and not t_end > 0:
        raise ValueError(
            "`adaptive_time_grid(t_end=...)` must be > 0 (finite log-SNR); got "
            f"{t_end!r}."
            " For a last step to σ = 0, append 0 to the grid it returns."
        )
    call, arrays = split_model(model)
    settings = (int(max_steps), tuple(map(float, pid)), float(safety))
    # The tolerances travel as arrays: a sweep over them does not recompile.
    tols = (jnp.asarray(rtol, float), jnp.asarray(atol, float))
    return _grid(call, (arrays, params), x_T, cond, schedule, sampler,
                 jnp.asarray(t_start), jnp.asarray(t_end), tols, settings)


@eqx.filter_jit
def _grid(call, theta, x_T, cond, schedule, sampler, t_start, t_end, tols, settings):
    (rtol, atol), (max_steps, (kp, ki, kd), safety) = tols, settings
    theta, x_T, cond = jax.lax.stop_gradient((theta, x_T, cond))
    dtype = jnp.result_type(t_start, t_end, float)
    t_start, t_end = t_start.astype(dtype), t_end.astype(dtype)
    t_end = eqx.error_if(t_end, ~(t_end > 0) | ~(t_end < t_start),
                         "adaptive_time_grid needs 0 < t_end < t_start.")
    eps = StepModel(call, schedule, theta, cond)
    lam_start, lam_end = schedule.lam(t_start), schedule.lam(t_end)
    span = lam_end - lam_start
    k = sampler.embedded_order + 1
    b1, b2, b3 = (kp + ki + kd) / k, -(kp + 2 * kd) / k, kd / k
    one = jnp.ones((), dtype)

    def cond_fn(c):
        _, lam, _, _, n, tries, _ = c
        return (lam < lam_end) & (n < max_steps) & (tries < 10 * max_steps)

    def body(c):
        x, lam, h, grid, n, tries, (e1, e2) = c
        last = lam + h >= lam_end - 1e-12 * jnp.abs(span)
        lam_next = jnp.where(last, lam_end, lam + h)
        t = jnp.where(n == 0, t_start, grid[n])
        s = jnp.where(last, t_end, schedule.t_of_lam(lam_next))
        x_s, err = sampler.advance_with_error(eps, schedule, x, t, s)
        e0 = _error_norm(err, x, x_s, rtol, atol)
        ok = jnp.isfinite(e0) & (e0 <= 1.0)
        e_safe = jnp.where(jnp.isfinite(e0), jnp.maximum(e0, 1e-10), 1e10)
        factor = safety * e_safe ** (-b1) * e1 ** (-b2) * e2 ** (-b3)
        factor = jnp.clip(factor, 0.2, jnp.where(ok, 10.0, 1.0))
        x = jtu.tree_map(lambda a, b: jnp.where(ok, b, a), x, x_s)
        grid = jnp.where(ok, grid.at[n + 1].set(s), grid)
        lam = jnp.where(ok, lam_next, lam)
        errs = (jnp.where(ok, e_safe, e1), jnp.where(ok, e1, e2))
        return x, lam, h * factor, grid, n + ok.astype(jnp.int32), tries + 1, errs

    grid0 = jnp.full((max_steps + 1,), t_start, dtype)
    init = (x_T, lam_start, span / 16, grid0, jnp.int32(0), jnp.int32(0), (one, one))
    _, lam, _, grid, n, _, _ = jax.lax.while_loop(cond_fn, body, init)
    idx = jnp.arange(max_steps + 1, dtype=jnp.int32)
    grid = jnp.where(idx > n, t_end, grid)
    grid = eqx.error_if(
        grid, lam < lam_end,
        "adaptive_time_grid did not reach t_end within max_steps accepted steps (or "
        "10·max_steps attempts): raise max_steps or loosen rtol/atol.",
    )
    return grid, n
