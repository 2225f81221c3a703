"""Exact gradients of a reversible sampler in O(1) memory: the forward states are
recovered algebraically from the last one during the backward pass."""

import warnings

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._misc import acc_zeros, first_dtype, lincomb, tree_acc
from .._samplers._base import (
    AbstractMultistepSampler,
    AbstractOneStepSampler,
    AbstractReversibleSampler,
    AbstractSampler,
)
from .._samplers._reversible_heun import rho_coeffs
from ._base import (
    FORWARD_MODE_HINT,
    AbstractCustomAdjoint,
    Differentiated,
    Solve,
    refuse_nonsmooth,
    skip_body_if_zero,
    zero_length_steps,
)


class ReversibleAdjoint(AbstractCustomAdjoint):
    """The exact gradient of a reversible sampler (`aj.BELM`, `aj.BDIA`,
    `aj.AsyncLeapfrog`, `aj.ReversibleHeun`, `aj.EDICT`, `aj.McCallumFoster`) in O(1)
    memory in the number of steps.

    The forward pass keeps only the final sampler state. The backward pass walks the
    steps in reverse: it recovers the state before step i from the state after it
    with the sampler's algebraic inverse (`step_back`), then takes the
    vector-Jacobian product of step i to carry the cotangents of the state, θ and z
    back. Nothing of the forward pass is stored, so memory is that of one step
    whatever N is. Where the inverse evaluates the model at the points where the
    step does (every sampler here; the sampler's `rebuild` attribute), each of
    those evaluations is made once, as a VJP, and serves both the rebuild and the
    step's VJP.

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

    **Precision.** In float32 the rebuilt states carry the round-off the inverse
    amplifies: against the float64 `aj.DTO` gradient (random MLP, N = 10 / 20 / 40)
    asynchronous leapfrog, BELM, BDIA and `McCallumFoster` are within 2e-5, EDICT
    7e-4, reversible Heun 1e-3 (each sampler's docstring; checked in
    `tests/test_reversible_float32.py`). Where a sampler's measured error passes
    1e-3 (reversible Heun in float32; EDICT at N ≤ 10 or beyond ≈ 130; BDIA(γ < 1)
    and `McCallumFoster` with a small coupling, which divide by γ or λ every step)
    it warns at trace time with the estimate, as for a float16 or bfloat16 *state*
    (errors of 1–100%); a 16-bit *model* under a float32 state is fine (errors at
    its own round-off, about 1e-2 for bfloat16).

    **Memory:** O(1) in N: one sampler state, its cotangent and one step's VJP
    residuals. Compiled temporary memory of the jitted gradient (MLP of width 256,
    batch 64, float64): reversible Heun 972,808 bytes at N = 16 and at N = 128,
    BELM 972,480 and 972,928 (`aj.DTO()` at N = 128: 216,801,312 with reversible
    Heun, 69,509,672 with BELM).

    **Cost:** with a fused rebuild (every sampler here: BELM, BDIA, asynchronous
    leapfrog, reversible Heun, EDICT, `McCallumFoster` around any base, `aj.ExpRK`
    included), one model VJP per forward evaluation and no other evaluation: the
    backward pass costs what `aj.DTO(checkpoints="steps")`'s does, in O(1) memory
    (`adjoint_jax.bench.count_evals`: N evaluations forward, N VJPs backward for
    BELM; `tests/test_reversible.py::test_evaluation_counts`,
    `tests/test_rex.py`).

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
        refuse_nonsmooth(self, sampler)
        if isinstance(sampler, AbstractReversibleSampler):
            return
        wrappable = (AbstractMultistepSampler, AbstractOneStepSampler)
        if isinstance(sampler, wrappable) and not sampler.is_sde:
            fix = (
                f"Wrap it as `aj.McCallumFoster({sampler!r})`, or use "
                "`adjoint=aj.DTO()`."
            )
        elif not sampler.is_sde:
            fix = (
                "Use `adjoint=aj.DTO()` (exact; `aj.DTO(checkpoints=k)` for O(k) "
                "memory), or a reversible sampler such as "
                "`aj.McCallumFoster(aj.ExpRK())`."
            )
        else:
            fix = (
                "A stochastic sampler has no algebraic inverse; use `adjoint=aj.DTO()` "
                "(exact; `aj.DTO(checkpoints=k)` for O(k) memory) or "
                "`aj.RecordedAdjoint()`."
            )
        raise ValueError(
            f"`adjoint={self!r}` requires a reversible sampler (aj.BELM, aj.BDIA, "
            "aj.AsyncLeapfrog, aj.ReversibleHeun, aj.EDICT, aj.McCallumFoster); got "
            f"`sampler={sampler!r}`. {fix}"
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
        elif why := solve.sampler.precision_warning(solve.num_steps, jnp.dtype(dtype)):
            # The sampler's measured bound for this (static) N and dtype.
            warnings.warn(
                f"ReversibleAdjoint with `{solve.sampler!r}`, N = {solve.num_steps} "
                f"steps and a {jnp.dtype(dtype).name} state: {why} "
                "`adjoint=aj.DTO(checkpoints=k)` is exact in O(k) memory.",
                stacklevel=2,
            )
        del noise  # a reversible sampler is deterministic
        state, _ = solve.forward(theta, x_T, cond)  # a scan keeping the last state only
        return solve.sampler.output(state), state

    def backward(self, solve, residuals, ct_x0, diff, x_T):
        rebuild = solve.sampler.rebuild
        if rebuild == "shared":
            return _shared_backward(solve, residuals, ct_x0, diff, x_T)
        if rebuild == "previous":
            return _heun_backward(solve, residuals, ct_x0, diff, x_T)
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

    def back_step(state_next, ct_next, t, s, i):
        eps = solve.eps_fn(theta, solve.cond_at(cond, i))
        eps_prev = solve.eps_fn(theta, solve.cond_at(cond, jnp.maximum(i - 1, 0)))
        state = sampler.step_back(eps, eps_prev, schedule, state_next, t, s, i, None)
        z_rest = diff.cond_rest_at(solve, i)

        def step(st, th_d, zz_d):
            e = solve.eps_fn(diff.theta_with(th_d), diff.cond_with(zz_d, z_rest))
            return sampler.step(e, schedule, st, t, s, i, None)

        _, step_vjp = jax.vjp(step, state, diff.theta, diff.cond_at(solve, i))
        return (state, *step_vjp(ct_next))

    return _state_backward(solve, state_N, ct_x0, diff, x_T, back_step)


def _state_scan(solve: Solve, diff: Differentiated, back_step, carry0, ct_state):
    """The backward scan shared by the reversible rules: `back_step(c_{i+1},
    ā_{i+1}, t_i, t_{i+1}, i) -> (c_i, ā_i, θ̄_i, z̄_i)` rebuilds what the rule
    carries (the sampler state, or reversible Heun's partial state) and pulls the
    state's cotangent back through step i; this sums θ̄ (and z̄ for a constant z) and
    stacks z̄ for a scheduled one. Returns (c_0, ā_0, θ̄, z̄)."""

    def body(carry, xs):
        c_next, ct_next, ct_theta, ct_cond = carry
        *step_xs, zero = xs

        def one(carry_, step_xs_):
            c, ct_state_i, ct_theta_i, ct_z_i = back_step(*carry_, *step_xs_)
            return (c, ct_state_i), (ct_theta_i, ct_z_i)

        # A zero-length step (a padded grid) is the identity: see `zero_length_steps`.
        if solve.zero_steps:
            (c, ct_state_i), (ct_theta_i, ct_z_i) = skip_body_if_zero(
                zero, one, (c_next, ct_next), tuple(step_xs)
            )
        else:
            (c, ct_state_i), (ct_theta_i, ct_z_i) = one((c_next, ct_next), step_xs)
        ct_theta = tree_acc(ct_theta, ct_theta_i)
        if solve.scheduled:
            return (c, ct_state_i, ct_theta, ct_cond), ct_z_i
        return (c, ct_state_i, ct_theta, tree_acc(ct_cond, ct_z_i)), None

    ct_cond0 = None if solve.scheduled else acc_zeros(diff.cond)
    init = (carry0, ct_state, acc_zeros(diff.theta), ct_cond0)
    t, s, zero = zero_length_steps(solve.ts)
    xs = (t, s, jnp.arange(solve.num_steps, dtype=jnp.int32), zero)
    (c0, ct_state0, ct_theta, ct_cond), ct_z = jax.lax.scan(body, init, xs, reverse=True)
    return c0, ct_state0, ct_theta, ct_z if solve.scheduled else ct_cond


def _output_ct(solve: Solve, state_N, ct_x0):
    """The cotangent of the final sampler state, from that of x_0."""
    _, out_vjp = jax.vjp(solve.sampler.output, state_N)
    return out_vjp(ct_x0)[0]


def _init_ct(solve: Solve, ct_state0, x_T):
    """∂L/∂x_T from the cotangent of the initial sampler state."""
    _, init_vjp = jax.vjp(lambda x: solve.sampler.init(x, solve.schedule, solve.ts), x_T)
    return init_vjp(ct_state0)[0]


def _state_backward(solve: Solve, state_N, ct_x0, diff: Differentiated, x_T, back_step):
    """A rule whose scan carries the sampler state itself."""
    ct_state = _output_ct(solve, state_N, ct_x0)
    _, ct_state0, ct_theta, ct_c = _state_scan(solve, diff, back_step, state_N, ct_state)
    return ct_theta, _init_ct(solve, ct_state0, x_T), ct_c, None


# ---- fused backward passes ------------------------------------------------------------
class _EpsFromPredict:
    """A `StepModel`-like object (`eps(x, t)`, `eps.x0(x, t)`, `eps.predict(x, t,
    derive)`) built on one `predict` function."""

    def __init__(self, predict):
        self.predict = predict

    def __call__(self, x, t):
        return self.predict(x, t, False)[0]

    def x0(self, x, t):
        return self.predict(x, t, True)[1]


# The replay of a recorded evaluation: the value `out` recorded at (x_r, θ_0, z_0)
# and the linearisation J there, as the function
#     e(x, θ, z) = out + J·(x − x_r, θ − θ_0, z − z_0)
# at a point equal to the recording one (the step recomputes x_r from the rebuilt
# state; the two agree to round-off). Its value is `out` and its tangent
# d(out) + J·(dx, dθ, dz): the term (dJ)·(x − x_r) vanishes at that point, so the
# tangents of J's residuals are not needed. Written as a custom JVP so that the
# step's VJP transposes J without evaluating J·(x − x_r) (a wasted linearised pass
# of the network) and so that a model with its own custom VJP, whose linearisation
# JAX can transpose but not differentiate, works; second derivatives (jvp-of-grad)
# differentiate the rule itself.
@jax.custom_jvp
def _replay(args, out, lin):
    del args, lin
    return out


@_replay.defjvp
def _replay_jvp(primals, tangents):
    args, out, lin = primals
    d_args, d_out, _ = tangents
    return out, jtu.tree_map(lambda a, b: a + b, d_out, lin(*d_args))


def _count_calls(sampler, schedule, state, t, s, i) -> int:
    """How many model calls `sampler.step` makes when traced (both branches of a
    `lax.cond` count): a shape-only trace with a stand-in model."""
    calls = [0]

    def fake(x, tt, derive=True):
        calls[0] += 1
        return x, (x if derive else None)

    spec = lambda tree: jtu.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    jax.eval_shape(
        lambda st, t, s, i: sampler.step(_EpsFromPredict(fake), schedule, st, t, s, i, None),
        spec(state), spec(t), spec(s), spec(i),
    )
    return calls[0]


# The fused backward rule, for samplers whose `step_back` evaluates ε exactly where
# the step it inverts does (`rebuild = "shared"`: BELM, BDIA, EDICT, asynchronous
# leapfrog). The step S_i is s_{i+1} = L_i(s_i, e_1, ..., e_m) with
# e_j = ε(P_j(s_i), z_i; θ); its VJP needs, besides the linear map L_i, only the
# pullback of ε at the m points P_j(s_i). `step_back` evaluates ε at exactly those
# points while rebuilding s_i from s_{i+1} (in the reverse order, or in the order the
# sampler's `shared_evaluations` gives), so each of its evaluations is made as
# `jax.linearize` of ε in (x, θ, z_i), and the VJP of S_i is then taken with ε
# replaced by its linearisation e(x, θ, z) = e_j + J_j·(x − x_j, θ − θ_0, z − z_i)
# (`_replay`): same derivative, no second evaluation. Per step: the evaluations of `step_back`
# (which are the step's), each with its VJP; nothing else. A start-up evaluation of
# step 0 that `step_back` does not make (leapfrog's v_0 = ε(x_T, t_0)) is the first
# call of `step` and is evaluated with its VJP as usual: `step_back`'s evaluations
# are matched to the *last* calls of `step`, in reverse order.
def _shared_backward(solve: Solve, state_N, ct_x0, diff: Differentiated, x_T):
    sampler, schedule = solve.sampler, solve.schedule
    theta0 = diff.theta

    def back_step(state_next, ct_next, t, s, i):
        z0, z_rest = diff.cond_at(solve, i), diff.cond_rest_at(solve, i)

        def model(th, z):
            return solve.eps_fn(diff.theta_with(th), diff.cond_with(z, z_rest))

        recorded = []

        def record(x, tt, derive=True):
            fn = lambda x_, th_, z_: model(th_, z_).predict(x_, tt, derive)
            out, lin = jax.linearize(fn, x, theta0, z0)
            recorded.append((out, lin))
            return out

        rec = _EpsFromPredict(record)
        state = sampler.step_back(rec, rec, schedule, state_next, t, s, i, None)
        k = len(recorded)
        offset = _count_calls(sampler, schedule, state, t, s, i) - k
        if offset < 0:
            raise TypeError(
                f"{sampler!r} declares `rebuild = 'shared'` but its `step_back` "
                "evaluates the model more often than its `step`; declare "
                "`rebuild = 'separate'`."
            )

        pairs = sampler.shared_evaluations(k)

        def step(st, th, z):
            calls = [0]

            def replay(x, tt, derive=True):
                j = calls[0]
                calls[0] += 1
                if j < offset:  # a start-up evaluation: evaluated (with its VJP)
                    return model(th, z).predict(x, tt, derive)
                out, lin = recorded[pairs[j - offset]]
                return _replay((x, th, z), out, lin)

            return sampler.step(_EpsFromPredict(replay), schedule, st, t, s, i, None)

        _, step_vjp = jax.vjp(step, state, theta0, z0)
        return (state, *step_vjp(ct_next))

    return _state_backward(solve, state_N, ct_x0, diff, x_T, back_step)


# The fused backward rule of reversible Heun (`rebuild = "previous"`). Its step i
#
#     x̂_{i+1} = 2A x_i − A x̂_i + K ε̂_i,   ε̂_{i+1} = ε_i(x̂_{i+1}, t_{i+1}),
#     x_{i+1} = A x_i + ½K ε̂_i + ½K ε̂_{i+1}
#
# (A, K = `rho_coeffs(t_i, t_{i+1})`; ε̂_0 = ε_0(x̂_0, t_0) evaluated by step 0)
# evaluates ε at the *end* point x̂_{i+1}, while inverting it needs ε̂_i, step i − 1's
# evaluation. So the backward scan is shifted by half a step: iteration i evaluates
# ε_i at x̂_{i+1} once, as a VJP, which gives (a) ε̂_{i+1} to finish rebuilding
# x_{i+1} = q_{i+1} + c_{i+1} ε̂_{i+1} (the part of it iteration i + 1 could not
# compute), then x̂_i = 2B x_{i+1} − B x̂_{i+1} + K' ε̂_{i+1} and the known part
# q_i = B x_{i+1} + ½K' ε̂_{i+1} of x_i (B, K' = `rho_coeffs(t_{i+1}, t_i)`,
# c_i = ½K'); and (b) the pullback of ε̂_{i+1} for the VJP of step i, which is linear
# in the state given it. With (ḡx, ḡx̂, ḡε̂) the cotangent of step i's output:
#
#     ḡE = ḡε̂ + ½K ḡx,  (δx̂, δθ, δz_i) = J_{ε_i}(x̂_{i+1})ᵀ ḡE,  ḡ' = ḡx̂ + δx̂,
#     x̄_i = 2A ḡ' + A ḡx,  x̂̄_i = −A ḡ',  ε̂̄_i = K ḡ' + ½K ḡx.
#
# After the scan, ε̂_0's cotangent goes through ε_0 at x̂_0 (step 0's start-up
# evaluation, one more VJP), and x̄_T = x̄_0 + x̂̄_0. Evaluations: N + 1, all inside
# VJPs, as many as the forward pass made.
def _heun_backward(solve: Solve, state_N, ct_x0, diff: Differentiated, x_T):
    schedule = solve.schedule
    theta0 = diff.theta

    def eps_vjp(x, t, i):
        z0, z_rest = diff.cond_at(solve, i), diff.cond_rest_at(solve, i)
        fn = lambda x_, th_, z_: solve.eps(
            diff.theta_with(th_), x_, t, diff.cond_with(z_, z_rest)
        )
        return jax.vjp(fn, x, theta0, z0)

    def back_step(carry, ct_next, t, s, i):
        (q, xh_s, c), (gx, gxh, geh) = carry, ct_next
        e_s, pullback = eps_vjp(xh_s, s, i)
        x_s = lincomb((1.0, q), (c, e_s))
        b, kb = rho_coeffs(schedule, s, t)
        xh = lincomb((2.0 * b, x_s), (-b, xh_s), (kb, e_s))
        q_new = lincomb((b, x_s), (0.5 * kb, e_s))
        a, k = rho_coeffs(schedule, t, s)
        d_xh, ct_theta_i, ct_z_i = pullback(lincomb((1.0, geh), (0.5 * k, gx)))
        g = lincomb((1.0, gxh), (1.0, d_xh))
        ct = (
            lincomb((2.0 * a, g), (a, gx)),
            lincomb((-a, g),),
            lincomb((k, g), (0.5 * k, gx)),
        )
        return (q_new, xh, 0.5 * kb), ct, ct_theta_i, ct_z_i

    x_N, xh_N, _ = state_N
    carry0 = (x_N, xh_N, jnp.zeros((), solve.ts.dtype))
    ct_state = _output_ct(solve, state_N, ct_x0)
    (_, xh_0, _), ct_state0, ct_theta, ct_c = _state_scan(
        solve, diff, back_step, carry0, ct_state
    )
    # Step 0's start-up evaluation ε̂_0 = ε_0(x̂_0, t_0) (`init` holds a placeholder
    # in the ε̂ slot, so its cotangent goes here).
    _, pullback = eps_vjp(xh_0, solve.ts[0], jnp.zeros((), jnp.int32))
    d_xh, ct_theta_0, ct_z_0 = pullback(ct_state0[2])
    ct_theta = tree_acc(ct_theta, ct_theta_0)
    if solve.scheduled:
        ct_c = jtu.tree_map(lambda a, b: a.at[0].add(b.astype(a.dtype)), ct_c, ct_z_0)
    else:
        ct_c = tree_acc(ct_c, ct_z_0)
    ct_x_T = lincomb((1.0, _init_ct(solve, ct_state0, x_T)), (1.0, d_xh))
    return ct_theta, ct_x_T, ct_c, None
