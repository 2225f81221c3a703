"""The sampler interface.

A sampler is a one-step map on a *sampler state* (a pytree holding the current x_t
and whatever the scheme carries: a previous ε for a multistep method, an auxiliary
state for a reversible one). `aj.sample` runs

    state = sampler.init(x_T, schedule, ts)
    for i in range(N):                       # a lax.scan, never unrolled
        state = sampler.step(eps_i, schedule, state, ts[i], ts[i + 1], i, key)
    x_0 = sampler.output(state)

where `eps_i(x, t)` evaluates the ε-model with step i's conditioning. The adjoints
only rely on this interface (plus `is_sde`, and `AbstractReversibleSampler.step_back`
for the reversible ones), so a new sampler is one file.
"""

import abc
from collections.abc import Callable
from typing import ClassVar, Generic, TypeVar

import equinox as eqx
from jaxtyping import Array, PyTree

from .._schedule import AbstractSchedule


_State = TypeVar("_State")
EpsFn = Callable[[PyTree, Array], PyTree]


class AbstractSampler(eqx.Module, Generic[_State]):
    """Base class of the forward discretisations.

    Class attributes:

    - `order`: the order of convergence of the sampled x_0 (and of its exact discrete
        gradient) on smooth problems.
    - `is_sde`: whether the sampler discretises the reverse diffusion SDE (needs a
        `key`; its continuous adjoint carries the factor 2 of Theorem 2).
    - `evals_per_step`: model evaluations per step (NFE = N · evals_per_step, plus
        any start-up evaluations).
    """

    order: ClassVar[int]
    is_sde: ClassVar[bool]
    evals_per_step: ClassVar[int]

    @abc.abstractmethod
    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> _State:
        """The sampler state at `ts[0]` holding `x_T`.

        **Arguments:** `x_T` (the initial noise), `schedule`, `ts` (the time grid).

        **Returns:** a pytree of arrays; `output(init(x_T, ...))` must equal `x_T`.
        """

    @abc.abstractmethod
    def step(
        self,
        eps: EpsFn,
        schedule: AbstractSchedule,
        state: _State,
        t: Array,
        s: Array,
        i: Array,
        key: Array | None,
    ) -> _State:
        """One step from time `t` to the less noisy time `s < t`.

        **Arguments:**

        - `eps`: `eps(x, t)`, the ε-model with this step's conditioning bound in.
        - `schedule`: the noise schedule.
        - `state`: the sampler state at `t`.
        - `t`, `s`: the current and next times (scalars, `s < t`).
        - `i`: the step index (an int32 scalar), `0 <= i < N`.
        - `key`: the PRNG key of the solve for SDE samplers (step `i` must draw its
            noise from `jax.random.fold_in(key, i)` only), else `None`.

        **Returns:** the sampler state at `s`, of the same structure, shapes and dtypes.
        """

    @abc.abstractmethod
    def output(self, state: _State) -> PyTree:
        """The sample x held by `state`."""


class AbstractReversibleSampler(AbstractSampler[_State]):
    """A sampler whose step can be inverted algebraically: `step_back` recovers the
    state at `t` from the state at `s` exactly (to round-off), which lets
    `aj.ReversibleAdjoint` compute exact gradients in O(1) memory.

    Class attribute `step_back_cond_offset`: 0 when `step_back` for step i evaluates
    ε with step i's conditioning, k when it re-evaluates an ε that step i − k computed
    (with z_{i−k}), as reversible Heun does with k = 1. It only matters for
    `aj.Scheduled` conditioning.
    """

    step_back_cond_offset: ClassVar[int] = 0

    @abc.abstractmethod
    def step_back(
        self,
        eps: EpsFn,
        schedule: AbstractSchedule,
        state: _State,
        t: Array,
        s: Array,
        i: Array,
        key: Array | None,
    ) -> _State:
        """The inverse of `step`: `step_back(eps, schedule, step(eps, schedule, st, t,
        s, i, key), t, s, i, key) == st` up to round-off."""
