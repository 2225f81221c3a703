"""`aj.from_diffusers` and its companions: the one entry point that reads a diffusers
scheduler config and dispatches to the family module reproducing its class."""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree

from .._samplers._base import AbstractSampler
from .._schedule import AbstractSchedule, VPDiscrete
from . import (
    _cogvideox,
    _ddim,
    _deis,
    _dpm_multistep,
    _dpm_sde,
    _dpm_singlestep,
    _edm,
    _euler,
    _flow_match,
    _heun,
    _kdpm2,
    _lcm,
    _lms,
    _pndm,
    _unipc,
)
from ._config import betas_from_config, check_keys, num_steps_arg, scheduler_name
from ._family import Family


# The one registry: every family module, each reproducing the classes of its `keys`.
FAMILIES: tuple[Family, ...] = (
    _ddim.FAMILY,
    _cogvideox.FAMILY,
    _dpm_multistep.FAMILY,
    _flow_match.FAMILY,
    _lcm.FAMILY,
    _euler.FAMILY,
    _heun.FAMILY,
    _kdpm2.FAMILY,
    _lms.FAMILY,
    _dpm_singlestep.FAMILY,
    _deis.FAMILY,
    _dpm_sde.FAMILY,
    _unipc.FAMILY,
    _pndm.FAMILY,
    _edm.FAMILY,
)
_BY_NAME = {name: fam for fam in FAMILIES for name in fam.keys}
_ALL_KEYS = frozenset(
    k for fam in FAMILIES for ks in fam.keys.values() for k in (*ks.refused, *ks.known)
)


def _family(config: Mapping[str, Any], scheduler: str | None) -> tuple[Family, str]:
    name = scheduler_name(config, scheduler, _BY_NAME)
    family = _BY_NAME[name]
    check_keys(config, name, family.keys[name], _ALL_KEYS)
    return family, name


def _scale(tree: PyTree, factor: float) -> PyTree:
    if factor == 1.0:
        return tree
    return jtu.tree_map(lambda v: v * jnp.asarray(factor, jnp.result_type(v)), tree)


class DiffusersSetup(NamedTuple):
    """What `aj.from_diffusers` returns.

    `setup.final(aj.sample(setup.model, params, setup.initial(z), cond,
    schedule=setup.schedule, ts=setup.ts, sampler=setup.sampler, noise=noises))` is
    the pipeline's final latents.

    - `schedule`, `ts`, `sampler`: for `aj.sample`.
    - `model`: the network adapted to `aj.sample` (None if no `model` was given).
    - `init_scale`: `initial(z) = init_scale · z` maps the pipeline's standard-normal
        draw (before `init_noise_sigma`) to `aj`'s x_T.
    - `final_scale`: `final(x) = final_scale · x` maps `aj`'s last state to the
        pipeline's final latents (1 wherever the last noise level is 0).
    """

    schedule: AbstractSchedule
    ts: Array
    sampler: AbstractSampler
    model: Callable | None
    init_scale: float = 1.0
    final_scale: float = 1.0

    def initial(self, z: PyTree) -> PyTree:
        """x_T from the pipeline's standard-normal draw `z`."""
        return _scale(z, self.init_scale)

    def final(self, x: PyTree) -> PyTree:
        """The pipeline's final latents from `aj.sample`'s output `x`."""
        return _scale(x, self.final_scale)


def _plan(config, num_steps, scheduler, sigmas, timesteps, mu, eta):
    family, name = _family(config, scheduler)
    if num_steps is not None:
        num_steps = num_steps_arg(num_steps)
    elif sigmas is None and timesteps is None:
        raise ValueError("pass `num_steps`, or the pipeline's `sigmas` or `timesteps`.")
    as_np = lambda a: None if a is None else np.asarray(a, np.float64)
    plan = family.plan(
        config, name, num_steps, sigmas=as_np(sigmas), timesteps=as_np(timesteps),
        mu=None if mu is None else float(mu), eta=eta,
    )
    ts = np.asarray(plan.ts, np.float64)
    if ts.ndim != 1 or not np.all(np.diff(ts) < 0):
        raise AssertionError(f"{name}: the grid is not strictly decreasing: {ts}")
    return family, name, plan


