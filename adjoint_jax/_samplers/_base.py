"""The sampler interface.

A sampler is a one-step map on a *sampler state* (a pytree holding the current x_t
and whatever the scheme carries: a previous ε for a multistep method, an auxiliary
state for a reversible one). `aj.sample` runs

    state = sampler.init(x_T, schedule, ts)
    for i in range(N):                       # a lax.scan, never unrolled
        state = sampler.step(eps_i, schedule, state, ts[i], ts[i + 1], i, noise_i)
    x_0 = sampler.output(state)

where `eps_i(x, t)` evaluates the ε-model with step i's conditioning (`eps_i.x0(x, t)`
and `eps_i.predict(x, t)` give the data prediction too; see `predict`) and `noise_i`
is step i's standard normal noise for a stochastic sampler (given as
`aj.sample(..., noise=...)` or drawn from `fold_in(key, i)`), else None. The
adjoints only rely on this interface and on the refinements below, so a new sampler
is one file:

- `AbstractMultistepSampler`: an exponential integrator whose step evaluates ε once,
    at the current state, and combines it with at most one earlier ε (`update`);
    `aj.McCallumFoster` makes any such sampler reversible.
- `AbstractOneStepSampler`: a one-step map of x (`advance`, in either direction)
    with any number of evaluations (`aj.ExpRK`); `aj.McCallumFoster` makes any such
    sampler reversible too.
- `AbstractSDESampler`: a stochastic sampler, with the explicit approximate inverse
    of its step (`invert_step`) that the continuous adjoint uses to re-solve states,
    its noise scale and the factor of its continuous adjoint.
- `AbstractReversibleSampler`: a sampler whose step is inverted exactly
    (`step_back`), for `aj.ReversibleAdjoint`.
"""

import abc
import math
from collections.abc import Callable
from typing import ClassVar, Generic, TypeVar

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._model import StepModel
from .._schedule import AbstractSchedule


_State = TypeVar("_State")
EpsFn = Callable[[PyTree, Array], PyTree]


def predict(eps: EpsFn, schedule: AbstractSchedule, x: PyTree, t: Array, derive=True):
    """(ε, x̂_0) at (x, t) from one model evaluation: the model's own data prediction
    when it has one (`aj.AbstractPredictor`), else x̂_0 = (x − σ_t ε)/α_t — or None
    with `derive=False` (for samplers that need x̂_0 only at α = 0, where a model
    without its own is refused). `eps` is the `StepModel` that `aj.sample` passes,
    or a plain function `eps(x, t)`."""
    if isinstance(eps, StepModel):
        return eps.predict(x, t, derive)
    e = eps(x, t)
    if not derive:
        return e, None
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    x0 = jtu.tree_map(
        lambda xx, ee: (xx - sigma.astype(xx.dtype) * ee) / alpha.astype(xx.dtype), x, e
    )
    return e, x0


