"""The adjoint interface, the pieces of a solve that every adjoint shares, and the one
custom-VJP engine that every custom-gradient strategy plugs into.

A custom-gradient strategy (`AbstractCustomAdjoint`) supplies two methods:

- `forward(solve, theta, x_T, cond) -> (x_0, residuals)`: run the sampler and keep
    what the backward pass needs;
- `backward(solve, residuals, ct_x0, diff, x_T) -> (ct_theta, ct_x_T, ct_cond)`:
    the cotangents of the differentiated inputs (`diff` says which leaves of θ and of
    the conditioning are being differentiated; the others need no work).

The engine (`custom_vjp_loop`) does everything else once: it closure-converts the
model (so closed-over jit/vmap/grad tracers become explicit inputs, differentiated
like `params`), packs the differentiable inputs and the rest, refuses loudly to
differentiate what no custom strategy can (the time grid, the schedule, the
sampler's fields), materialises symbolic-zero output cotangents, and casts every
cotangent back to its primal's dtype.
"""

import abc
import dataclasses
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import cast_like, index_tree, step_noise
from .._model import ModelCall, StepModel, closure_convert
from .._samplers._base import AbstractSampler, AbstractSDESampler
from .._schedule import AbstractSchedule


# Zero-length steps. A grid may repeat a time (ts[i] == ts[i + 1]): that step is the
# exact identity for every sampler and strategy (`aj.adaptive_time_grid` pads its grids
# so). Every loop, forward and backward, takes such a step as `lax.cond(zero, keep,
# step)`: with one grid for the whole batch the step is skipped (no evaluation), its
# value is its input bitwise and its derivative the identity in the state and zero in
# θ, z and the noise. Under a `vmap` over grids the condition is batched and JAX
# computes both branches and selects; the step is then computed with the times of
# the nearest step of nonzero length (the last one before it, else the first after
# it), so that nothing divides by its zero log-SNR length, and what it reads is cut
# from the gradient where it is not used (`block_if_zero`), so that an infinite
# partial derivative inside the discarded step (a multistep sampler's memory,
# inconsistent with the borrowed times) cannot turn a zero cotangent into NaN.
def zero_length_steps(ts: Array) -> tuple[Array, Array, Array]:
    """For each step of the grid `ts`: (t, s) to compute it with, and whether it has
    zero length (see above)."""
    ts = jnp.asarray(ts)  # (a NumPy grid in an exported VJP's backward pass)
    t, s = ts[:-1], ts[1:]
    zero = t == s
    n = t.shape[0]
    idx = jnp.arange(n, dtype=jnp.int32)
    before = jax.lax.cummax(jnp.where(zero, -1, idx))
    after = jax.lax.cummin(jnp.where(zero, n - 1, idx), reverse=True)
    src = jnp.where(before >= 0, before, after)
    return t[src], s[src], zero


def block_if_zero(zero: Array, tree: PyTree) -> PyTree:
    """`tree`, with no gradient flowing back through it where the step has zero
    length (its value unchanged)."""
    return jtu.tree_map(
        lambda a: jnp.where(zero, jax.lax.stop_gradient(a), a)
        if eqx.is_inexact_array(a) else a,
        tree,
    )


def _unless_zero(zero: Array, step: Callable, keep: Callable, args: tuple):
    """`step(*args)` for a step of nonzero length, each input blocked by
    `block_if_zero`; `keep()` for a zero-length one. (`lax.cond` traces `step`'s
    branch first.)"""
    # Only arrays pass through the cond; the rest (a Python number in `cond`, which
    # the closure-converted model was traced with) stays static.
    dynamic, static = eqx.partition(args, eqx.is_array)
    return jax.lax.cond(
        jnp.logical_not(zero),
        lambda d: step(*block_if_zero(zero, eqx.combine(d, static))),
        lambda _: keep(),
        dynamic,
    )


def skip_if_zero(zero: Array, step: Callable, old: PyTree, *args) -> PyTree:
    """`step(*args)` for a step of nonzero length, `old` (of the same structure) for
    a zero-length one, each input of `step` blocked by `block_if_zero`."""
    return _unless_zero(zero, step, lambda: old, args)


