"""Exact gradients of a reversible sampler in O(1) memory: the forward states are
recovered algebraically from the last one during the backward pass."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._misc import tree_add, tree_zeros_like
from .._samplers._base import AbstractReversibleSampler, AbstractSampler
from ._base import (
    AbstractAdjoint,
    Solve,
    join,
    materialise,
    reject_differentiated,
    split_diff,
)


class ReversibleAdjoint(AbstractAdjoint):
    """The exact gradient of a reversible sampler (`aj.ReversibleHeun`,
    `aj.AsyncLeapfrog`, `aj.McCallumFoster`) in O(1) memory in the number of steps.

    The forward pass keeps only the final sampler state. The backward pass walks the
    steps in reverse: it recovers the state before step i from the state after it
    with the sampler's algebraic inverse (`step_back`), then takes one vector-Jacobian
    product of step i to carry the cotangents of the state, θ and z back. Nothing of
    the forward pass is stored, so memory is that of one step whatever N is.

    **When to use it:** when `aj.DTO` runs out of memory and the gradient must be
    exact (the continuous adjoints `aj.AdjointDEIS`, `aj.AdjointDPM` give the gradient
    of the ODE, not of the sampler, with an O(h^k) mismatch).

    **Accuracy:** the gradient of the discrete reversible sampler; it equals
    `aj.DTO`'s to round-off amplified by the reconstruction (random MLP model, N = 12,
    float64: 1e-15 to 4e-13 relative over every sampler, constant and scheduled
    conditioning). The reconstruction is only as good as the sampler's inverse is
    stable: reversible Heun and asynchronous leapfrog recover x_T to ≤ 1e-14 at
    N ≤ 640 on sharp data, `McCallumFoster` loses a factor 1/coupling per step; see
    each sampler's docstring and `benchmarks/reversible_stability.py`.

    **Memory:** O(1) in N: one sampler state, its cotangent and one step's VJP
    residuals. Compiled temporary memory of the jitted gradient (MLP of width 256,
    batch 64, reversible Heun): 2,643,408 bytes at N = 16, 2,643,856 at N = 128
    (`aj.DTO()`: 216,801,312 at N = 128).

    **Cost:** per step, one `step_back` (the sampler's evaluations, e.g. one for
    reversible Heun) plus the VJP of one step (its evaluations, recomputed, and
    their VJPs); `aj.DTO`'s backward pass does only the VJPs, from stored
    activations.

    Gradients with respect to the time grid or the schedule are not available
    (differentiating them raises an error; use `aj.DTO`).

    ??? cite "References"

        ```bibtex
        @inproceedings{kidger2021efficient,
            title={Efficient and Accurate Gradients for Neural {SDE}s},
            author={Kidger, Patrick and Foster, James and Li, Xuechen and Lyons, Terry},
            booktitle={Advances in Neural Information Processing Systems},
            year={2021}
        }
        @article{mccallum2024efficient,
            title={Efficient, Accurate and Stable Gradients for Neural {ODE}s},
            author={McCallum, Sam and Foster, James},
            journal={arXiv preprint arXiv:2410.11648},
            year={2024}
        }
        ```
    """

    def check_sampler(self, sampler: AbstractSampler) -> None:
        if not isinstance(sampler, AbstractReversibleSampler):
            raise ValueError(
                f"`adjoint={self!r}` requires a reversible sampler (aj.ReversibleHeun, "
                "aj.AsyncLeapfrog, aj.McCallumFoster); got `sampler="
                f"{sampler!r}`. Wrap it as `aj.McCallumFoster({sampler!r})`, or use "
                "`adjoint=aj.DTO()`."
            )

    def loop(self, solve: Solve, theta, x_T, cond):
        solve_arrays, solve_static = eqx.partition(solve, eqx.is_inexact_array)
        return _reversible_loop((theta, x_T, cond, solve_arrays), solve_static, self)


ReversibleAdjoint.__init__.__doc__ = """**Arguments:** None."""


def _forward(vjp_arg, solve_static):
    theta, x_T, cond, solve_arrays = vjp_arg
    solve = eqx.combine(solve_arrays, solve_static)
    state, _ = solve.forward(theta, x_T, cond)  # a lax.scan keeping the last state only
    return solve, state


@eqx.filter_custom_vjp
def _reversible_loop(vjp_arg, solve_static, adjoint):
    del adjoint
    solve, state = _forward(vjp_arg, solve_static)
    return solve.sampler.output(state)


@_reversible_loop.def_fwd
def _reversible_loop_fwd(perturbed, vjp_arg, solve_static, adjoint):
    reject_differentiated(
        perturbed[3],
        "the time grid `ts`, the schedule or the sampler's fields",
        adjoint,
    )
    solve, state = _forward(vjp_arg, solve_static)
    return solve.sampler.output(state), state


# The backward rule. With S_i the sampler's step i, the forward pass is
#
#     s_0 = init(x_T),   s_{i+1} = S_i(s_i; θ, z_i),   x_0 = out(s_N),
#
# so by the chain rule, with ā_i = ∂L/∂s_i:
#
#     ā_N = (∂out/∂s_N)ᵀ ∂L/∂x_0,
#     ā_i = (∂S_i/∂s_i)ᵀ ā_{i+1},
#     ∂L/∂θ = Σ_i (∂S_i/∂θ)ᵀ ā_{i+1},   ∂L/∂z_i = (∂S_i/∂z_i)ᵀ ā_{i+1}
#         (summed over i for a constant z),
#     ∂L/∂x_T = (∂init/∂x_T)ᵀ ā_0.
#
# Each transposed Jacobian is evaluated at s_i, which the backward scan recovers as
# s_i = S_i⁻¹(s_{i+1}) (`step_back`) just before the single `jax.vjp` of S_i that
# gives all three products. So the scan carries (s_{i+1}, ā_{i+1}) and the running
# sums; no forward state is stored. The result is the gradient of the discrete
# sampler, the same as DTO's, up to the round-off of the reconstruction.
@_reversible_loop.def_bwd
def _reversible_loop_bwd(state_N, grad_obj, perturbed, vjp_arg, solve_static, adjoint):
    del adjoint
    theta, x_T, cond, solve_arrays = vjp_arg
    solve = eqx.combine(solve_arrays, solve_static)
    sampler, schedule, key = solve.sampler, solve.schedule, solve.key
    want_theta = any(jtu.tree_leaves(perturbed[0]))
    want_cond = any(jtu.tree_leaves(perturbed[2]))

    out, out_vjp = jax.vjp(sampler.output, state_N)
    (ct_state,) = out_vjp(materialise(out, grad_obj))

    theta_d, theta_rest = split_diff(theta, want_theta)
    cond_d, cond_rest = split_diff(cond, want_cond)

    def body(carry, xs):
        state_next, ct_next, ct_theta, ct_cond = carry
        t, s, i, z_i = xs
        z_d, z_rest = (
            (cond_d, cond_rest) if not solve.scheduled else split_diff(z_i, want_cond)
        )
        z_full = join(z_d, z_rest)
        z_back = z_full
        offset = sampler.step_back_cond_offset
        if solve.scheduled and offset:
            # E.g. reversible Heun reuses in step i the ε̂ that step i − 1 evaluated
            # (with z_{i−1}); undoing step i re-evaluates exactly that ε̂.
            z_back = solve.cond_at(cond, jnp.maximum(i - offset, 0))
        eps = lambda x, tt: solve.model(theta, x, tt, z_back)
        state = sampler.step_back(eps, schedule, state_next, t, s, i, key)

        def step(st, th_d, zz_d):
            th, zz = join(th_d, theta_rest), join(zz_d, z_rest)
            e = lambda x, tt: solve.model(th, x, tt, zz)
            return sampler.step(e, schedule, st, t, s, i, key)

        _, step_vjp = jax.vjp(step, state, theta_d, z_d)
        ct_state_i, ct_theta_i, ct_z_i = step_vjp(ct_next)
        ct_theta = None if ct_theta is None else tree_add(ct_theta, ct_theta_i)
        if solve.scheduled:
            return (state, ct_state_i, ct_theta, ct_cond), ct_z_i
        ct_cond = None if ct_cond is None else tree_add(ct_cond, ct_z_i)
        return (state, ct_state_i, ct_theta, ct_cond), None

    ct_cond0 = None if (solve.scheduled or cond_d is None) else tree_zeros_like(cond_d)
    ct_theta0 = None if theta_d is None else tree_zeros_like(theta_d)
    init = (state_N, ct_state, ct_theta0, ct_cond0)
    (_, ct_state0, ct_theta, ct_cond), ct_z = jax.lax.scan(
        body, init, solve.step_inputs(cond), reverse=True
    )
    if solve.scheduled:
        ct_cond = ct_z
    _, init_vjp = jax.vjp(lambda x: sampler.init(x, schedule, solve.ts), x_T)
    (ct_x_T,) = init_vjp(ct_state0)
    no_grad = lambda tree: jtu.tree_map(lambda _: None, tree)
    return (
        no_grad(eqx.filter(theta, eqx.is_inexact_array))
        if ct_theta is None
        else ct_theta,
        ct_x_T,
        no_grad(eqx.filter(cond, eqx.is_inexact_array)) if ct_cond is None else ct_cond,
        no_grad(solve_arrays),
    )
