"""Grids whose ends have infinite log-SNR, for the strategies that solve a continuous
adjoint (`AdjointDEIS`, `RecordedAdjoint`, `InterpolatedAdjoint`, `AdjointDPM`).

A grid may start at α = 0 (pure noise) and end at σ = 0 (the data). A continuous
adjoint in the exponential-integrator variables cannot cross either point (y = x/α
is undefined at α = 0; an ε-network is not defined at σ = 0), and the samplers take
both steps in closed form from a single model evaluation at the interior point. So
these strategies run their continuous adjoint on the *interior* grid and
differentiate the endpoint steps exactly:

- the last step to σ = 0 is the data prediction x_0 = α_0 x̂_0(x_{N−1}, t_{N−1}); its
  VJP at x_{N−1} (which the forward pass keeps) gives ∂L/∂x_{N−1} and the step's θ
  and z contributions;
- the first step from α = 0 is the sampler's own step from x_T (an input of the
  solve); its VJP gives ∂L/∂x_T and step 0's θ, z and noise contributions.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._misc import acc_zeros, index_tree, lincomb, tree_acc
from .._samplers._base import predict
from ._base import Differentiated, Solve


def _at(solve: Solve, i: int, cond, noise):
    """The scan input (t_i, t_{i+1}, i, z_i, noise_i) of step i as a single step."""
    ts = solve.ts
    z = solve.cond_at(cond, i) if solve.scheduled else None
    xi = None if noise is None else index_tree(noise, i)
    return ts[i], ts[i + 1], jnp.asarray(solve.first_index + i, jnp.int32), z, xi


def endpoint_forward(solve: Solve, theta, x_T, cond, noise, interior: Callable):
    """Runs the sampler with the endpoint steps taken one by one and the interior by
    `interior(sub_solve, theta, state, cond, noise) -> (state, extra)`; returns
    `(x_0, (x_b, extra))` with x_b the state at the interior grid's end."""
    a, b = solve.interior()
    n = solve.num_steps
    state = solve.sampler.init(x_T, solve.schedule, solve.ts)
    if a == 1:
        state = solve.step(theta, cond, state, _at(solve, 0, cond, noise))
    extra = None
    if b > a:
        cond_in, noise_in = solve.sub_inputs(cond, noise, a, b)
        state, extra = interior(solve.sub(a, b), theta, state, cond_in, noise_in)
    x_b = solve.sampler.output(state)
    if b < n:
        state = solve.step(theta, cond, state, _at(solve, n - 1, cond, noise))
    x0 = solve.sampler.output(state)
    return x0, (x_b, extra)


def _sub_diff(solve: Solve, diff: Differentiated, a: int, b: int) -> Differentiated:
    cut = lambda tree: jtu.tree_map(lambda v: v[a:b], tree)
    cond_cut = cut if solve.scheduled else (lambda tree: tree)
    return Differentiated(
        diff.theta,
        diff.theta_rest,
        cond_cut(diff.cond),
        cond_cut(diff.cond_rest),
        cut(diff.noise),
        cut(diff.noise_rest),
    )


def _noise_of(solve: Solve, diff: Differentiated, i: int, noise_d, like):
    """Step i's full noise with its differentiated part replaced by `noise_d`."""
    if diff.noise is None and diff.noise_rest is None:  # drawn from the key, or none
        return solve.noise_at(None, i, like)
    rest = None if diff.noise_rest is None else index_tree(diff.noise_rest, i)
    if noise_d is None:
        return rest
    return noise_d if rest is None else eqx.combine(noise_d, rest)