class _BlockedModel(eqx.Module):
    """The model call with its outputs blocked (`block_if_zero`) on a zero-length
    step: θ and z, which reach a step only through the model, then get no
    cotangent from it (without a parameter-sized select per step)."""

    model: Callable
    zero: Array

    def __call__(self, theta, x, t, z):
        return block_if_zero(self.zero, self.model(theta, x, t, z))


def _spec(tree: PyTree) -> PyTree:
    return jtu.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def skip_body_if_zero(zero: Array, body: Callable, carry: PyTree, *args):
    """For a scan body `body(carry, *args) -> (carry, out)`: the body for a step of
    nonzero length, `(carry, zeros like out)` for a zero-length one (its inputs
    blocked by `block_if_zero`, as in `skip_if_zero`)."""
    # The zeros need `out`'s shapes. `lax.cond` traces the body's branch first: its
    # trace records them and the other branch reads them, rather than an
    # `eval_shape` tracing the whole body (model, step, VJP) once more (~12% of the
    # test matrix's tracing). Should the branches be traced in the other order, or
    # one alone (`jax.disable_jit`), `eval_shape` supplies them as before.
    shapes = []

    def step(*a):
        new_carry, out = body(*a)
        shapes.append(_spec(out))
        return new_carry, out

    def keep():
        out = shapes[0] if shapes else _spec(jax.eval_shape(body, carry, *args)[1])
        return carry, jtu.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), out)

    return _unless_zero(zero, step, keep, (carry, *args))


