"""The adjoint interface, and the pieces of a solve that every adjoint shares."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import index_tree
from .._model import ModelCall
from .._samplers._base import AbstractSampler
from .._schedule import AbstractSchedule


class Solve(eqx.Module):
    """Everything about one call of `aj.sample` except the differentiable inputs.

    The differentiable inputs travel separately as `theta` (a pair: the arrays of the
    model object, and `params`), `x_T` and `cond` (the constant conditioning pytree,
    or the stacked values of an `aj.Scheduled`; `scheduled` says which).
    """

    model: ModelCall
    schedule: AbstractSchedule
    ts: Array
    sampler: AbstractSampler
    key: Array | None
    scheduled: bool = eqx.field(static=True)

    @property
    def num_steps(self) -> int:
        return self.ts.shape[0] - 1

    def cond_at(self, cond: PyTree, i) -> PyTree:
        """Step i's conditioning value."""
        return index_tree(cond, i) if self.scheduled else cond

    def eps(self, theta, x, t, z):
        """ε_θ(x, z, t)."""
        return self.model(theta, x, t, z)

    def step_inputs(self, cond: PyTree):
        """The per-step scan inputs (t_i, t_{i+1}, i, z_i or None)."""
        n = self.num_steps
        idx = jnp.arange(n, dtype=jnp.int32)
        return (self.ts[:-1], self.ts[1:], idx, cond if self.scheduled else None)

    def step(self, theta, cond, state, xs):
        """Sampler step i given the scan inputs of `step_inputs`."""
        t, s, i, z = xs
        if not self.scheduled:
            z = cond
        eps = lambda x, tt: self.model(theta, x, tt, z)
        return self.sampler.step(eps, self.schedule, state, t, s, i, self.key)

    def forward(self, theta, x_T, cond, *, record: bool = False, remat: bool = False):
        """Runs the sampler; returns the final sampler state and, if `record`, the
        stacked samples x_{t_1}, ..., x_{t_N} after each step (leading axis N)."""

        def body(state, xs):
            new = self.step(theta, cond, state, xs)
            return new, (self.sampler.output(new) if record else None)

        if remat:
            body = jax.checkpoint(body)
        state0 = self.sampler.init(x_T, self.schedule, self.ts)
        return jax.lax.scan(body, state0, self.step_inputs(cond))


class AbstractAdjoint(eqx.Module):
    """Base class of the gradient strategies: how `aj.sample` is differentiated.

    All strategies give the same forward value (the sampler's x_0); they differ in the
    gradient they return, its cost and its memory.
    """

    @abc.abstractmethod
    def loop(self, solve: Solve, theta: PyTree, x_T: PyTree, cond: PyTree) -> PyTree:
        """Runs the sampler and returns x_0, differentiable with respect to `theta`,
        `x_T` and `cond` in the way this strategy defines.

        **Arguments:** `solve` (the static description of the solve), `theta` (the
        pair (model arrays, params)), `x_T`, `cond` (constant pytree, or the stacked
        per-step values when `solve.scheduled`).

        **Returns:** x_0, with the structure of `x_T`.
        """

    @abc.abstractmethod
    def check_sampler(self, sampler: AbstractSampler) -> None:
        """Raises a `ValueError` naming both this strategy and `sampler` if the
        combination makes no sense."""


def reject_differentiated(perturbed, names: str, adjoint) -> None:
    """Custom-VJP strategies give no gradient for the time grid or the schedule;
    differentiating them would be silently wrong, so refuse loudly."""
    if any(jtu.tree_leaves(perturbed)):
        raise ValueError(
            f"`adjoint={adjoint!r}` cannot differentiate with respect to {names}; "
            "use `adjoint=aj.DTO()` for gradients with respect to the time grid or "
            "the schedule."
        )


def materialise(out: PyTree, grad_obj: PyTree) -> PyTree:
    """The output cotangent with symbolic zeros (None) made explicit."""
    return jtu.tree_map(
        lambda o, g: jnp.zeros_like(o) if g is None else g,
        out,
        grad_obj,
        is_leaf=lambda g: g is None,
    )


def split_diff(tree: PyTree, wanted: bool):
    """(differentiable part or None, the rest) of `tree`; the differentiable part is
    its inexact arrays, when a gradient is wanted at all."""
    if not wanted:
        return None, tree
    return eqx.partition(tree, eqx.is_inexact_array)


def join(diff: PyTree, rest: PyTree) -> PyTree:
    return rest if diff is None else eqx.combine(diff, rest)
