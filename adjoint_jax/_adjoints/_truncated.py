"""Truncated backpropagation through the sampler: DRaFT-K and AlignProp."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._samplers._base import AbstractSampler
from ._base import AbstractAdjoint, Solve
from ._dto import DTO, refuse_second_order


_DETACH = ("state", "eps")


class Truncated(AbstractAdjoint):
    """Truncated backpropagation: the gradient through the last k steps only, the
    estimator of reward fine-tuning (DRaFT-K, AlignProp). It is **biased by
    design**: it is not the gradient of the sample, and it does not converge to it
    as the steps shrink.

    With N steps and the differentiated steps N − k, ..., N − 1:

    - **`detach="state"`** (DRaFT-K, Clark et al. 2024): the sampler state entering
        step N − k is a constant. θ, the conditioning and the step noises get the
        gradient of the last k steps alone; **∂L/∂x_T is exactly zero** (for k < N),
        and so is the gradient of the conditioning values and noises of the earlier
        steps. DRaFT-1 (`last=1`) is the common choice.
    - **`detach="eps"`** (AlignProp, Prabhudesai et al. 2023): in the earlier steps
        the model's predictions (ε, and x̂_0 when the model gives its own) are
        constants, so those steps contribute nothing to ∂L/∂θ or ∂L/∂z, but the state
        chain stays differentiable through the steps' linear part: x_T and the
        noises get a gradient (through the product of the steps' linear
        coefficients), θ the gradient of the last k steps.

    A zero-length step (a padded grid, `aj.adaptive_time_grid`) counts as one of
    the N steps: on a padded grid `last=k` differentiates the last k grid steps,
    the zero-length ones included (the identity; they contribute nothing).

    `last=k` is fixed; `last=(lo, hi)` with a `key` draws k uniformly from
    {lo, ..., hi} (`jax.random.randint(key, (), lo, hi + 1)`; `num_differentiated`
    gives the draw): DRaFT's random K, and AlignProp's randomised truncation (its
    `truncated_rand_backprop_minmax=(a, b)` over N steps is `last=(N − b, N − a)`).
    The key is an array, so a new draw (a new key each iteration, e.g.
    `jax.random.fold_in(key, it)`) does not recompile.

    **When to use it:** reward fine-tuning of θ or of the conditioning at scale,
    where the full gradient is too expensive or too noisy (its Jacobian chain grows
    with N and over-optimises); not for guidance through x_T with
    `detach="state"` (its x_T gradient is zero).

    **Memory:** the first N − hi steps store nothing (`detach="state"`: no
    derivative flows through them; `"eps"`: only their scalar coefficients). The
    last hi steps are differentiated by `inner` (`aj.DTO()` by default: their
    activations, O(hi); `aj.DTO(checkpoints="steps")`: their states). So memory is
    O(k) in the number of steps, flat in N.

    **Cost:** one sampling pass plus the backward pass of the last hi steps (with a
    random k, the steps before N − k among the last hi are differentiated and their
    contribution discarded: the cost of the bound, not of the draw).

    The differentiated steps start from the sampler's state mid-solve, which only
    `aj.DTO` (any `checkpoints`) continues from; the other exact strategy,
    `aj.ReversibleAdjoint`, already runs in O(1) memory over the whole solve.
    """

    last: int | tuple[int, int] = eqx.field(static=True)
    detach: str = eqx.field(default="state", static=True)
    inner: DTO = DTO()
    key: Array | None = None

    def __check_init__(self):
        last = self.last
        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
        if is_int(last):
            if last < 1:
                raise ValueError(
                    f"`Truncated(last=...)` must be a positive int (the number of "
                    f"differentiated steps); got {last!r}."
                )
            if self.key is not None:
                raise ValueError(
                    "`Truncated(key=...)` draws the number of steps from a range: pass "
                    "`last=(lo, hi)` with it, or drop `key` for a fixed `last`."
                )
        elif isinstance(last, tuple) and len(last) == 2 and all(map(is_int, last)):
            lo, hi = last
            if not 1 <= lo <= hi:
                raise ValueError(
                    f"`Truncated(last=(lo, hi))` needs 1 <= lo <= hi; got {last!r}."
                )
            if self.key is None:
                raise ValueError(
                    f"`Truncated(last={last!r})` draws k from a range and needs "
                    "`key=jax.random.key(...)`."
                )
        else:
            raise TypeError(
                "`Truncated(last=...)` must be an int k or a tuple (lo, hi) of ints; "
                f"got {self.last!r}."
            )
        if self.detach not in _DETACH:
            raise ValueError(
                f"`Truncated(detach=...)` must be 'state' (DRaFT-K) or 'eps' "
                f"(AlignProp); got {self.detach!r}."
            )
        if not isinstance(self.inner, DTO):
            raise TypeError(
                "`Truncated(inner=...)` must be an `aj.DTO(...)` (any `checkpoints`): "
                "the differentiated steps start from the sampler's state mid-solve, "
                f"which only DTO continues from; got {self.inner!r}. For O(1) memory "
                "over the whole solve use `aj.ReversibleAdjoint()` without Truncated."
            )
        if self.key is not None and not eqx.is_array(self.key):
            raise TypeError(
                f"`Truncated(key=...)` must be a JAX PRNG key such as "
                f"`jax.random.key(0)`; got {self.key!r}."
            )

    def _range(self) -> tuple[int, int]:
        last = self.last
        return (last, last) if isinstance(last, int) else last

    def num_differentiated(self) -> int | Array:
        """k, the number of differentiated steps: `last`, or its draw from `key`
        (an int32 array) for `last=(lo, hi)`."""
        lo, hi = self._range()
        if lo == hi and self.key is None:
            return lo
        return jax.random.randint(self.key, (), lo, hi + 1, dtype=jnp.int32)

    def check_sampler(self, sampler: AbstractSampler) -> None:
        self.inner.check_sampler(sampler)

    def forward_mode_error(self) -> str | None:
        return self.inner.forward_mode_error()

    def loop(self, solve: Solve, theta, x_T, cond, noise):
        n = solve.num_steps
        lo, hi = self._range()
        if hi > n:
            raise ValueError(
                f"`adjoint={self!r}` differentiates up to {hi} steps but the grid has "
                f"N = {n}: pass `last` <= N (`last=N` is `aj.DTO()`)."
            )
        # Every array the model closes over becomes an input (θ's first slot), so
        # that the detached steps detach it too (a closure over a traced value).
        solve, theta = solve.closure_converted(theta, x_T, cond)
        a = n - hi  # the steps before a are never differentiated
        state = None
        if a > 0:
            state = self._detached_steps(solve.sub(0, a), theta, x_T,
                                         *solve.sub_inputs(cond, noise, 0, a))
            cond, noise = solve.sub_inputs(cond, noise, a, n)
            solve = solve.sub(a, n)
        step = None if lo == hi else self._gated_step(solve, n - self.num_differentiated())
        state = self.inner.run(solve, theta, x_T, cond, noise, state0=state, step=step)
        return refuse_second_order(self.forward_mode_error(), solve.sampler.output(state))

    def _detached_steps(self, solve: Solve, theta, x_T, cond, noise):
        """The sampler state after the steps of `solve`, none of them differentiated
        (`"state"`) or with the model's predictions held constant (`"eps"`)."""
        if self.detach == "eps":
            solve = dataclasses.replace(solve, model=_Gated(solve.model, True))
            return solve.forward(theta, x_T, cond, noise)[0]
        arrays, static = eqx.partition(solve, eqx.is_array)
        solve = eqx.combine(_stop(arrays, True), static)
        state, _ = solve.forward(*_stop((theta, x_T, cond, noise), True))
        return _stop(state, True)

    # The random truncation, inside the differentiated steps: step i (global index)
    # with i < cut = N − k is detached. "state": the state entering step `cut` is
    # replaced by a constant of the same value, so nothing before it (state, θ, z_i,
    # noise_i, the schedule's coefficients) reaches the output's derivative; at
    # cut = 0 (k = N) nothing is cut, as with `last=N`. "eps": the model's inputs
    # are constants at the steps i < cut (its predictions then are), the steps'
    # linear part stays differentiable.
    def _gated_step(self, solve: Solve, cut):
        return _GatedStep(solve, cut, self.detach)