class Solve(eqx.Module):
    """Everything about one call of `aj.sample` except the differentiable inputs.

    The differentiable inputs travel separately as `theta` (a pair: the arrays of the
    model callable, and `params`), `x_T`, `cond` (the constant conditioning pytree,
    or the stacked values of an `aj.Scheduled`; `scheduled` says which) and `noise`
    (the stacked per-step noises given as `aj.sample(..., noise=...)`, or None: then
    stochastic samplers draw step i's from `fold_in(key, i)`).
    """

    model: ModelCall
    schedule: AbstractSchedule
    ts: Array
    sampler: AbstractSampler
    key: Array | None
    scheduled: bool = eqx.field(static=True)
    # Whether the grid starts at α = 0 / ends at σ = 0 (known when `ts` is concrete;
    # see `aj.sample`).
    starts_at_alpha_zero: bool = eqx.field(default=False, static=True)
    ends_at_sigma_zero: bool = eqx.field(default=False, static=True)
    # The index of this solve's first step in the sampler's count (0 unless it is a
    # `sub` solve): samplers and key-drawn noise see global step indices.
    first_index: int = eqx.field(default=0, static=True)
    # Whether the grid may have zero-length steps (False when `aj.sample` saw a
    # concrete grid without any: then every loop is exactly the plain one, no cond
    # or select), and whether they are skipped by a `lax.cond` (True where JAX's
    # autodiff does not differentiate the forward loop; see `step`).
    zero_steps: bool = eqx.field(default=True, static=True)
    skip_zero_steps: bool = eqx.field(default=False, static=True)

    @property
    def num_steps(self) -> int:
        return self.ts.shape[0] - 1

    def interior(self) -> tuple[int, int]:
        """(a, b): the steps a, ..., b − 1 that touch no endpoint of infinite log-SNR
        (a = 1 after a first step from α = 0, b = N − 1 before a last step to σ = 0)."""
        n = self.num_steps
        return int(self.starts_at_alpha_zero), n - int(self.ends_at_sigma_zero)

    def sub(self, a: int, b: int) -> "Solve":
        """The solve of steps a, ..., b − 1 alone (times ts[a], ..., ts[b]); slice the
        conditioning and noise with `sub_inputs`."""
        return dataclasses.replace(
            self,
            ts=self.ts[a : b + 1],
            starts_at_alpha_zero=False,
            ends_at_sigma_zero=False,
            first_index=self.first_index + a,
        )

    def sub_inputs(self, cond: PyTree, noise: PyTree, a: int, b: int):
        """Steps a, ..., b − 1's conditioning (when scheduled) and explicit noise."""
        cut = lambda tree: jtu.tree_map(lambda v: v[a:b], tree)
        return (cut(cond) if self.scheduled else cond), (
            None if noise is None else cut(noise)
        )

    def closure_converted(self, theta, x_T, cond) -> tuple["Solve", PyTree]:
        """This solve and θ with every array the model closes over (jit or vmap
        tracers included) hoisted into θ's first slot (`closure_convert`), so that a
        custom VJP or a `stop_gradient` on θ reaches them too."""
        model, theta = closure_convert(
            self.model, theta, x_T, self.ts[0], self.cond_at(cond, 0)
        )
        return dataclasses.replace(self, model=model), theta

    def cond_at(self, cond: PyTree, i) -> PyTree:
        """Step i's conditioning value."""
        return index_tree(cond, i) if self.scheduled else cond

    def noise_at(self, noise: PyTree, i, like: PyTree) -> PyTree:
        """Step i's noise (i counted within this solve): `noise[i]` when given, else
        drawn from `fold_in(key, first_index + i)` in the time grid's dtype (so float32
        and float64 solves see the same noise), or None for a deterministic
        sampler."""
        if noise is not None:
            return index_tree(noise, i)
        if not self.sampler.is_sde:
            return None
        return step_noise(self.key, self.first_index + i, like, self.ts.dtype)

    def eps(self, theta, x, t, z):
        """ε_θ(x, z, t)."""
        return self.model(theta, x, t, z)[0]

    def eps_fn(self, theta, z, may_be_first: bool = True) -> StepModel:
        """The model as a sampler sees it, with θ and the conditioning value z bound
        in: `eps(x, t)`, `eps.x0(x, t)`, `eps.predict(x, t)`. `may_be_first=False`
        tells a sampler with a start-up evaluation that this is not step 0."""
        return StepModel(self.model, self.schedule, theta, z, may_be_first)

    def step_inputs(self, cond: PyTree, noise: PyTree = None):
        """The per-step scan inputs (t_i, t_{i+1}, i, z_i or None, noise_i or None),
        with a zero-length step's times replaced as `zero_length_steps` says."""
        n = self.num_steps
        idx = jnp.arange(self.first_index, self.first_index + n, dtype=jnp.int32)
        t, s, _ = zero_length_steps(self.ts)
        return (
            t,
            s,
            idx,
            cond if self.scheduled else None,
            noise,
        )

    def step(self, theta, cond, state, xs, may_be_first: bool = True):
        """Sampler step i given the scan inputs of `step_inputs`."""
        t, s, i, z, noise = xs
        if not self.scheduled:
            z = cond
        if noise is None and self.sampler.is_sde:
            noise = step_noise(self.key, i, self.sampler.output(state), self.ts.dtype)
        first = may_be_first and self.first_index == 0
        if not self.zero_steps:
            eps = StepModel(self.model, self.schedule, theta, z, first)
            return self.sampler.step(eps, self.schedule, state, t, s, i, noise)
        j = i - self.first_index  # `t`, `s` are the times to compute the step with
        ts = jnp.asarray(self.ts)
        zero = ts[j] == ts[j + 1]
        # A zero-length step is skipped by a `lax.cond` where JAX's autodiff does not
        # differentiate the loop (`skip_zero_steps`: the custom strategies' forward
        # passes); under a vmap over grids JAX computes both branches and selects.
        # Where autodiff differentiates it (aj.DTO(), Truncated), a differentiated
        # cond in the scan made the gradient 1.5-2× slower on every grid, so the step
        # is computed and discarded by `jnp.where` instead (a padded grid then costs
        # its padding's evaluations). Either way, what the step reads is blocked
        # (`block_if_zero`): the state, the noise, the times and the schedule
        # directly, θ and z at the model's outputs (blocking θ itself, a
        # parameter-sized select per step, cost DTO another 1.6×).

        def step(state_, noise_, t_, s_, schedule):
            eps = StepModel(_BlockedModel(self.model, zero), schedule, theta, z, first)
            return self.sampler.step(eps, schedule, state_, t_, s_, i, noise_)

        args = (state, noise, t, s, self.schedule)
        if self.skip_zero_steps:
            return skip_if_zero(zero, step, state, *args)
        new = step(*block_if_zero(zero, args))
        return jtu.tree_map(lambda a, b: jnp.where(zero, a, b), state, new)

    def forward(
        self,
        theta,
        x_T,
        cond,
        noise=None,
        *,
        record: bool = False,
        remat: bool = False,
        state0=None,
        step=None,
    ):
        """Runs the sampler; returns the final sampler state and, if `record`, the
        stacked samples x_{t_1}, ..., x_{t_N} after each step (leading axis N).
        `state0` replaces `sampler.init(x_T, ...)` (to continue a solve); `step`
        replaces `self.step` (same signature)."""
        step = self.step if step is None else step

        def make_body(may_be_first):
            def body(state, xs):
                new = step(theta, cond, state, xs, may_be_first)
                return new, (self.sampler.output(new) if record else None)

            return jax.checkpoint(body) if remat else body

        xs = self.step_inputs(cond, noise)
        if state0 is not None or not self.sampler.startup_eval or self.first_index:
            if state0 is None:
                state0 = self.sampler.init(x_T, self.schedule, self.ts)
            return jax.lax.scan(make_body(True), state0, xs)
        # A sampler with a start-up evaluation (reversible Heun, leapfrog) runs step 0
        # outside the scan, so the scanned steps carry no `lax.cond` for it (whose
        # residuals a differentiated scan would otherwise store at every step).
        state = self.sampler.init(x_T, self.schedule, self.ts)
        state, y0 = make_body(True)(state, jtu.tree_map(lambda a: a[0], xs))
        state, ys = jax.lax.scan(make_body(False), state, jtu.tree_map(lambda a: a[1:], xs))
        if record:
            ys = jtu.tree_map(lambda a, b: jnp.concatenate([a[None], b]), y0, ys)
        return state, ys


