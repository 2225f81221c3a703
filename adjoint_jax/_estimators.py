"""Surrogate gradient estimators of reward fine-tuning: DRaFT-LV and the
trajectory-subset surrogate."""

import dataclasses
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree

from ._adjoints._base import AbstractAdjoint, Solve
from ._adjoints._dto import DTO
from ._adjoints._truncated import Truncated, _Gated
from ._misc import is_concrete, tree_normal
from ._model import Scheduled
from ._sample import sample
from ._samplers._base import AbstractSampler
from ._schedule import AbstractSchedule


def draft_lv(
    model: Callable,
    params: PyTree,
    x_T: PyTree,
    cond: PyTree = None,
    *,
    schedule: AbstractSchedule,
    ts: ArrayLike,
    sampler: AbstractSampler,
    key: Array,
    num: int = 2,
    noise: PyTree = None,
) -> PyTree:
    """DRaFT-LV (Clark et al. 2024): the last step re-run from `num` re-noisings of
    the generated sample, for a lower-variance DRaFT-1 gradient.

    With x_0 the sample (`aj.sample` with the same arguments, held constant) and
    t' = ts[-2], re-noising j is `x'_j = α_{t'} x_0 + σ_{t'} ξ_j` and its output is
    the sampler's last step from `x'_j` (a fresh one-step solve over
    (ts[-2], ts[-1]) with the last conditioning value). Returns the `num` outputs,
    stacked on a new leading axis of every leaf of x_T; average your reward over them:
    `-jnp.mean(jax.vmap(reward)(draft_lv(...)))`.

    **The estimator:** `∇_θ (1/n) Σ_j r(S_{N−1}(α_{t'} x_0 + σ_{t'} ξ_j; θ, z))`
    with x_0 constant: the gradient of the expected reward of the last step over the
    forward marginal q(x_{t'} | x_0), instead of DRaFT-1's one trajectory state.
    **Bias:** DRaFT-1's (no derivative through the steps before the last, so
    ∂L/∂x_T = 0 and the earlier conditioning values and noises get none) plus the
    mismatch between q(x_{t'} | x_0) and the sampler's own state at t'; the outputs
    are not x_0 (they differ by the last step's error from a re-noised state).
    **Variance:** averaged over n re-noisings (DRaFT-LV uses n = 2).
    **Cost:** one sampling pass (no backward) plus n last steps with their VJPs.

    **Arguments:** those of `aj.sample` (`model`, `params`, `x_T`, `cond`,
    `schedule`, `ts`, `sampler`, `noise`), and:

    - `key`: split in two: the first half is the sampling key of a stochastic
        sampler (unless `noise` is given), the second draws re-noising j from
        `jax.random.fold_in(key_2, j)` (leaf noises as in `aj.sample`'s `key`; a
        stochastic last step draws its noise from `fold_in` of that key by 1).
    - `num`: n, the number of re-noisings (≥ 1).
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"`draft_lv(num=...)` must be a positive int; got {num!r}.")
    if key is None:
        raise ValueError("`draft_lv` needs `key=jax.random.key(...)` (re-noising).")
    k_sample, k_renoise = jax.random.split(key)
    x0 = sample(
        model, params, x_T, cond, schedule=schedule, ts=ts, sampler=sampler,
        adjoint=Truncated(last=1), noise=noise,
        key=k_sample if sampler.is_sde and noise is None else None,
    )
    x0 = jax.lax.stop_gradient(x0)
    # (`sample` has checked `ts`.)
    last = (np.asarray(ts) if is_concrete(ts) else jnp.asarray(ts))[-2:]
    alpha, sigma = schedule.alpha(last[0]), schedule.sigma(last[0])
    if isinstance(cond, Scheduled):
        cond = Scheduled(jtu.tree_map(lambda v: v[-1:], cond.values))

    def one(j):
        kj = jax.random.fold_in(k_renoise, j)
        xi = tree_normal(kj, x0, last.dtype)
        x1 = jtu.tree_map(
            lambda a, e: alpha.astype(a.dtype) * a + sigma.astype(a.dtype) * e, x0, xi
        )
        return sample(
            model, params, x1, cond, schedule=schedule, ts=last, sampler=sampler,
            adjoint=DTO(), key=jax.random.fold_in(kj, 1) if sampler.is_sde else None,
        )

    return jax.vmap(one)(jnp.arange(num))


def trajectory_surrogate(
    model: Callable,
    params: PyTree,
    x_T: PyTree,
    cond: PyTree = None,
    *,
    schedule: AbstractSchedule,
    ts: ArrayLike,
    sampler: AbstractSampler,
    steps: Sequence[int],
    key: Array | None = None,
    noise: PyTree = None,
) -> PyTree:
    """The trajectory-subset surrogate (FlowBP-style, 2026): sample without
    gradient, keep the trajectory, and re-run a chosen subset of steps' model
    evaluations with gradient.

    Returns x_0, the same value as `aj.sample` with the same arguments, whose
    derivative is the surrogate's: at every step the model is evaluated at the
    trajectory's state held constant (x and t carry no derivative into the
    network), its prediction is a constant outside `steps`, and the sampler's
    linear combination of states, predictions and noises stays differentiable. So

        ∂L/∂θ ≈ Σ_{i ∈ steps} (∂ε_θ(x_i, z_i, t_i)/∂θ)ᵀ W_iᵀ ∂L/∂x_0,

    with W_i = ∂x_0/∂ε_i the sampler's own integration weight of step i's
    prediction (for DDIM/DPM-Solver-1, W_i = (α_{t_N}/α_{t_{i+1}}) σ_{t_{i+1}}
    (1 − e^{h_i}); multistep samplers carry it through their later steps): at most
    one network Jacobian per path, no Jacobian chain through the states.
    ∂L/∂z_i likewise for i in `steps` (0 elsewhere); ∂L/∂x_T and ∂L/∂noise flow
    through the linear part only.

    **Bias:** it drops every term of the exact gradient that passes through the
    network's Jacobian in x (what makes the full gradient's chain grow with N),
    and the θ-terms of the steps outside `steps`. With `steps` = all steps it is
    the "ε detached from x" gradient, not DTO's. **Cost:** one sampling pass plus
    one VJP per step in `steps`. **Memory:** the activations of the steps in
    `steps` only (and one scalar per step).

    **Arguments:** those of `aj.sample` (without `adjoint`), and `steps`: the step
    indices i ∈ {0, ..., N − 1} (negative ones count from the end: `(-1,)` is the
    last step) whose evaluations carry the gradient; a static sequence of ints (a
    new subset compiles anew).
    """
    try:
        steps = tuple(int(i) for i in steps)
    except TypeError:
        raise TypeError(
            f"`trajectory_surrogate(steps=...)` must be a sequence of ints; got {steps!r}."
        ) from None
    return sample(
        model, params, x_T, cond, schedule=schedule, ts=ts, sampler=sampler,
        adjoint=_TrajectorySurrogate(steps), key=key, noise=noise,
    )


class _TrajectorySurrogate(AbstractAdjoint):
    """`trajectory_surrogate`'s gradient, as a strategy of `aj.sample`."""

    steps: tuple[int, ...] = eqx.field(static=True)

    def check_sampler(self, sampler: AbstractSampler) -> None:
        del sampler

    def forward_mode_error(self) -> str | None:
        return None

    def loop(self, solve: Solve, theta, x_T, cond, noise):
        n = solve.num_steps
        active = sorted({i + n if i < 0 else i for i in self.steps})
        if not active or active[0] < 0 or active[-1] >= n:
            raise ValueError(
                f"`trajectory_surrogate(steps={self.steps!r})` must name at least one "
                f"step in 0, ..., N - 1 = {n - 1} (or -N, ..., -1)."
            )
        solve, theta = solve.closure_converted(theta, x_T, cond)
        constant = _Gated(solve.model, True)
        at_state = _Gated(solve.model, True, only_x=True)
        state, pos = None, 0

        def run(a, b, gated, state):
            part = dataclasses.replace(solve.sub(a, b), model=gated)
            c, z = solve.sub_inputs(cond, noise, a, b)
            return part.forward(theta, x_T, c, z, state0=state)[0]

        for i in active:
            if i > pos:
                state = run(pos, i, constant, state)
            state = run(i, i + 1, at_state, state)
            pos = i + 1
        if pos < n:
            state = run(pos, n, constant, state)
        return solve.sampler.output(state)
