"""The continuous adjoint of the diffusion ODE/SDE solved by the AdjointDEIS
exponential integrators: the engine shared by `AdjointDEIS`, `RecordedAdjoint` and
`InterpolatedAdjoint`, which differ only in where the backward pass gets the states
x_t (re-solved backward, cached, or interpolated between cached checkpoints).

Notation: the forward grid is t_0 = T > t_1 > ... > t_N = t_end. The backward pass
walks a grid τ_0 = t_end < τ_1 < ... < τ_M = T, one step t → s with t = τ_j (nearer
the data) and s = τ_{j+1} (nearer the noise), h = λ_s − λ_t < 0.
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import lincomb, step_noise, tree_add, tree_zeros_like
from .._samplers._coeffs import step_coeffs
from ._base import AbstractAdjoint, Solve, materialise, reject_differentiated


class AbstractContinuousAdjoint(AbstractAdjoint):
    """Base of the strategies that solve the continuous adjoint equations with
    AdjointDEIS-k (k = `order`) instead of differentiating the sampler.

    Subclasses say what the forward pass keeps (`forward`) and how the backward pass
    obtains x at the backward grid points (`states`, or `None` to re-solve them).
    """

    order: eqx.AbstractVar[int]

    def __check_init__(self):
        if self.order not in (1, 2):
            raise ValueError(
                f"`{type(self).__name__}(order=...)` must be 1 or 2; got {self.order!r}."
            )

    @abc.abstractmethod
    def forward(self, solve: Solve, theta, x_T, cond) -> tuple[PyTree, PyTree]:
        """Runs the sampler; returns `(x_0, residuals)` with whatever the backward pass
        needs besides x_0 (nothing, the trajectory, or checkpoints)."""

    @abc.abstractmethod
    def backward_grid(self, solve: Solve) -> Array:
        """The increasing backward grid τ_0 = ts[-1] < ... < τ_M = ts[0]."""

    @abc.abstractmethod
    def states(self, solve: Solve, residuals: PyTree, x0: PyTree):
        """`None` to re-solve the states backward alongside the adjoint, or a
        function `j -> x(τ_j)` (j a traced int) giving the state at backward point j."""

    def loop(self, solve: Solve, theta, x_T, cond):
        # ts and the schedule travel in the differentiated argument (only there can
        # `perturbed` tell us they are being differentiated, which we refuse loudly).
        rest = Solve(solve.model, None, None, solve.sampler, solve.key, solve.scheduled)
        return _otd((theta, x_T, cond, solve.ts, solve.schedule), rest, self)


def _unpack(diff, rest: Solve):
    theta, x_T, cond, ts, schedule = diff
    solve = Solve(rest.model, schedule, ts, rest.sampler, rest.key, rest.scheduled)
    return solve, theta, x_T, cond


def _z_index(solve: Solve, taus: Array) -> Array:
    """For each backward step [τ_j, τ_{j+1}], the forward step i whose interval
    [t_{i+1}, t_i] contains it (by its midpoint in λ), so that a scheduled z_i is used
    where the forward used it. On the forward's own grid this is i = N − 1 − j."""
    lam = solve.schedule.lam
    mid = solve.schedule.t_of_lam(0.5 * (lam(taus[:-1]) + lam(taus[1:])))
    # ts is decreasing; count the forward grid points strictly above mid.
    i = jnp.sum(solve.ts[None, :] > mid[:, None], axis=1) - 1
    return jnp.clip(i, 0, solve.num_steps - 1).astype(jnp.int32)


@eqx.filter_custom_vjp
def _otd(diff, rest: Solve, adjoint: AbstractContinuousAdjoint):
    # Not differentiated: just the sampler, nothing kept for a backward pass.
    del adjoint
    solve, theta, x_T, cond = _unpack(diff, rest)
    state, _ = solve.forward(theta, x_T, cond)
    return solve.sampler.output(state)


