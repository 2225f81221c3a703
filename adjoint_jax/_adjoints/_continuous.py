"""The continuous adjoint of the diffusion ODE/SDE solved by the AdjointDEIS
exponential integrators: the backward pass shared by `AdjointDEIS`,
`RecordedAdjoint` and `InterpolatedAdjoint`, which differ only in where it gets the
states x_t (re-solved backward, cached, or interpolated between cached checkpoints).

Notation: the forward grid is t_0 = T > t_1 > ... > t_N = t_end. The backward pass
walks a grid τ_0 = t_end < τ_1 < ... < τ_M = T, one step t → s with t = τ_j (nearer
the data) and s = τ_{j+1} (nearer the noise), h = λ_s − λ_t < 0.
"""

import abc
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree

from .._misc import (
    acc_zeros,
    accumulator_dtype,
    index_tree,
    lincomb,
    tree_acc,
    tree_add,
    tree_zeros_like,
)
from .._samplers._base import AbstractSDESampler
from .._samplers._coeffs import step_coeffs
from .._samplers._dpm_solver import multistep_update
from ._base import (
    FORWARD_MODE_HINT,
    AbstractCustomAdjoint,
    Differentiated,
    Solve,
    skip_body_if_zero,
    zero_length_steps,
)
from ._endpoints import endpoint_backward, endpoint_forward


class AbstractContinuousAdjoint(AbstractCustomAdjoint):
    """Base of the strategies that solve the continuous adjoint equations with
    AdjointDEIS-k (k = `order`) instead of differentiating the sampler.

    Subclasses say what the forward pass keeps (`forward_interior`) and how the
    backward pass obtains x at the backward grid points (`states`, or `None` to
    re-solve them). On a grid that starts at α = 0 or ends at σ = 0 the continuous
    adjoint runs on the interior grid and the endpoint steps are differentiated
    exactly (see `_endpoints.py`).
    """

    order: eqx.AbstractVar[int]

    def __check_init__(self):
        if self.order not in (1, 2):
            raise ValueError(
                f"`{type(self).__name__}(order=...)` must be 1 or 2; got "
                f"{self.order!r}."
            )

    @abc.abstractmethod
    def forward_interior(
        self, solve: Solve, theta, state0, cond, noise
    ) -> tuple[PyTree, PyTree]:
        """Runs the sampler on `solve` (a grid without endpoint steps) from the
        sampler state `state0`; returns the final state and whatever the backward
        pass needs besides the final x (nothing, the trajectory, or checkpoints)."""

    @abc.abstractmethod
    def backward_grid(self, solve: Solve) -> Array:
        """The increasing backward grid τ_0 = ts[-1] < ... < τ_M = ts[0]."""

    @abc.abstractmethod
    def states(self, solve: Solve, extra: PyTree, x_end: PyTree):
        """`None` to re-solve the states backward alongside the adjoint, or a
        function `j -> x(τ_j)` (j a traced int) giving the state at backward point j."""

    def forward_mode_error(self) -> str:
        return (
            f"`adjoint={self!r}` obtains the gradient by solving the continuous "
            "adjoint equation backward in time, a custom reverse-mode rule: x_0 has "
            "no forward-mode (jvp) rule; forward mode over its gradient (jax.jvp of "
            "jax.grad, jax.hessian) does work." + FORWARD_MODE_HINT
        )

    def forward(self, solve, theta, x_T, cond, noise):
        return endpoint_forward(solve, theta, x_T, cond, noise, self.forward_interior)

    def backward(self, solve, residuals, ct_x0, diff, x_T):
        solve, residuals, diff = as_jax_arrays((solve, residuals, diff))
        interior = functools.partial(_continuous_backward, self)
        return endpoint_backward(solve, residuals, ct_x0, diff, x_T, interior)


def as_jax_arrays(tree: PyTree) -> PyTree:
    """`tree` with its NumPy arrays made JAX arrays.

    The backward pass may get the solve's constants (the time grid, a schedule's or a
    closed-over model's arrays) back as NumPy arrays: when `jax.export` exports the
    VJP of a function (`Exported.vjp()`, `serialize(vjp_order=1)`), the arrays that
    were closed over are literals. Indexing a NumPy array with a traced index (the
    interpolated trajectory's `ts[i]`) raises `TracerArrayConversionError`; a JAX
    array is indexed like the traced solve's."""
    return jtu.tree_map(
        lambda v: jnp.asarray(v) if isinstance(v, np.ndarray) else v, tree
    )