class _GatedStep(eqx.Module):
    """`solve.step` with step i < cut detached (see `Truncated._gated_step`). A
    module, not a closure: `aj.DTO(checkpoints=k)` passes it through a custom VJP,
    which must see its arrays (the solve's, a drawn `cut`) as inputs."""

    solve: Solve
    cut: int | Array
    detach: str = eqx.field(static=True)

    def __call__(self, theta, cond, state, xs, may_be_first=True):
        solve, cut = self.solve, self.cut
        i = xs[2]
        if self.detach == "state":
            here = (i == cut) & (cut > 0)
            state = _stop(state, here)
            return solve.step(theta, cond, state, xs, may_be_first)
        gated = dataclasses.replace(solve, model=_Gated(solve.model, i < cut))
        return gated.step(theta, cond, state, xs, may_be_first)


def _stop(tree: PyTree, flag) -> PyTree:
    """`tree` with its derivative stopped where `flag` (True, or a traced bool); its
    non-array leaves (a Python number in `cond`) are left as they are."""
    sg = jax.lax.stop_gradient
    if flag is True:
        return jtu.tree_map(lambda v: sg(v) if eqx.is_array(v) else v, tree)
    return jtu.tree_map(
        lambda v: jnp.where(flag, sg(v), v) if eqx.is_inexact_array(v) else v, tree
    )


class _Gated(eqx.Module):
    """The model call with its inputs (θ, x, t, z) held constant where `detached`:
    its predictions are then constants, whatever the caller does with x. With
    `only_x`, only x and t are held constant (the prediction stays a function of θ
    and z at a constant point)."""

    model: eqx.Module
    detached: bool | Array
    only_x: bool = eqx.field(default=False, static=True)

    def __call__(self, theta, x, t, z):
        stop = lambda tree: _stop(tree, self.detached)
        if self.only_x:
            return self.model(theta, stop(x), stop(t), z)
        return self.model(stop(theta), stop(x), stop(t), stop(z))


Truncated.__init__.__doc__ = """**Arguments:**

- `last`: k, the number of final steps differentiated (1 ≤ k ≤ N; `last=N` is
    `aj.DTO()`), or a pair `(lo, hi)` to draw k uniformly from {lo, ..., hi} with `key`.
- `detach`: `"state"` (DRaFT-K: the state entering the last k steps is a constant;
    ∂L/∂x_T = 0) or `"eps"` (AlignProp: the model's predictions of the earlier steps
    are constants, the state chain stays differentiable).
- `inner`: how the last steps are differentiated: `aj.DTO()` (default) or
    `aj.DTO(checkpoints="steps" | k)`.
- `key`: a JAX PRNG key, with `last=(lo, hi)` only.
"""