@_otd.def_fwd
def _otd_fwd(perturbed, diff, rest, adjoint):
    reject_differentiated(perturbed[3:], "`ts` or the schedule", adjoint)
    solve, theta, x_T, cond = _unpack(diff, rest)
    x0, residuals = adjoint.forward(solve, theta, x_T, cond)
    return x0, (x0, residuals)


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
# States: re-solved with the same exponential integrator run backward,
#     x_s = (α_s/α_t) x_t − σ_s[(e^h − 1) ε_t + φ₂ (ε_t − ε_prev)/r]        (ODE),
#     x_s = (α_s/α_t) x_t − 2σ_s (e^h − 1) ε_t − σ_s √(1 − e^{2h}) ξ_i      (SDE),
# the latter the explicit inverse of the forward SDE step with its noise ξ_i replayed.
@_otd.def_bwd
def _otd_bwd(residuals, g_x0, perturbed, diff, rest: Solve, adjoint):
    solve, theta, x_T, cond = _unpack(diff, rest)
    x0, extra = residuals
    schedule, sampler = solve.schedule, solve.sampler
    factor = 2.0 if sampler.is_sde else 1.0
    order = adjoint.order
    taus = adjoint.backward_grid(solve)
    num_back = taus.shape[0] - 1
    z_idx = _z_index(solve, taus)
    # On the forward grid, backward step j undoes forward step N − 1 − j, whose noise
    # an SDE reconstruction replays (AdjointDEIS refuses num_steps ≠ N for SDEs).
    noise_idx = (solve.num_steps - 1 - jnp.arange(num_back)).astype(jnp.int32)
    state_fn = adjoint.states(solve, extra, x0)
    resolve = state_fn is None

    g_x0 = materialise(x0, g_x0)

    # Only floating-point leaves are differentiated (integer labels in `cond` or
    # integer buffers in `params` get no cotangent).
    theta_d, theta_s = eqx.partition(theta, eqx.is_inexact_array)
    cond_d, cond_s = eqx.partition(cond, eqx.is_inexact_array)

    def z_of(i):
        return solve.cond_at(cond_d, i)

    z0 = z_of(0)
    multistep = order == 2
    init = dict(
        x=x0 if resolve else None,
        a_x=g_x0,
        a_theta=tree_zeros_like(theta_d),
        a_z=None if solve.scheduled else tree_zeros_like(z0),
        # Multistep memory (order 2 only): V, W_θ, W_z, ε and λ at the previous
        # backward point. The first step is first order, so their initial values
        # only need to be finite.
        prev=dict(
            v=tree_zeros_like(x_T),
            w_theta=tree_zeros_like(theta_d),
            w_z=tree_zeros_like(z0),
            eps=tree_zeros_like(x_T),
            lam=schedule.lam(taus[0]) + 1.0,
        )
        if multistep
        else None,
    )

    def body(carry, xs):
        j, t, s, zi, ni = xs
        x = carry["x"] if resolve else state_fn(j)
        z_s = solve.cond_at(cond_s, zi)

        def eps_fn(xx, th, zz):
            return solve.eps(eqx.combine(th, theta_s), xx, t, eqx.combine(zz, z_s))

        eps, vjp = jax.vjp(eps_fn, x, theta_d, z_of(zi))
        gx, gth, gz = vjp(carry["a_x"])

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
            first = j == 0
            k2 = jnp.where(first, jnp.zeros_like(r), factor * e_lam_s * c.phi2 / r)
            ks = jnp.where(first, jnp.zeros_like(r), c.sigma_s * c.phi2 / r)
        else:
            k2 = ks = None

        def integral(w_now, w_prev):
            # k1 W_t + k2 (W_t − W_prev)
            if not multistep:
                return lincomb((k1, w_now))
            return lincomb((k1 + k2, w_now), (-k2, w_prev))

        a_x = tree_add(
            lincomb((c.alpha_t / c.alpha_s, carry["a_x"])),
            lincomb((1.0 / c.alpha_s, integral(v_t, prev and prev["v"]))),
        )
        a_theta = tree_add(carry["a_theta"], integral(w_th, prev and prev["w_theta"]))
        dz = integral(w_z, prev and prev["w_z"])
        new = dict(
            x=None,
            a_x=a_x,
            a_theta=a_theta,
            a_z=None if solve.scheduled else tree_add(carry["a_z"], dz),
            prev=dict(v=v_t, w_theta=w_th, w_z=w_z, eps=eps, lam=lam_t)
            if multistep
            else None,
        )
        if resolve and sampler.is_sde:
            noise = step_noise(solve.key, ni, x, t.dtype)
            new["x"] = lincomb(
                (c.alpha_ratio, x),
                (-2.0 * c.sigma_s * c.phi1, eps),
                (-c.sigma_s * jnp.sqrt(-jnp.expm1(2.0 * c.h)), noise),
            )
        elif resolve and multistep:
            new["x"] = lincomb(
                (c.alpha_ratio, x), (-c.sigma_s * c.phi1 - ks, eps), (ks, prev["eps"])
            )
        elif resolve:
            new["x"] = lincomb((c.alpha_ratio, x), (-c.sigma_s * c.phi1, eps))
        return new, (dz if solve.scheduled else None)

    xs = (jnp.arange(num_back, dtype=jnp.int32), taus[:-1], taus[1:], z_idx, noise_idx)
    final, dz_steps = jax.lax.scan(body, init, xs)

    if solve.scheduled:
        # Per-step gradients: sum the backward steps that fall in forward step i.
        g_cond = jtu.tree_map(
            lambda d: jax.ops.segment_sum(d, z_idx, num_segments=solve.num_steps),
            dz_steps,
        )
    else:
        g_cond = final["a_z"]
    # ts and the schedule are never differentiated here (`_otd_fwd` refuses it).
    no_grad = jtu.tree_map(
        jnp.zeros_like, eqx.filter(diff[3:], eqx.is_inexact_array)
    )
    return (final["a_theta"], final["a_x"], g_cond) + tuple(no_grad)