class AbstractAdjoint(eqx.Module):
    """Base class of the gradient strategies: how `aj.sample` is differentiated.

    All strategies give the same forward value (the sampler's x_0); they differ in the
    gradient they return, its cost and its memory.
    """

    @abc.abstractmethod
    def loop(
        self, solve: Solve, theta: PyTree, x_T: PyTree, cond: PyTree, noise: PyTree
    ) -> PyTree:
        """Runs the sampler and returns x_0, differentiable with respect to `theta`,
        `x_T`, `cond` and `noise` in the way this strategy defines.

        **Arguments:** `solve` (the static description of the solve), `theta` (the
        pair (model arrays, params)), `x_T`, `cond` (constant pytree, or the stacked
        per-step values when `solve.scheduled`), `noise` (the stacked per-step noises
        given to `aj.sample`, or None).

        **Returns:** x_0, with the structure of `x_T`.
        """

    @abc.abstractmethod
    def check_sampler(self, sampler: AbstractSampler) -> None:
        """Raises a `ValueError` naming both this strategy and `sampler` if the
        combination makes no sense."""

    @abc.abstractmethod
    def forward_mode_error(self) -> str | None:
        """`None` if forward-mode differentiation (`jax.jvp`, `jax.jacfwd`) works
        through this strategy; otherwise the reason, in the strategy's own words,
        ending with the way to get forward-mode derivatives (`aj.DTO()`)."""


def refuse_nonsmooth(adjoint: AbstractAdjoint, sampler: AbstractSampler) -> None:
    """Raises for a sampler whose step is not a discretisation of the smooth
    probability-flow ODE/SDE (`aj.DDIM(clip_sample=...)`, `thresholding=`: its
    `continuous_adjoint_error` says why), which the continuous adjoints, AdjointDPM
    and the reversible adjoint assume."""
    why = getattr(sampler, "continuous_adjoint_error", None)
    if why is not None:
        hint = "" if "`adjoint=aj.DTO()`" in why else (
            " Use `adjoint=aj.DTO()` (its exact gradient, almost everywhere) or "
            "`aj.Truncated`."
        )
        raise ValueError(
            f"`adjoint={adjoint!r}` cannot differentiate `sampler={sampler!r}`: "
            f"{why}.{hint}"
        )


def refuse_non_sde_stochastic(adjoint: AbstractAdjoint, sampler: AbstractSampler) -> None:
    """Raises for a stochastic sampler that is not an `AbstractSDESampler`: the
    continuous adjoint of its step and its noise scale are not defined."""
    if sampler.is_sde and not isinstance(sampler, AbstractSDESampler):
        raise ValueError(
            f"`adjoint={adjoint!r}` cannot be used with `sampler={sampler!r}`: its "
            "stochastic step is not an `AbstractSDESampler` (its state is not x "
            "alone, so its continuous adjoint and noise scale are not defined); use "
            "`adjoint=aj.DTO()`."
        )