def endpoint_backward(
    solve: Solve, residuals, g_x0, diff: Differentiated, x_T, interior: Callable
):
    """The cotangents (θ, x_T, cond, noise) of a solve run by `endpoint_forward`:
    exact VJPs of the endpoint steps around `interior(sub_solve, (x_b, extra),
    g_x_b, sub_diff) -> (ct_theta, ct_x_a, ct_cond, ct_noise)`, the continuous
    adjoint of the interior grid."""
    x_b, extra = residuals
    a, b = solve.interior()
    n = solve.num_steps
    schedule, sampler, ts = solve.schedule, solve.sampler, solve.ts
    ct_theta = acc_zeros(diff.theta)
    step_cts = {}  # step index -> (dz, dnoise) of the endpoint steps

    if b < n:
        # The step to σ = 0 is the data prediction: x_0 = α_0 x̂_0(x_{N−1}, t_{N−1}).
        t, s = ts[n - 1], ts[n]
        z_rest = diff.cond_rest_at(solve, n - 1)

        def last(x, th, zz):
            eps = solve.eps_fn(diff.theta_with(th), diff.cond_with(zz, z_rest))
            return lincomb((schedule.alpha(s), predict(eps, schedule, x, t)[1]))

        _, vjp = jax.vjp(last, x_b, diff.theta, diff.cond_at(solve, n - 1))
        a_x, g_th, g_z = vjp(g_x0)
        ct_theta = tree_acc(ct_theta, g_th)
        noise_n = None if diff.noise is None else jtu.tree_map(
            jnp.zeros_like, index_tree(diff.noise, n - 1)
        )
        step_cts[n - 1] = (g_z, noise_n)
    else:
        a_x = g_x0

    ct_cond_in = ct_noise_in = None
    if b > a:
        g_th, a_x, ct_cond_in, ct_noise_in = interior(
            solve.sub(a, b), (x_b, extra), a_x, _sub_diff(solve, diff, a, b)
        )
        ct_theta = tree_acc(ct_theta, g_th)

    if a == 1:
        # The first step from α = 0: the sampler's own step from x_T.
        z_rest = diff.cond_rest_at(solve, 0)
        noise_d0 = None if diff.noise is None else index_tree(diff.noise, 0)

        def first(x, th, zz, nn):
            eps = solve.eps_fn(diff.theta_with(th), diff.cond_with(zz, z_rest))
            state0 = sampler.init(x, schedule, ts)
            noise0 = _noise_of(solve, diff, 0, nn, x)
            step = sampler.step(eps, schedule, state0, ts[0], ts[1], jnp.int32(0), noise0)
            return sampler.output(step)

        _, vjp = jax.vjp(first, x_T, diff.theta, diff.cond_at(solve, 0), noise_d0)
        ct_x_T, g_th, g_z, g_n = vjp(a_x)
        ct_theta = tree_acc(ct_theta, g_th)
        step_cts[0] = (g_z, g_n)
    else:
        ct_x_T = a_x

    ct_cond = _assemble(solve, diff.cond, ct_cond_in, step_cts, 0, a, b, n)
    ct_noise = _assemble(solve, diff.noise, ct_noise_in, step_cts, 1, a, b, n, True)
    return ct_theta, ct_x_T, ct_cond, ct_noise


def _assemble(solve, like, inner, step_cts, slot, a, b, n, stacked=None):
    """Per-step cotangents (scheduled conditioning, noise) concatenated in step order,
    or constant-conditioning cotangents summed, in the dtypes of `like`."""
    if like is None:
        return None
    stacked = solve.scheduled if stacked is None else stacked
    in_order = []
    if a == 1:
        in_order.append((step_cts[0][slot], True))
    if b > a:
        in_order.append((inner, False))
    if b < n:
        in_order.append((step_cts[n - 1][slot], True))
    if not stacked:
        total = acc_zeros(like)
        for part, _ in in_order:
            total = tree_acc(total, part)
        return total
    pieces = [
        jtu.tree_map(lambda v, w: (v[None] if single else v).astype(w.dtype), p, like)
        for p, single in in_order
    ]
    return jtu.tree_map(lambda *vs: jnp.concatenate(vs, axis=0), *pieces)
