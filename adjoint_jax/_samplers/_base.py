"""The sampler interface.

A sampler is a one-step map on a *sampler state* (a pytree holding the current x_t
and whatever the scheme carries: a previous ε for a multistep method, an auxiliary
state for a reversible one). `aj.sample` runs

    state = sampler.init(x_T, schedule, ts)
    for i in range(N):                       # a lax.scan, never unrolled
        state = sampler.step(eps_i, schedule, state, ts[i], ts[i + 1], i, key)
    x_0 = sampler.output(state)

where `eps_i(x, t)` evaluates the ε-model with step i's conditioning. The adjoints
only rely on this interface and on the three refinements below, so a new sampler is
one file:

- `AbstractMultistepSampler`: an exponential integrator whose step evaluates ε once,
    at the current state, and combines it with at most one earlier ε (`update`);
    `aj.McCallumFoster` makes any such sampler reversible.
- `AbstractSDESampler`: a stochastic sampler, with the explicit approximate inverse
    of its step (`invert_step`) that the continuous adjoint uses to re-solve states.
- `AbstractReversibleSampler`: a sampler whose step is inverted exactly
    (`step_back`), for `aj.ReversibleAdjoint`.
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


class AbstractMultistepSampler(AbstractSampler[_State]):
    """An exponential integrator of the probability-flow ODE whose step t → s
    evaluates ε once, at the current x_t, and combines it with the ε of at most one
    earlier step (class attribute `memory`: 0 or 1):

        x_s = update(x_t, ε(x_t, t), ε_prev, t, s, r, first),

    where ε_prev was taken at the log-SNR λ_t − r·h (h = λ_s − λ_t). The update is
    also valid run backward (s > t, towards the noise), which is how
    `aj.McCallumFoster` uses it.
    """

    memory: ClassVar[int]

    @abc.abstractmethod
    def update(
        self,
        schedule: AbstractSchedule,
        x: PyTree,
        e: PyTree,
        e_prev: PyTree | None,
        t: Array,
        s: Array,
        r: Array | float,
        first: Array | bool,
    ) -> PyTree:
        """The step t → s of x from `e = ε(x, t)` and, when `memory == 1`, the earlier
        `e_prev` at λ_t − r·h. `first` (True on a solve's first step, where no earlier
        ε exists) makes the step use `e` alone; `e_prev` must then still be finite.
        """


class AbstractSDESampler(AbstractSampler[_State]):
    """A sampler of the reverse diffusion SDE, whose state is x alone. Besides its
    step it provides the explicit approximate inverse of that step, with the same
    noise replayed, which `aj.AdjointDEIS` uses to re-solve the states backward.
    """

    is_sde: ClassVar[bool] = True

    @abc.abstractmethod
    def invert_step(
        self,
        schedule: AbstractSchedule,
        x: PyTree,
        e: PyTree,
        t: Array,
        s: Array,
        i: Array,
        key: Array,
    ) -> PyTree:
        """From x at the less noisy time `t` back to the noisier time `s > t`,
        undoing forward step `i` (which went from s to t) with its noise replayed and
        with `e = ε(x, t)` standing in for the ε the forward step evaluated at s."""


class AbstractReversibleSampler(AbstractSampler[_State]):
    """A sampler whose step can be inverted algebraically: `step_back` recovers the
    state at `t` from the state at `s` exactly (to round-off), which lets
    `aj.ReversibleAdjoint` compute exact gradients in O(1) memory."""

    @abc.abstractmethod
    def step_back(
        self,
        eps: EpsFn,
        eps_prev: EpsFn,
        schedule: AbstractSchedule,
        state: _State,
        t: Array,
        s: Array,
        i: Array,
        key: Array | None,
    ) -> _State:
        """The inverse of `step`: `step_back(eps, eps_prev, schedule, step(eps,
        schedule, st, t, s, i, key), t, s, i, key) == st` up to round-off.

        `eps` evaluates ε with step i's conditioning; `eps_prev` with step i − 1's
        (step 0's when i = 0), for samplers that carry an ε evaluated by the previous
        step (reversible Heun) and must re-evaluate exactly that one.
        """