FORWARD_MODE_HINT = (
    " For forward-mode derivatives of x_0 (jax.jvp, jax.jacfwd) use "
    "`adjoint=aj.DTO()` (or `aj.DTO(checkpoints='steps')`)."
)


class Differentiated(eqx.Module):
    """Which leaves of θ, of the conditioning and of the explicit noise are being
    differentiated: `theta`, `cond` and `noise` hold those leaves (None elsewhere, or
    None altogether when nothing is differentiated), `theta_rest`, `cond_rest` and
    `noise_rest` the others. A backward pass returns cotangents shaped like `theta`,
    `cond` and `noise`."""

    theta: PyTree
    theta_rest: PyTree
    cond: PyTree
    cond_rest: PyTree
    noise: PyTree
    noise_rest: PyTree

    @staticmethod
    def split(
        theta, theta_perturbed, cond, cond_perturbed, noise, noise_perturbed
    ) -> "Differentiated":
        theta_d, theta_rest = _split(theta, theta_perturbed)
        cond_d, cond_rest = _split(cond, cond_perturbed)
        noise_d, noise_rest = _split(noise, noise_perturbed)
        return Differentiated(theta_d, theta_rest, cond_d, cond_rest, noise_d, noise_rest)

    def noise_full(self) -> PyTree:
        """The explicit noise (None when the solve draws it from its key)."""
        return _join(self.noise, self.noise_rest)

    def theta_with(self, theta_d: PyTree) -> PyTree:
        """θ with its differentiated leaves replaced by `theta_d`."""
        return _join(theta_d, self.theta_rest)

    def cond_with(self, cond_d: PyTree, cond_rest: PyTree | None = None) -> PyTree:
        """The conditioning with its differentiated leaves replaced by `cond_d`
        (for one step of a scheduled conditioning pass that step's `cond_rest`)."""
        return _join(cond_d, self.cond_rest if cond_rest is None else cond_rest)

    def cond_rest_at(self, solve: Solve, i) -> PyTree:
        return solve.cond_at(self.cond_rest, i)

    def cond_at(self, solve: Solve, i) -> PyTree:
        return solve.cond_at(self.cond, i)


def _split(tree, perturbed):
    if not any(jtu.tree_leaves(perturbed)):
        return None, tree
    return eqx.partition(tree, perturbed)


def _join(diff: PyTree, rest: PyTree) -> PyTree:
    return rest if diff is None else eqx.combine(diff, rest)


def materialise(out: PyTree, grad_obj: PyTree) -> PyTree:
    """The output cotangent with symbolic zeros (None) made explicit."""
    return jtu.tree_map(
        lambda o, g: jnp.zeros_like(o) if g is None else g,
        out,
        grad_obj,
        is_leaf=lambda g: g is None,
    )


class AbstractCustomAdjoint(AbstractAdjoint):
    """Base of the strategies with a backward pass of their own (continuous adjoints,
    the reversible adjoint, AdjointDPM). They plug into one custom-VJP engine by
    supplying `forward` and `backward`; a new one is a file with those two methods
    (plus `check_sampler` and `forward_mode_error`).

    Gradients with respect to the time grid, the schedule or the sampler's fields
    are refused with an error (use `aj.DTO()`); everything else the output depends
    on (`params`, `x_T`, `cond`, the arrays of an Equinox `model`, and any array the
    model closes over, traced or not) is differentiated.
    """

    def loop(self, solve: Solve, theta, x_T, cond, noise):
        return custom_vjp_loop(self, solve, theta, x_T, cond, noise)

    @abc.abstractmethod
    def forward(
        self, solve: Solve, theta, x_T, cond, noise
    ) -> tuple[PyTree, PyTree]:
        """Runs the sampler; returns `(x_0, residuals)` with whatever the backward
        pass needs (any pytree of arrays)."""

    @abc.abstractmethod
    def backward(
        self,
        solve: Solve,
        residuals: PyTree,
        ct_x0: PyTree,
        diff: Differentiated,
        x_T: PyTree,
    ) -> tuple[PyTree, PyTree, PyTree, PyTree]:
        """The cotangents `(ct_theta, ct_x_T, ct_cond, ct_noise)` given the output
        cotangent `ct_x0` (shaped like x_0, zeros made explicit). `ct_theta`,
        `ct_cond` and `ct_noise` are shaped like `diff.theta`, `diff.cond` and
        `diff.noise` (None leaves stay None; the stacked per-step values when
        `solve.scheduled`), in any floating dtype (the engine casts them to the
        inputs' dtypes). A strategy that cannot give ∂L/∂noise raises an error when
        `diff.noise` is not None."""