def _z_index(solve: Solve, taus: Array) -> Array:
    """For each backward step [τ_j, τ_{j+1}], the forward step i whose interval
    [t_{i+1}, t_i] contains it (by its midpoint in λ), so that a scheduled z_i is used
    where the forward used it. On the forward's own grid this is i = N − 1 − j."""
    lam = solve.schedule.lam
    mid = solve.schedule.t_of_lam(0.5 * (lam(taus[:-1]) + lam(taus[1:])))
    # ts is decreasing; count the forward grid points strictly above mid.
    i = jnp.sum(solve.ts[None, :] > mid[:, None], axis=1) - 1
    return jnp.clip(i, 0, solve.num_steps - 1).astype(jnp.int32)


def _up(tree: PyTree) -> PyTree:
    """Cotangents of low-precision parameters in their accumulation dtype."""
    return jtu.tree_map(lambda v: v.astype(accumulator_dtype(v.dtype)), tree)


# The backward rule. With f(x, z, t) = f(t) x + (g²(t)/2σ_t) ε_θ(x, z, t) the
# probability-flow vector field, the adjoint a_x = ∂L/∂x_t solves
#     da_x/dt = −a_xᵀ ∂f/∂x = −f(t) a_x + σ_t λ'(t) a_xᵀ ∂ε/∂x,
# (using g²/2σ = −σ λ'), and da_θ/dt = σ_t λ'(t) a_xᵀ ∂ε/∂θ, a_θ(t_end) = 0, likewise
# for z. Since α' = f α, d(α a_x)/dλ = α σ a_xᵀ∂ε/∂x = α² e^{−λ} a_xᵀ∂ε/∂x, so for a
# step t → s (Proposition 1):
#     a_x(s) = (α_t/α_s) a_x(t) + (1/α_s) ∫_{λ_t}^{λ_s} e^{−λ} V(λ) dλ,  V = α² a_xᵀ∂ε/∂x,
#     a_θ(s) = a_θ(t) + ∫_{λ_t}^{λ_s} e^{−λ} W(λ) dλ,                 W = α a_xᵀ∂ε/∂θ.
# AdjointDEIS-k expands V, W to order k−1 in λ about λ_t and integrates exactly:
#     ∫ e^{−λ} dλ = e^{−λ_s}(e^h − 1),  ∫ (λ − λ_t) e^{−λ} dλ = e^{−λ_s} h φ₂,
# with e^{−λ_s} = σ_s/α_s and, for order 2, h V' ≈ (V_t − V_prev)/r,
# r = (λ_t − λ_prev)/h, from the previous backward point (multistep). One `jax.vjp`
# of ε at (x_t, z, t) with cotangent a_x(t) gives ε (for the state) and
# a_xᵀ∂ε/∂x, a_xᵀ∂ε/∂θ, a_xᵀ∂ε/∂z at once.
# For the diffusion SDE the drift carries g²/σ instead of g²/2σ: by Theorem 2 the
# adjoint is the same ODE with the ε-terms doubled (`factor = 2`).
# States: re-solved with the same exponential integrator run backward (DPM-Solver-k,
# `multistep_update`), or, for an SDE sampler, with its own inverse step and the
# noise replayed (`AbstractSDESampler.invert_step`).
def _continuous_backward(
    adjoint: AbstractContinuousAdjoint,
    solve: Solve,
    residuals,
    g_x0,
    diff: Differentiated,
):
    x0, extra = residuals
    schedule, sampler = solve.schedule, solve.sampler
    factor = sampler.adjoint_factor if sampler.is_sde else 1.0
    multistep = adjoint.order == 2
    taus = adjoint.backward_grid(solve)
    num_back = taus.shape[0] - 1
    z_idx = _z_index(solve, taus)
    # On the forward grid, backward step j undoes forward step N − 1 − j, whose noise
    # an SDE reconstruction replays (AdjointDEIS refuses num_steps ≠ N for SDEs).
    noise_idx = (solve.num_steps - 1 - jnp.arange(num_back)).astype(jnp.int32)
    state_fn = adjoint.states(solve, extra, x0)
    resolve = state_fn is None
    noise_full = diff.noise_full()
    # Only the differentiated leaves of θ and z get a VJP (and an accumulator, in at
    # least float32 whatever the parameters' dtype).
    theta_d = diff.theta
    z0 = diff.cond_at(solve, 0)
    init = dict(
        x=x0 if resolve else None,
        a_x=g_x0,
        a_theta=acc_zeros(theta_d),
        a_z=None if solve.scheduled else acc_zeros(z0),
        # Multistep memory (order 2 only): V, W_θ, W_z, ε and λ at the previous
        # backward point. The first step is first order, so their initial values
        # only need to be finite.
        prev=dict(
            v=tree_zeros_like(x0),
            w_theta=acc_zeros(theta_d),
            w_z=acc_zeros(z0),
            eps=tree_zeros_like(x0),
            lam=schedule.lam(taus[0]) + 1.0,
        )
        if multistep
        else None,
    )

    t_back, s_back, zero_back = zero_length_steps(taus)
    first_step = jnp.argmax(~zero_back).astype(jnp.int32)

    def step(carry, xs):
        j, t, s, zi, ni = xs
        x = carry["x"] if resolve else state_fn(j)
        z_rest = diff.cond_rest_at(solve, zi)
        # ∂L/∂ξ of the forward step undone here (from s to t): its noise scale times
        # the adjoint at its end, x_t.
        d_noise = None
        if diff.noise is not None:
            scale = sampler.noise_scale(schedule, s, t)
            d_noise = jtu.tree_map(
                lambda a, d: (scale * a).astype(d.dtype),
                carry["a_x"],
                index_tree(diff.noise, ni),
            )

        def eps_fn(xx, th, zz):
            return solve.eps(diff.theta_with(th), xx, t, diff.cond_with(zz, z_rest))

        eps, vjp = jax.vjp(eps_fn, x, theta_d, diff.cond_at(solve, zi))
        gx, gth, gz = vjp(carry["a_x"])
        gth, gz = _up(gth), _up(gz)

        c = step_coeffs(schedule, t, s)
        lam_t = c.lam_t
        e_lam_s = c.sigma_s / c.alpha_s  # e^{−λ_s}
        # Weights of V_t = α_t² a_xᵀ∂ε/∂x and W_t = α_t a_xᵀ∂ε/∂(θ, z):
        #   first order k1 = e^{−λ_s}(e^h − 1), multistep k2 = e^{−λ_s} φ₂ / r.
        k1 = factor * e_lam_s * c.phi1
        v_t = lincomb((c.alpha_t * c.alpha_t, gx))
        w_th = lincomb((c.alpha_t, gth))
        w_z = lincomb((c.alpha_t, gz))
        prev = carry["prev"]
        if multistep:
            r = (lam_t - prev["lam"]) / c.h
            first = j == first_step  # the first backward step of nonzero length
            k2 = jnp.where(first, jnp.zeros_like(r), factor * e_lam_s * c.phi2 / r)

        def integral(w_now, w_prev):
            # k1 W_t + k2 (W_t − W_prev)
            if not multistep:
                return lincomb((k1, w_now))
            return lincomb((k1 + k2, w_now), (-k2, w_prev))

        a_x = tree_add(
            lincomb((c.alpha_t / c.alpha_s, carry["a_x"])),
            lincomb((1.0 / c.alpha_s, integral(v_t, prev and prev["v"]))),
        )
        dz = integral(w_z, prev and prev["w_z"])
        w_theta_prev = prev and prev["w_theta"]
        new = dict(
            x=None,
            a_x=a_x,
            a_theta=tree_acc(carry["a_theta"], integral(w_th, w_theta_prev)),
            a_z=None if solve.scheduled else tree_acc(carry["a_z"], dz),
            prev=dict(v=v_t, w_theta=w_th, w_z=w_z, eps=eps, lam=lam_t)
            if multistep
            else None,
        )
        if resolve and isinstance(sampler, AbstractSDESampler) and sampler.is_sde:
            # The SDE's own inverse step, with the forward step's noise replayed.
            noise = solve.noise_at(noise_full, ni, x)
            new["x"] = sampler.invert_step(schedule, x, eps, t, s, noise)
        elif resolve and multistep:
            # DPM-Solver-2 run backward, the memory being the previous point's ε.
            new["x"] = multistep_update(schedule, x, eps, prev["eps"], t, s, r, first)
        elif resolve:
            new["x"] = multistep_update(schedule, x, eps, None, t, s, None, True)
        return new, (dz if solve.scheduled else None, d_noise)

    def body(carry, xs):
        # A zero-length step (a padded grid) is the identity: see `zero_length_steps`.
        *step_xs, zero = xs
        if not solve.zero_steps:
            return step(carry, tuple(step_xs))
        return skip_body_if_zero(zero, step, carry, tuple(step_xs))

    xs = (jnp.arange(num_back, dtype=jnp.int32), t_back, s_back, z_idx, noise_idx,
          zero_back)
    final, (dz_steps, d_noise) = jax.lax.scan(body, init, xs)

    if solve.scheduled:
        # Per-step gradients: sum the backward steps that fall in forward step i.
        g_cond = jtu.tree_map(
            lambda d: jax.ops.segment_sum(d, z_idx, num_segments=solve.num_steps),
            dz_steps,
        )
    else:
        g_cond = final["a_z"]
    # Backward step j produced forward step N − 1 − j's noise cotangent.
    g_noise = None if d_noise is None else jtu.tree_map(lambda d: d[::-1], d_noise)
    return final["a_theta"], final["a_x"], g_cond, g_noise