def diffusers_schedule(config: Mapping[str, Any], scheduler: str | None = None):
    """The schedule of a diffusers config: `aj.VPDiscrete` (its betas, computed in
    float64) for the DDPM-trained schedulers, `aj.FlowMatching()` for flow matching.

    A config that names no scheduler (no `_class_name`, no `scheduler=`) is read as
    DDPM betas: `num_train_timesteps` (default 1000), and either `trained_betas` or
    `beta_start`, `beta_end` and `beta_schedule` in "linear", "scaled_linear" or
    "squaredcos_cap_v2"; `rescale_betas_zero_snr=True` is honoured (ᾱ = 0 exactly
    at t = 1)."""
    if isinstance(config, Mapping) and scheduler is None and "_class_name" not in config:
        return VPDiscrete(betas_from_config(config))
    family, name = _family(config, scheduler)
    return family.schedule(config, name)


def diffusers_timesteps(
    config: Mapping[str, Any],
    num_inference_steps: int | None,
    scheduler: str | None = None,
    *,
    sigmas=None,
    timesteps=None,
    mu: float | None = None,
) -> Array:
    """The time grid `ts` (for `aj.sample`) on which a diffusers scheduler runs after
    `set_timesteps(num_inference_steps, sigmas=, timesteps=, mu=)`: the times of the
    noise levels it steps through, and the time its last step goes to.

    - VP schedulers on integer timesteps: timestep n is t = (n + 1)/T
        (`aj.VPDiscrete`'s knots); a σ-grid (Karras, exponential, …) is mapped by
        λ = −log σ. The last step goes to t = 0 (σ = 0) or to the scheduler's σ_min.
    - Flow matching: t = σ, from 1 (pure noise) down to diffusers' last σ, then 0.

    **Returns:** a float array of length N + 1 (N = the number of steps the
    scheduler takes, fewer where an identity step is dropped), strictly
    decreasing, computed in float64 and returned in JAX's default float dtype.
    """
    _, _, plan = _plan(config, num_inference_steps, scheduler, sigmas, timesteps, mu, 0.0)
    return jnp.asarray(plan.ts, jnp.result_type(float))


def diffusers_sampler(
    config: Mapping[str, Any],
    scheduler: str | None = None,
    *,
    eta: float = 0.0,
    num_inference_steps: int = 10,
) -> AbstractSampler:
    """The sampler that reproduces a diffusers scheduler's steps (see
    `aj.from_diffusers`; `eta` is DDIM's `step` argument). A few schedulers' samplers
    depend on the step count (`num_inference_steps`)."""
    _, _, plan = _plan(config, num_inference_steps, scheduler, None, None, None, eta)
    return plan.sampler


def diffusers_model(
    model: Callable, config: Mapping[str, Any], scheduler: str | None = None
) -> Callable:
    """A diffusers-trained network as an `aj.sample` model: called with the timestep
    the scheduler passes (integer or fractional, each scheduler's own map from the
    noise level), its output (`prediction_type`: 'epsilon', 'v_prediction',
    'sample'; flow models predict the velocity) turned into ε by `aj.as_eps`.

    **Arguments:** `model(params, x, timestep, cond)` as the network is called in
    the diffusers pipeline (its input `scale_model_input(latents, t)`); `config` and
    `scheduler` as for `aj.diffusers_timesteps`.

    **Returns:** an `aj.AbstractPredictor` for `aj.sample`.
    """
    family, name = _family(config, scheduler)
    return family.network(model, config, name)