def custom_vjp_loop(
    adjoint: AbstractCustomAdjoint, solve: Solve, theta, x_T, cond, noise
):
    # Closure conversion first: after it, every array the output depends on is an
    # explicit input (θ's first slot holds the model's closed-over arrays). Only
    # arrays cross the custom VJP: a Python number in `params` or `cond` (a guidance
    # scale `cond=(emb, 7.5)`) stays a static constant, as it is for `aj.DTO()`
    # (`filter_custom_vjp` would turn it into an array that the closure-converted
    # model, traced with the number, does not accept). Under `jax.grad` with respect
    # to it, it arrives as a tracer, an array like any other.
    solve, theta = solve.closure_converted(theta, x_T, cond)
    arrays, static = eqx.partition((theta, x_T, cond, noise, solve), eqx.is_array)
    return _custom_loop(arrays, static, adjoint)


@eqx.filter_custom_vjp
def _custom_loop(inputs, static, adjoint):
    # Not differentiated: just the sampler (every strategy has its forward value),
    # nothing kept for a backward pass.
    del adjoint
    theta, x_T, cond, noise, solve = eqx.combine(inputs, static)
    solve = dataclasses.replace(solve, skip_zero_steps=True)
    state, _ = solve.forward(theta, x_T, cond, noise)
    return solve.sampler.output(state)


def _refuse_undifferentiable(perturbed_solve, adjoint) -> None:
    """Custom strategies give no gradient for the time grid, the schedule or the
    sampler's fields; returning zero would be silently wrong, so refuse loudly."""
    names = [
        name
        for name, part in (
            ("the time grid `ts`", perturbed_solve.ts),
            ("the schedule's parameters", perturbed_solve.schedule),
            ("the sampler's fields", perturbed_solve.sampler),
        )
        if any(jtu.tree_leaves(part))
    ]
    if names:
        raise ValueError(
            f"`adjoint={adjoint!r}` cannot differentiate with respect to "
            f"{' or '.join(names)}; use `adjoint=aj.DTO()` for gradients with respect "
            "to the time grid, the schedule or the sampler."
        )


@_custom_loop.def_fwd
def _custom_loop_fwd(perturbed, inputs, static, adjoint):
    _refuse_undifferentiable(perturbed[4], adjoint)
    theta, x_T, cond, noise, solve = eqx.combine(inputs, static)
    solve = dataclasses.replace(solve, skip_zero_steps=True)
    return adjoint.forward(solve, theta, x_T, cond, noise)


@_custom_loop.def_bwd
def _custom_loop_bwd(residuals, grad_obj, perturbed, inputs, static, adjoint):
    theta, x_T, cond, noise, solve = eqx.combine(inputs, static)
    ct_x0 = materialise(x_T, grad_obj)  # x_0 has x_T's structure and dtypes
    # The static leaves (Python numbers) are not differentiated: False there.
    perturbed = eqx.combine(perturbed, jtu.tree_map(lambda _: False, static))
    diff = Differentiated.split(
        theta, perturbed[0], cond, perturbed[2], noise, perturbed[3]
    )
    ct_theta, ct_x_T, ct_cond, ct_noise = adjoint.backward(
        solve, residuals, ct_x0, diff, x_T
    )
    none_like = lambda tree: jtu.tree_map(lambda _: None, tree)
    floats = lambda tree: eqx.filter(tree, eqx.is_inexact_array)

    def out(ct, d, full):
        return none_like(floats(full)) if d is None else cast_like(ct, d)

    return (
        out(ct_theta, diff.theta, inputs[0]),
        cast_like(ct_x_T, x_T),
        out(ct_cond, diff.cond, inputs[2]),
        out(ct_noise, diff.noise, noise),
        none_like(floats(inputs[4])),
    )
