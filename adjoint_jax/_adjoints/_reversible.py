"""Exact gradients of a reversible sampler in O(1) memory: the forward states are
recovered algebraically from the last one during the backward pass."""

import warnings

import jax
import jax.numpy as jnp

from .._misc import acc_zeros, first_dtype, tree_acc
from .._samplers._base import (
    AbstractMultistepSampler,
    AbstractReversibleSampler,
    AbstractSampler,
)
from ._base import FORWARD_MODE_HINT, AbstractCustomAdjoint, Differentiated, Solve


class ReversibleAdjoint(AbstractCustomAdjoint):
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

    **Precision.** In float32 (random MLP, N = 24, `tests/test_robustness.py`) it is
    within 1e-6–6e-6 of `aj.DTO` for asynchronous leapfrog and
    `McCallumFoster(DPMSolver1())`, within 5e-6–6e-5 for
    `McCallumFoster(DPMSolver2())` (its reversible ε memory amplifies round-off; see
    its docstring) and 5e-5–2e-3 for reversible Heun, whose discrete gradient is
    itself ill-conditioned there. A float16 or bfloat16 *state* is unsafe (errors of
    1–100%: the states are rebuilt in that precision) and warns at trace time; a
    16-bit *model* under a float32 state is fine, with errors at the model's own
    round-off (about 1e-2 for bfloat16).

    **Memory:** O(1) in N: one sampler state, its cotangent and one step's VJP
    residuals. Compiled temporary memory of the jitted gradient (MLP of width 256,
    batch 64, reversible Heun): 2,643,408 bytes at N = 16, 2,643,856 at N = 128
    (`aj.DTO()`: 216,801,312 at N = 128).

    **Cost:** per step, one `step_back` (the sampler's evaluations, e.g. one for
    reversible Heun) plus the VJP of one step (its evaluations, recomputed, and
    their VJPs); `aj.DTO`'s backward pass does only the VJPs, from stored
    activations.

    Gradients with respect to the time grid or the schedule are not available
    (differentiating them raises an error; use `aj.DTO`). Second-order derivatives
    (jvp-of-grad, grad-of-grad) work and are exact; first-order forward mode
    (`jax.jvp`, `jax.jacfwd`) is not available.

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
        if isinstance(sampler, AbstractReversibleSampler):
            return
        if isinstance(sampler, AbstractMultistepSampler) and not sampler.is_sde:
            fix = (
                f"Wrap it as `aj.McCallumFoster({sampler!r})`, or use "
                "`adjoint=aj.DTO()`."
            )
        else:
            fix = (
                "A stochastic sampler has no algebraic inverse; use `adjoint=aj.DTO()` "
                "(exact; `aj.DTO(checkpoints=k)` for O(k) memory) or "
                "`aj.RecordedAdjoint()`."
            )
        raise ValueError(
            f"`adjoint={self!r}` requires a reversible sampler (aj.ReversibleHeun, "
            f"aj.AsyncLeapfrog, aj.McCallumFoster); got `sampler={sampler!r}`. {fix}"
        )

    def forward_mode_error(self) -> str:
        return (
            f"`adjoint={self!r}` computes the gradient by walking the reversible "
            "sampler backward (reverse mode only): it has no forward-mode (jvp) rule."
            + FORWARD_MODE_HINT
        )

    def forward(self, solve: Solve, theta, x_T, cond, noise):
        dtype = first_dtype(x_T)
        if jnp.finfo(dtype).bits < 32:
            warnings.warn(
                f"ReversibleAdjoint with a {jnp.dtype(dtype).name} state: the states "
                "are rebuilt backward in that precision, and the gradient can be off "
                "by tens of percent (float16/bfloat16 round-off amplified over the "
                "steps). Keep x_T in float32 (the model may still compute in "
                f"{jnp.dtype(dtype).name}), or use `adjoint=aj.DTO()`.",
                stacklevel=2,
            )
        del noise  # a reversible sampler is deterministic
        state, _ = solve.forward(theta, x_T, cond)  # a scan keeping the last state only
        return solve.sampler.output(state), state

    def backward(self, solve, residuals, ct_x0, diff, x_T):
        return _reversible_backward(solve, residuals, ct_x0, diff, x_T)


ReversibleAdjoint.__init__.__doc__ = """**Arguments:** None."""


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
def _reversible_backward(solve: Solve, state_N, ct_x0, diff: Differentiated, x_T):
    sampler, schedule = solve.sampler, solve.schedule
    theta = diff.theta_with(diff.theta)
    cond = diff.cond_with(diff.cond)
    out, out_vjp = jax.vjp(sampler.output, state_N)
    (ct_state,) = out_vjp(ct_x0)

    def body(carry, xs):
        state_next, ct_next, ct_theta, ct_cond = carry
        t, s, i = xs
        eps = solve.eps_fn(theta, solve.cond_at(cond, i))
        eps_prev = solve.eps_fn(theta, solve.cond_at(cond, jnp.maximum(i - 1, 0)))
        state = sampler.step_back(eps, eps_prev, schedule, state_next, t, s, i, None)
        z_rest = diff.cond_rest_at(solve, i)

        def step(st, th_d, zz_d):
            e = solve.eps_fn(diff.theta_with(th_d), diff.cond_with(zz_d, z_rest))
            return sampler.step(e, schedule, st, t, s, i, None)

        _, step_vjp = jax.vjp(step, state, diff.theta, diff.cond_at(solve, i))
        ct_state_i, ct_theta_i, ct_z_i = step_vjp(ct_next)
        ct_theta = tree_acc(ct_theta, ct_theta_i)
        if solve.scheduled:
            return (state, ct_state_i, ct_theta, ct_cond), ct_z_i
        return (state, ct_state_i, ct_theta, tree_acc(ct_cond, ct_z_i)), None

    ct_cond0 = None if solve.scheduled else acc_zeros(diff.cond)
    init = (state_N, ct_state, acc_zeros(diff.theta), ct_cond0)
    xs = (solve.ts[:-1], solve.ts[1:], jnp.arange(solve.num_steps, dtype=jnp.int32))
    (_, ct_state0, ct_theta, ct_cond), ct_z = jax.lax.scan(body, init, xs, reverse=True)
    _, init_vjp = jax.vjp(lambda x: sampler.init(x, schedule, solve.ts), x_T)
    (ct_x_T,) = init_vjp(ct_state0)
    return ct_theta, ct_x_T, ct_z if solve.scheduled else ct_cond, None
