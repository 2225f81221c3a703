"""Adjoint Matching (Domingo-Enrich et al., ICLR 2025): reward fine-tuning as a
regression onto the lean adjoint of a memoryless trajectory.

**The memoryless noise schedule.** For a schedule (α_t, σ_t) with log-SNR λ_t, the
reverse-time SDEs with the marginals of the data process are

    dx = [f x − ((1 + η²)/2) g² ∇log p_t(x)] dt + η g dw̄,
    f = d log α/dt,   g² = dσ²/dt − 2 f σ² = −2 σ_t² dλ/dt,

(η = 0 the probability-flow ODE). With η = 1 the SDE is the exact time reversal of
the noising process, so its path measure is the noising process's: x_T is
independent of x_0 whenever α_T = 0 (approximately, α_T ≈ 0.007 for
`aj.VPLinear()` at t = 1; exactly for `aj.FlowMatching()` at t = 1). That
independence ("memorylessness") is what makes the reward-tilted distribution
p_base(x) exp(r(x)/λ) the marginal at t = 0 of the optimally controlled SDE, with no
value-function bias from the initial noise. `memoryless_diffusion(schedule, t)`
returns that g(t); its discretisation is the DDPM posterior step, `aj.DDIM(eta=1)`,
which is the sampler used here.

**The control and the lean adjoint.** A fine-tuned ε-model ε_θ changes the drift by
g²(ε_θ − ε_base)/σ_t, i.e. applies the control u = (g/σ_t)(ε_θ − ε_base) (in the
generation direction). Stochastic optimal control of
E[∫ ½|u|² dt + C(x_0)] with terminal cost C = −r/λ has the optimal control
u* = −g ∇V with V the value function, and Adjoint Matching regresses u onto
−g ã(t), where the *lean* adjoint ã solves the adjoint equation of the *base*
drift alone (the terms of the control and of ½|u|² dropped, which vanish in
expectation at the optimum) backward from ã(0) = ∇C(x_0), along trajectories of the
current model. In ε-form the target is

    ε_θ(x_t, t) = ε_base(x_t, t) + σ_t ã(t)     (stop-gradient on the right).

Discretised on the sampler's grid, ã is exactly the discrete adjoint of the base
model's DDIM(η = 1) chain with its noise held fixed (what `aj.DTO()` returns for
∂C/∂x_t when the fine-tuned model equals the base).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree

from ._adjoints._base import Solve
from ._adjoints._dto import DTO
from ._misc import step_noise
from ._model import Scheduled, split_model
from ._sample import sample
from ._samplers._ddim import DDIM
from ._schedule import AbstractSchedule


_WEIGHTINGS = ("uniform", "control")


def memoryless_diffusion(schedule: AbstractSchedule, t: ArrayLike) -> Array:
    """g(t) = σ_t √(−2 dλ/dt): the diffusion coefficient of the reverse SDE that is
    the exact time reversal of the noising process (the "memoryless" noise
    schedule of Adjoint Matching; `aj.DDIM(eta=1)` is its discretisation). For
    `aj.VPLinear()` it is √β(t). The derivation is in the module docstring of
    `adjoint_jax/_adjoint_matching.py`.
    """
    t = jnp.asarray(t)
    _, dlam = jax.jvp(schedule.lam, (t,), (jnp.ones_like(t),))
    return schedule.sigma(t) * jnp.sqrt(-2.0 * dlam)


def _setup(model, params, base_params, x_T, cond, schedule, ts, key, noise):
    """Static checks (through `aj.sample`'s), the solve, and the step noises."""
    sampler = DDIM(eta=1.0)
    if (key is None) == (noise is None):
        raise ValueError(
            "Adjoint Matching samples with the memoryless `aj.DDIM(eta=1)` and needs "
            "either `key=jax.random.key(...)` or `noise=...` (one noise per step); got "
            + ("neither." if key is None else "both.")
        )
    kw = {"key": key} if noise is None else {"noise": noise}
    jax.eval_shape(
        lambda p, b: (
            sample(model, p, x_T, cond, schedule=schedule, ts=ts, sampler=sampler,
                   adjoint=DTO(), **kw),
            sample(model, b, x_T, cond, schedule=schedule, ts=ts, sampler=sampler,
                   adjoint=DTO(), **kw),
        ),
        params,
        base_params,
    )
    ts = jnp.asarray(ts)
    if not jnp.issubdtype(ts.dtype, jnp.floating):
        ts = ts.astype(jnp.result_type(float))
    n = ts.shape[0] - 1
    model_call, arrays = split_model(model)
    scheduled = isinstance(cond, Scheduled)
    solve = Solve(model_call, schedule, ts, sampler, None, scheduled)
    cond_values = cond.values if scheduled else cond
    if noise is None:
        noise = jax.vmap(lambda i: step_noise(key, i, x_T, ts.dtype))(jnp.arange(n))
    arrays = jax.lax.stop_gradient(arrays)
    return solve, arrays, cond_values, noise


def _trajectory_and_lean_adjoint(solve, arrays, params, base_params, x_T, cond,
                                 noise, terminal_cost):
    theta = (arrays, jax.lax.stop_gradient(params))
    theta_base = (arrays, jax.lax.stop_gradient(base_params))
    inputs = solve.step_inputs(cond, noise)

    def forward(x, xs):
        return solve.step(theta, cond, x, xs), x

    x0, xs = jax.lax.scan(forward, jax.lax.stop_gradient(x_T), inputs)
    # ã(0) = ∇C(x_0); then, backward along the recorded states with the noise held
    # fixed, ã_i = (∂x_{i+1}/∂x_i)ᵀ ã_{i+1} for the *base* model's step
    # x_{i+1} = A x_i + B ε_base(x_i, t_i) + C ξ_i: one VJP of ε_base per step.
    grad0 = jax.grad(lambda x: jnp.sum(terminal_cost(x)))(x0)

    def backward(a, xs_i):
        x_i, inp = xs_i
        _, vjp = jax.vjp(lambda x: solve.step(theta_base, cond, x, inp), x_i)
        (a_i,) = vjp(a)
        return a_i, a_i

    _, adjs = jax.lax.scan(backward, grad0, (xs, inputs), reverse=True)
    cat = lambda a, b: jnp.concatenate([a, b[None]])
    return (
        jtu.tree_map(cat, xs, x0),
        jtu.tree_map(cat, adjs, grad0),
    )


def lean_adjoint(
    model: Callable,
    params: PyTree,
    base_params: PyTree,
    x_T: PyTree,
    cond: PyTree = None,
    *,
    schedule: AbstractSchedule,
    ts: ArrayLike,
    terminal_cost: Callable,
    key: Array | None = None,
    noise: PyTree = None,
) -> tuple[PyTree, PyTree]:
    """The memoryless trajectory of the fine-tuned model and its lean adjoint.

    Samples x_{t_0} = x_T, …, x_{t_N} with `aj.DDIM(eta=1)` and `model(params, …)`,
    then solves the lean adjoint ã backward with `model(base_params, …)`:
    ã_N = ∇C(x_{t_N}), ã_i = (∂x_{i+1}/∂x_i)ᵀ ã_{i+1} for the base model's step with
    the noise fixed. When `params` equals `base_params` this is the exact discrete
    adjoint ∂C/∂x_{t_i} of the sampled chain (`aj.DTO()`'s). Nothing is
    differentiated through (both outputs are constants).

    **Arguments:** `model`, `x_T`, `cond`, `schedule`, `ts`, `key`/`noise` as for
    `aj.sample` (the sampler is `aj.DDIM(eta=1)`); `params` (the fine-tuned model's),
    `base_params` (the base model's); `terminal_cost(x_0)`: C = −r/λ, **summed**
    over the batch (each sample's adjoint is the gradient of its own cost).

    **Returns:** `(xs, adjoints)`, pytrees like x_T with a leading axis of N + 1
    (times `ts[0]`, …, `ts[N]`).

    **Cost:** N evaluations of the fine-tuned model, N VJPs of the base model.
    **Memory:** the N + 1 states.
    """
    solve, arrays, cond_values, noise = _setup(
        model, params, base_params, x_T, cond, schedule, ts, key, noise
    )
    return _trajectory_and_lean_adjoint(
        solve, arrays, params, base_params, x_T, cond_values, noise, terminal_cost
    )


def adjoint_matching_loss(
    model: Callable,
    params: PyTree,
    base_params: PyTree,
    x_T: PyTree,
    cond: PyTree = None,
    *,
    schedule: AbstractSchedule,
    ts: ArrayLike,
    terminal_cost: Callable,
    key: Array,
    num_times: int | None = None,
    weighting: str = "uniform",
) -> Array:
    """Adjoint Matching's regression loss (Domingo-Enrich et al., ICLR 2025), whose
    gradient with respect to `params` fine-tunes `model` towards
    p_base(x) exp(r(x)/λ) without backpropagating through the sampling chain.

    With the memoryless trajectory x_{t_i} of the current model and its lean adjoint
    ã_i (`aj.lean_adjoint`), and a set S of K step indices,

        loss = (1/K) Σ_{i∈S} w_i ‖ε_θ(x_{t_i}, t_i) − ε_base(x_{t_i}, t_i) − σ_{t_i} ã_i‖²,

    the norm summed over every element (batch included). Its minimiser is
    ε_θ = ε_base + σ_t E[ã_t | x_t], the optimal control (see the module docstring
    of `adjoint_jax/_adjoint_matching.py`); positive weights w_i do not move a
    minimiser the model can represent.

    **Arguments:** those of `aj.lean_adjoint` (`terminal_cost` = −r/λ summed over the
    batch), and:

    - `key`: the DDIM(η = 1) noises (step i's from `fold_in(key_noise, i)`, as
        `aj.sample` draws them) and the choice of S.
    - `num_times`: K, the number of step indices drawn uniformly without replacement
        from {0, …, N − 1} (None: all N).
    - `weighting`: `"uniform"` (w_i = 1, the ε-matching weighting of diffusion
        training) or `"control"` (w_i = N g(t_i)² (t_i − t_{i+1})/σ_{t_i}², the
        paper's ∫ ½|u + g ã|² dt up to the factor ½; it weights the low-noise end
        heavily).

    **Returns:** a scalar, differentiable with respect to `params` (the trajectory,
    the adjoint and the base model's output are constants).

    **Cost:** N evaluations (sampling), N base-model VJPs (lean adjoint), and K
    evaluations of each model plus K VJPs of the fine-tuned one for the gradient.
    """
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"`weighting` must be one of {_WEIGHTINGS}; got {weighting!r}.")
    n = np.shape(ts)[0] - 1
    if num_times is not None and (
        isinstance(num_times, bool) or not isinstance(num_times, int)
        or not 1 <= num_times <= n
    ):
        raise ValueError(
            f"`num_times` must be None (all steps) or an int in [1, N] = [1, {n}]; got "
            f"{num_times!r}."
        )
    k_noise, k_times = jax.random.split(key)
    solve, arrays, cond_values, noise = _setup(
        model, params, base_params, x_T, cond, schedule, ts, k_noise, None
    )
    xs, adjs = _trajectory_and_lean_adjoint(
        solve, arrays, params, base_params, x_T, cond_values, noise, terminal_cost
    )
    ts = solve.ts
    if num_times is None or num_times == n:
        idx = jnp.arange(n)
    else:
        idx = jax.random.choice(k_times, n, (num_times,), replace=False)
    if weighting == "uniform":
        w = jnp.ones(idx.shape, ts.dtype)
    else:
        t, s = ts[idx], ts[idx + 1]
        w = n * memoryless_diffusion(schedule, t) ** 2 * (t - s) / schedule.sigma(t) ** 2
    theta_base = (arrays, jax.lax.stop_gradient(base_params))

    def term(i, w_i, p):
        x = jtu.tree_map(lambda v: v[i], xs)
        a = jtu.tree_map(lambda v: v[i], adjs)
        z = solve.cond_at(cond_values, i)
        t = ts[i]
        e = solve.eps((arrays, p), x, t, z)
        e_base = jax.lax.stop_gradient(solve.eps(theta_base, x, t, z))
        sig = schedule.sigma(t)
        sq = jtu.tree_map(
            lambda u, v, aa: jnp.sum(
                (u - v - sig.astype(aa.dtype) * aa).astype(jnp.result_type(float)) ** 2
            ),
            e, e_base, a,
        )
        total = sum(jtu.tree_leaves(sq))
        return w_i.astype(total.dtype) * total

    # One batched evaluation of each model over the K chosen times.
    terms = jax.vmap(term, in_axes=(0, 0, None))(idx, w, params)
    return jnp.mean(terms)