class AbstractSampler(eqx.Module, Generic[_State]):
    """Base class of the forward discretisations.

    Class attributes (or properties, where they depend on the instance):

    - `order`: the order of convergence of the sampled x_0 (and of its exact discrete
        gradient) on smooth problems. (`aj.DPMSolverPP`'s is its argument; its
        default, diffusers', third-order update converges at order 2: see there.)
    - `is_sde`: whether the sampler is stochastic (needs a `key` or `noise`).
    - `evals_per_step`: model evaluations per step (NFE = N · evals_per_step, plus
        any start-up evaluations).
    - `steps_to_sigma_zero`: whether it can take a last step to σ = 0 (a grid ending
        at t = 0) without evaluating the model there.
    - `steps_from_alpha_zero`: whether it can take a first step from α = 0 (a grid
        starting at `schedule.alpha_zero_time`), from the model's data prediction.
    """

    order: ClassVar[int]
    is_sde: ClassVar[bool]
    evals_per_step: ClassVar[int]
    steps_to_sigma_zero: ClassVar[bool]
    steps_from_alpha_zero: ClassVar[bool]
    # Whether step 0 makes an extra (start-up) evaluation: `aj.sample` then runs
    # step 0 outside its scan and passes `eps.may_be_first = False` to the others.
    startup_eval: ClassVar[bool] = False

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
        noise: PyTree | None,
    ) -> _State:
        """One step from time `t` to the less noisy time `s < t`.

        **Arguments:**

        - `eps`: `eps(x, t)`, the ε-model with this step's conditioning bound in
            (see `predict` for the data prediction).
        - `schedule`: the noise schedule.
        - `state`: the sampler state at `t`.
        - `t`, `s`: the current and next times (scalars, `s < t`).
        - `i`: the step index (an int32 scalar), `0 <= i < N`.
        - `noise`: for a stochastic sampler, this step's standard normal noise (a
            pytree like x); the step must use no other randomness. None otherwise.

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
        x0: PyTree | None = None,
    ) -> PyTree:
        """The step t → s of x from `e = ε(x, t)` and, when `memory == 1`, the earlier
        `e_prev` at λ_t − r·h. `first` (True on a solve's first step, where no earlier
        ε exists) makes the step use `e` alone; `e_prev` must then still be finite.
        `x0`, the data prediction at (x, t), is needed only for a step from α = 0
        (where x and ε alone do not determine the step); a step to σ = 0 is the data
        prediction α_s x̂_0 and never second order.
        """


class AbstractOneStepSampler(AbstractSampler[PyTree]):
    """An explicit one-step sampler of the probability-flow ODE whose state is x
    alone and whose step is a map x_s = `advance(eps, schedule, x_t, t, s)`, valid in
    either direction (s > t steps back towards the noise), however many model
    evaluations it makes (a Runge–Kutta method's stages). `aj.McCallumFoster` makes
    any such sampler reversible through `interior_advance`.
    """

    @abc.abstractmethod
    def advance(self, eps: EpsFn, schedule: AbstractSchedule, x: PyTree, t, s) -> PyTree:
        """One step t → s of x, in either direction."""

    def interior_advance(self, eps: EpsFn, schedule: AbstractSchedule, x: PyTree, t, s):
        """`advance` between times of finite log-SNR, with its model evaluations
        made unconditionally, in a fixed order (no `lax.cond` around them), which
        the fused backward pass of `aj.ReversibleAdjoint` relies on. Defaults to
        `advance`."""
        return self.advance(eps, schedule, x, t, s)

    def init(self, x_T: PyTree, schedule: AbstractSchedule, ts: Array) -> PyTree:
        del schedule, ts
        return x_T

    def step(self, eps: EpsFn, schedule, state, t, s, i, noise):
        del i, noise
        return self.advance(eps, schedule, state, t, s)

    def output(self, state: PyTree) -> PyTree:
        return state


class AbstractSDESampler(AbstractSampler[_State]):
    """A stochastic sampler whose state is x alone and whose step is

        x_s = A x_t + B ε(x_t, t) + C ξ    (ξ the step's noise),

    a discretisation of the reverse-time SDE dx = [f x + (κ/2)(g²/σ) ε] dt + c g dw̄,
    whose continuous adjoint is the probability-flow one with the ε-terms multiplied
    by κ = `adjoint_factor` (Theorem 2 of the AdjointDEIS paper: κ = 2 for the reverse
    diffusion SDE). Besides its step it provides the explicit approximate inverse of
    that step (`invert_step`, which the continuous adjoint uses to re-solve states)
    and C (`noise_scale`, which gives ∂L/∂ξ = C a_x from the adjoint a_x).
    """

    @property
    @abc.abstractmethod
    def adjoint_factor(self) -> float:
        """κ: the continuous adjoint is the probability-flow ODE's with its ε-terms
        multiplied by κ."""

    @abc.abstractmethod
    def invert_step(
        self,
        schedule: AbstractSchedule,
        x: PyTree,
        e: PyTree,
        t: Array,
        s: Array,
        noise: PyTree,
    ) -> PyTree:
        """From x at the less noisy time `t` back to the noisier time `s > t`,
        undoing the forward step s → t with its `noise` replayed and with
        `e = ε(x, t)` standing in for the ε the forward step evaluated at s."""

    @abc.abstractmethod
    def noise_scale(self, schedule: AbstractSchedule, t: Array, s: Array) -> Array:
        """C of the step t → s (s < t): the factor of the step's noise."""


def round_off_growth(dtype, log_growth: float) -> float:
    """ε_mach of `dtype` times e^{log_growth} (the round-off left after an
    amplification by that factor), as a float that saturates at inf."""
    eps = float(jnp.finfo(dtype).eps)
    return math.exp(min(math.log(eps) + log_growth, 700.0))


class AbstractReversibleSampler(AbstractSampler[_State]):
    """A sampler whose step can be inverted algebraically: `step_back` recovers the
    state at `t` from the state at `s` exactly (to round-off), which lets
    `aj.ReversibleAdjoint` compute exact gradients in O(1) memory.

    Class attribute `rebuild` tells `aj.ReversibleAdjoint` how the model evaluations
    of `step_back` relate to those of `step`, which decides its backward cost:

    - `"shared"`: `step_back` of step i evaluates ε exactly at the points (and with
        the conditioning) where step i does, in reverse order (a start-up
        evaluation of step 0 that `step_back` does not repeat may come first in
        `step`). The backward pass then re-uses each rebuild evaluation for the
        step's VJP: one VJP per forward evaluation and nothing else.
    - `"previous"`: `step_back` of step i evaluates where step i − 1 did, at the end
        of its step (reversible Heun); fused with a shifted backward scan.
    - `"separate"` (default): no such relation; each step costs its `step_back`
        evaluations plus the VJP of the step (its evaluations again).
    """

    rebuild: ClassVar[str] = "separate"

    def shared_evaluations(self, num: int) -> tuple[int, ...]:
        """With `rebuild = "shared"` and `num` evaluations per step: for each model
        evaluation of `step`, in its order, the index (in `step_back`'s order) of
        the `step_back` evaluation made at the same point. Default: `step_back`
        evaluates in the reverse order of `step`."""
        return tuple(range(num - 1, -1, -1))

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
        noise: PyTree | None,
    ) -> _State:
        """The inverse of `step`: `step_back(eps, eps_prev, schedule, step(eps,
        schedule, st, t, s, i, noise), t, s, i, noise) == st` up to round-off.

        `eps` evaluates ε with step i's conditioning; `eps_prev` with step i − 1's
        (step 0's when i = 0), for samplers that carry an ε evaluated by the previous
        step (reversible Heun) and must re-evaluate exactly that one.
        """

    def precision_warning(self, num_steps: int, dtype) -> str | None:
        """Why `aj.ReversibleAdjoint`'s gradient may be more than 1e-3 (relative) off
        when this sampler's states, of floating `dtype` (32 or 64 bits), are rebuilt
        over `num_steps` steps: a sentence with the measured or predicted error, or
        None where the sampler is accurate (its docstring gives the measurements).
        `aj.ReversibleAdjoint` issues it as a warning at trace time (and warns about
        a 16-bit state for every sampler)."""
        del num_steps, dtype
        return None