class _DiscreteTimestep(eqx.Module):
    model: Callable
    num_train_timesteps: int = eqx.field(static=True)

    def __call__(self, params, x, t, cond):
        # Timestep n sits at t = (n + 1)/T; round (never truncate) back to n.
        n = jnp.round(self.num_train_timesteps * t - 1.0).astype(jnp.int32)
        return self.model(params, x, n, cond)


def discrete_timestep_model(model: Callable, num_train_timesteps: int = 1000) -> Callable:
    """Adapts a network that takes diffusers' integer timesteps (a UNet trained with a
    `DDPMScheduler`) to `aj.sample`'s continuous t on `aj.VPDiscrete`:
    `model(params, x, n, cond)` is called with n = round(T t − 1) as int32 (timestep n
    sits at t = (n + 1)/T; rounding, never truncation, so that t in float32 maps to
    the right n).

    **Returns:** `adapted(params, x, t, cond)` (an `eqx.Module`); wrap it with
    `aj.as_eps` for a non-ε parameterisation, or use `aj.diffusers_model`.
    """
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int):
        raise TypeError(
            f"`num_train_timesteps` must be an int; got {num_train_timesteps!r}."
        )
    return _DiscreteTimestep(model, num_train_timesteps)


def from_diffusers(
    config: Mapping[str, Any],
    num_steps: int | None = None,
    *,
    model: Callable | None = None,
    sigmas=None,
    timesteps=None,
    mu: float | None = None,
    scheduler: str | None = None,
    eta: float = 0.0,
) -> DiffusersSetup:
    """Everything `aj.sample` needs to run a diffusers scheduler's loop exactly,
    from its config, mirroring `set_timesteps(num_inference_steps, sigmas=,
    timesteps=, mu=)`.

    **Arguments:**

    - `config`: the scheduler's config mapping (`dict(pipe.scheduler.config)`, or a
        `scheduler_config.json` loaded with `json.load`).
    - `num_steps`: `num_inference_steps`; may be None when `sigmas` or `timesteps`
        are given (as the pipeline passes them).
    - `model`: optional, `model(params, latents_in, timestep, cond)`: the network
        exactly as the pipeline calls it (`latents_in` =
        `scheduler.scale_model_input(latents, t)`, `timestep` the scheduler's own
        value, output per `prediction_type`).
    - `sigmas`, `timesteps`, `mu`: as the pipeline passes them to `set_timesteps`
        (FLUX.1-schnell's `sigmas`, FLUX.1-dev's `mu`, …), where the scheduler takes
        them.
    - `scheduler`: the scheduler's class name, if the config has no `_class_name`.
    - `eta`: DDIM's η (its `step` argument).

    **Returns:** an `aj.DiffusersSetup`:

        x0 = setup.final(aj.sample(setup.model, params, setup.initial(z), cond,
                                   schedule=setup.schedule, ts=setup.ts,
                                   sampler=setup.sampler, noise=noises))

    is the pipeline's final latents, for `z` the pipeline's standard-normal draw
    before `init_noise_sigma` and `noises[i]` the i-th standard normal the scheduler
    draws (stochastic samplers). Keys that change the numbers and are not reproduced
    raise an error naming them; unknown keys warn once.

    !!! Example

        ```python
        setup = aj.from_diffusers(dict(pipe.scheduler.config), 25, model=unet_fn)
        latents = setup.final(aj.sample(
            setup.model, params, setup.initial(z), text_emb,
            schedule=setup.schedule, ts=setup.ts, sampler=setup.sampler))
        ```
    """
    family, name, plan = _plan(config, num_steps, scheduler, sigmas, timesteps, mu, eta)
    family = plan.family or family
    return DiffusersSetup(
        schedule=family.schedule(config, name),
        ts=jnp.asarray(plan.ts, jnp.result_type(float)),
        sampler=plan.sampler,
        model=None if model is None else family.network(model, config, name),
        init_scale=float(plan.init_scale),
        final_scale=float(plan.final_scale),
    )
