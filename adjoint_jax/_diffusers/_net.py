"""The network as a diffusers pipeline calls it, as an `aj.sample` model.

A pipeline calls `unet(scheduler.scale_model_input(latents, t), t, cond)`. In
`aj`'s state x (= α · the variance-exploding latents of the k-diffusion schedulers,
the latents themselves for the DDIM/DPM/UniPC/flow schedulers) the scaled input is
x itself for every scheduler whose `scale_model_input` divides by √(σ² + 1) or is
the identity; the timestep is a function of the noise level that each scheduler
computes its own way (`TimestepMap`), and the output is turned into ε by its
`prediction_type` (`aj.as_eps`).
"""

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .._misc import cast
from .._model import as_eps
from .._schedule import AbstractSchedule


_KINDS = ("log-index", "linear-index", "flow", "log-sigma", "table", "knots")
_QUANTISE = ("none", "round", "floor")


class TimestepMap(eqx.Module):
    """The timestep a scheduler passes to its network at an `aj` time t, from the
    noise level there (σ = e^{−λ(t)} for VP schedules, σ = t for flow matching):

    - `"log-index"`: diffusers' `_sigma_to_t`, the fractional training index whose
        log σ interpolates the training table linearly (`xs` = log training σ);
    - `"linear-index"`: the index whose σ interpolates the table linearly
        (`np.interp(timesteps, arange, sigmas)` inverted; `xs` = training σ);
    - `"flow"`: `scale` · σ (flow matching: 1000 σ);
    - `"log-sigma"`: `scale` · log σ (EDM's c_noise = ¼ log σ);
    - `"table"`: the timesteps `ys` given at times `xs` (increasing), interpolated
        linearly in t between them (pipeline-passed timesteps);
    - `"knots"`: the VP training index N t − 1 (t on `aj.VPDiscrete`'s knots).

    `quantise` then rounds (`"round"`) or truncates (`"floor"`, as diffusers' cast
    to int64 does) it to an int32; truncation allows the round-off of the grid's
    round trip (a few ulps of the timestep) so that an exact integer stays itself.
    """

    kind: str = eqx.field(static=True)
    quantise: str = eqx.field(static=True, default="none")
    xs: np.ndarray | None = None
    ys: np.ndarray | None = None
    scale: float = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        if self.kind not in _KINDS or self.quantise not in _QUANTISE:
            raise ValueError(f"invalid TimestepMap({self.kind!r}, {self.quantise!r})")

    def __call__(self, schedule: AbstractSchedule, t):
        dtype = jnp.result_type(t)
        if self.kind in ("log-index", "linear-index", "log-sigma"):
            log_sigma = -schedule.lam(t)
        if self.kind == "log-index":
            xs = cast(self.xs, dtype)
            tau = jnp.interp(log_sigma, xs, jnp.arange(xs.shape[0], dtype=dtype))
        elif self.kind == "linear-index":
            xs = cast(self.xs, dtype)
            tau = jnp.interp(jnp.exp(log_sigma), xs, jnp.arange(xs.shape[0], dtype=dtype))
        elif self.kind == "flow":
            tau = self.scale * t
        elif self.kind == "log-sigma":
            tau = self.scale * log_sigma
        elif self.kind == "table":
            tau = jnp.interp(t, cast(self.xs, dtype), cast(self.ys, dtype))
        else:
            tau = self.scale * t - 1.0
        if self.quantise == "round":
            return jnp.round(tau).astype(jnp.int32)
        if self.quantise == "floor":
            slack = 64 * jnp.finfo(dtype).eps * jnp.maximum(jnp.abs(tau), 1.0)
            return jnp.floor(tau + slack).astype(jnp.int32)
        return tau


class Network(eqx.Module):
    """`model(params, x, timestep, cond)` called with the pipeline's timestep."""

    model: Callable
    schedule: AbstractSchedule
    timestep: TimestepMap

    def __call__(self, params, x, t, cond):
        return self.model(params, x, self.timestep(self.schedule, t), cond)


PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow": "flow"}


def prediction_of(config, name: str, default: str = "epsilon") -> str:
    kind = config.get("prediction_type", default)
    if kind not in PREDICTIONS:
        raise ValueError(
            f"`config['prediction_type'] = {kind!r}` ({name}) is not supported; "
            f"supported: {tuple(k for k in PREDICTIONS if k != 'flow')}."
        )
    return kind


def network(model: Callable, schedule: AbstractSchedule, timestep: TimestepMap,
            prediction: str) -> Callable:
    """The network as an `aj.AbstractPredictor`: called with the pipeline's
    timestep, its output (`prediction` as diffusers names it, or "flow") turned into
    ε."""
    return as_eps(Network(model, schedule, timestep), schedule, PREDICTIONS[prediction])
