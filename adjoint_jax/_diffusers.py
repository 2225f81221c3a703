"""Reading HuggingFace diffusers scheduler configs: the schedule, the time grid that
`set_timesteps` would produce, the model's parameterisation and timestep convention,
and the matching sampler. No diffusers import: a config is a plain mapping (e.g.
`dict(pipe.scheduler.config)`, or the `scheduler_config.json` of a model).

Every config key that changes the numbers is either reproduced or refused with an
error naming it; keys that only matter when another, refused, option is on are
ignored; keys this module does not know raise a warning.
"""

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._model import as_eps
from ._samplers._base import AbstractSampler
from ._samplers._ddim import DDIM
from ._samplers._dpm_solver import DPMSolver1
from ._samplers._dpm_solver_pp import DPMSolverPP
from ._schedule import AbstractSchedule, FlowMatching, VPDiscrete


_VP = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler")
_FLOW = ("FlowMatchEulerDiscreteScheduler",)
_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
)
# key -> (value(s) that reproduce nothing special, why another value is refused)
_NEUTRAL: dict[str, dict[str, tuple[tuple, str]]] = {
    "DDIMScheduler": {
        "clip_sample": ((False,), "clamps x̂_0 to [−1, 1] at every step"),
        "thresholding": ((False,), "applies dynamic thresholding to x̂_0"),
    },
    "DDPMScheduler": {
        "clip_sample": ((False,), "clamps x̂_0 to [−1, 1] at every step"),
        "thresholding": ((False,), "applies dynamic thresholding to x̂_0"),
        "variance_type": (("fixed_small",), "only the posterior variance is reproduced"),
    },
    "DPMSolverMultistepScheduler": {
        "thresholding": ((False,), "applies dynamic thresholding to x̂_0"),
        "algorithm_type": (
            ("dpmsolver++", "deis"),
            "only dpmsolver++ (aj.DPMSolverPP) is reproduced; for the noise-prediction "
            "variant see aj.DPMSolver2",
        ),
        "euler_at_final": ((False,), "forces a first-order last step"),
        "use_karras_sigmas": ((False, None), "Karras sigmas are not reproduced"),
        "use_exponential_sigmas": ((False, None), "exponential sigmas are not reproduced"),
        "use_beta_sigmas": ((False, None), "beta sigmas are not reproduced"),
        "use_lu_lambdas": ((False, None), "uniform-λ sigmas are not reproduced"),
        "use_flow_sigmas": ((False, None), "flow sigmas are not reproduced"),
        "lambda_min_clipped": ((-math.inf,), "clips the grid's log-SNR"),
        "variance_type": ((None,), "learned variances are not reproduced"),
        "use_dynamic_shifting": ((False, None), "dynamic shifting needs a `mu`"),
        "rescale_betas_zero_snr": (
            (False, None),
            "diffusers then overwrites ᾱ_{T−1} with 2⁻²⁴, which makes the schedule "
            "non-monotone",
        ),
    },
    "FlowMatchEulerDiscreteScheduler": {
        "use_dynamic_shifting": ((False,), "dynamic shifting needs a `mu`"),
        "invert_sigmas": ((False,), "inverted sigmas are not reproduced"),
        "shift_terminal": ((None,), "a stretched terminal shift is not reproduced"),
        "use_karras_sigmas": ((False,), "Karras sigmas are not reproduced"),
        "use_exponential_sigmas": ((False,), "exponential sigmas are not reproduced"),
        "use_beta_sigmas": ((False,), "beta sigmas are not reproduced"),
        "stochastic_sampling": ((False,), "stochastic sampling is not reproduced"),
    },
}
# Keys whose diffusers default is one that is refused: a config without them is read
# with that default (as diffusers would), and so refused.
_DEFAULTS = {
    "DDIMScheduler": {"clip_sample": True},
    "DDPMScheduler": {"clip_sample": True},
}
# Keys that are reproduced (by a companion) or only matter with a refused option.
_KNOWN = {
    "DDIMScheduler": {
        "set_alpha_to_one", "steps_offset", "prediction_type", "timestep_spacing",
        "dynamic_thresholding_ratio", "clip_sample_range", "sample_max_value",
    },
    "DDPMScheduler": {
        "steps_offset", "prediction_type", "timestep_spacing",
        "dynamic_thresholding_ratio", "clip_sample_range", "sample_max_value",
    },
    "DPMSolverMultistepScheduler": {
        "solver_order", "prediction_type", "solver_type", "lower_order_final",
        "final_sigmas_type", "timestep_spacing", "steps_offset",
        "dynamic_thresholding_ratio", "sample_max_value", "flow_shift",
        "time_shift_type",
    },
    "FlowMatchEulerDiscreteScheduler": {
        "shift", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len",
        "time_shift_type",
    },
}


def _name(config: Mapping[str, Any], scheduler: str | None) -> str:
    if not isinstance(config, Mapping):
        raise TypeError(
            f"a diffusers scheduler config must be a mapping (e.g. "
            f"`dict(pipe.scheduler.config)`); got {type(config).__name__}."
        )
    name = scheduler if scheduler is not None else config.get("_class_name")
    if name is None:
        raise ValueError(
            "name the diffusers scheduler: pass `scheduler=` (one of "
            f"{_VP + _FLOW}); the config has no `_class_name`."
        )
    if name not in _VP + _FLOW:
        raise ValueError(
            f"diffusers scheduler {name!r} is not reproduced; supported: "
            f"{_VP + _FLOW}."
        )
    return name


def _check_keys(config: Mapping[str, Any], name: str) -> None:
    neutral = _NEUTRAL[name]
    defaults = _DEFAULTS.get(name, {})
    for key, (ok, why) in neutral.items():
        if key in config and config[key] not in ok:
            raise ValueError(
                f"`config[{key!r}] = {config[key]!r}` ({name}) is not supported: it "
                f"{why}. Supported: {ok[0]!r}."
            )
        if key not in config and key in defaults and defaults[key] not in ok:
            raise ValueError(
                f"the config has no {key!r}, and {name}'s default "
                f"{key}={defaults[key]!r} {why}, which is not reproduced; set "
                f"`config[{key!r}] = {ok[0]!r}` if the model was sampled without it."
            )
    known = set(neutral) | _KNOWN[name] | set(_SCHEDULE_KEYS)
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        warnings.warn(
            f"diffusers config keys {unknown} ({name}) are not known to adjoint_jax; "
            "if they change the sampler's numbers, the result will differ from "
            "diffusers'.",
            stacklevel=3,
        )


def betas_from_config(config: Mapping[str, Any]) -> np.ndarray:
    """The DDPM betas of a diffusers config, in float64 (diffusers computes them in
    float32; the two differ by ~1e-9, ~1e-7 in ᾱ), with `rescale_betas_zero_snr`
    applied (the last beta becomes exactly 1: ᾱ = 0 at t = 1)."""
    trained = config.get("trained_betas")
    n = int(config.get("num_train_timesteps", 1000))
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float64)
    else:
        start = float(config.get("beta_start", 0.0001))
        end = float(config.get("beta_end", 0.02))
        kind = config.get("beta_schedule", "linear")
        if kind == "linear":
            betas = np.linspace(start, end, n, dtype=np.float64)
        elif kind == "scaled_linear":
            betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            # diffusers' betas_for_alpha_bar with the cosine ᾱ, max_beta 0.999.
            def alpha_bar(t):
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = np.array(
                [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                dtype=np.float64,
            )
        else:
            raise ValueError(
                "`config['beta_schedule']` must be 'linear', 'scaled_linear' or "
                f"'squaredcos_cap_v2' (or give `trained_betas`); got {kind!r}."
            )
    if config.get("rescale_betas_zero_snr", False):
        # Lin et al. 2024: shift and scale √ᾱ so that its last value is 0 and its first
        # is unchanged (diffusers' rescale_zero_terminal_snr).
        sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
        first, last = sqrt_ab[0], sqrt_ab[-1]
        sqrt_ab = (sqrt_ab - last) * first / (first - last)
        ab = sqrt_ab**2
        alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
        betas = 1.0 - alphas
        betas[-1] = 1.0
    return betas


def diffusers_schedule(config: Mapping[str, Any], scheduler: str | None = None):
    """The schedule of a diffusers config: `aj.VPDiscrete` (its betas) for the DDIM,
    DDPM and DPM-Solver schedulers, `aj.FlowMatching()` for flow matching."""
    name = _name(config, scheduler)
    if name in _FLOW:
        return FlowMatching()
    return VPDiscrete(betas_from_config(config))


def _vp_timesteps(config, name: str, n: int) -> np.ndarray:
    """The integer timesteps `set_timesteps(n)` produces (diffusers' spacings)."""
    T = int(config.get("num_train_timesteps", 1000))
    spacing = config.get(
        "timestep_spacing", "linspace" if name == "DPMSolverMultistepScheduler" else "leading"
    )
    offset = int(config.get("steps_offset", 0))
    if n > T:
        raise ValueError(f"num_inference_steps={n} exceeds num_train_timesteps={T}.")
    dpm = name == "DPMSolverMultistepScheduler"
    m = n + 1 if dpm else n  # DPM builds n + 1 points and drops the last
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, m).round()[::-1]
    elif spacing == "leading":
        ratio = T // m
        ts = (np.arange(0, m) * ratio).round()[::-1] + offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        raise ValueError(
            "`config['timestep_spacing']` must be 'linspace', 'leading' or 'trailing'; "
            f"got {spacing!r}."
        )
    ts = ts.astype(np.int64)
    if dpm and spacing != "trailing":
        ts = ts[:-1]
    return ts


def diffusers_timesteps(
    config: Mapping[str, Any], num_inference_steps: int, scheduler: str | None = None
) -> Array:
    """The time grid `ts` (for `aj.sample`) on which a diffusers scheduler runs:
    the times of the timesteps `set_timesteps(num_inference_steps)` produces, and the
    time its last step goes to.

    - VP schedulers: timestep n is t = (n + 1)/T (`aj.VPDiscrete`'s knots). The last
        step goes to t = 0 (ᾱ = 1: DDIM's `set_alpha_to_one`, DDPM, DPM-Solver's
        `final_sigmas_type="zero"`) or to t = 1/T (ᾱ_0: `set_alpha_to_one=False`,
        `final_sigmas_type="sigma_min"`). DDIM steps from timestep n to
        n − T // num_inference_steps, so its spacing must make that the next
        timestep ('leading', or 'trailing' with num_inference_steps dividing T);
        where DDIM's last step would go from ᾱ_0 to ᾱ_0 (`set_alpha_to_one=False`
        ending at timestep 0) that identity step is dropped.
    - Flow matching: σ = t, from 1 (pure noise, `aj.FlowMatching().alpha_zero_time`)
        down to diffusers' σ_min (`shift` applied as diffusers applies it), then 0.

    **Returns:** a float array of length N + 1 (N = num_inference_steps, or N − 1 when
    an identity step was dropped), strictly decreasing.
    """
    name = _name(config, scheduler)
    _check_keys(config, name)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or (
        num_inference_steps < 1
    ):
        raise ValueError(
            f"`num_inference_steps` must be a positive int; got {num_inference_steps!r}."
        )
    n = num_inference_steps
    dtype = jnp.result_type(float)
    T = int(config.get("num_train_timesteps", 1000))
    if name in _FLOW:
        shift = float(config.get("shift", 1.0))
        sh = lambda s: shift * s / (1 + (shift - 1) * s)
        sigma_min = sh(1.0 / T)  # the 1000-point grid of __init__, shifted once
        sigmas = sh(np.linspace(1.0, sigma_min, n))  # and shifted again
        return jnp.asarray(np.concatenate([sigmas, [0.0]]), dtype)
    steps = _vp_timesteps(config, name, n)
    times = (steps + 1) / T
    if name == "DDIMScheduler":
        jump = T // n
        if np.any(steps[1:] != steps[:-1] - jump):
            raise ValueError(
                "DDIMScheduler steps from timestep n to n − num_train_timesteps // "
                f"num_inference_steps = n − {jump}, which is not the next timestep for "
                f"timestep_spacing={config.get('timestep_spacing', 'leading')!r} with "
                f"{n} steps ({steps.tolist()[:4]}...), so its evaluation and target "
                "times do not form one grid; use 'leading', or 'trailing' with "
                "num_inference_steps dividing num_train_timesteps."
            )
        last = steps[-1] - jump
        if last >= 0:
            end = (last + 1) / T
        elif config.get("set_alpha_to_one", True):
            end = 0.0
        else:
            end = 1.0 / T
        if end == times[-1]:  # ᾱ_0 to ᾱ_0: the identity
            return jnp.asarray(times, dtype)
    elif name == "DDPMScheduler":
        end = 0.0
    else:
        end = 0.0 if config.get("final_sigmas_type", "zero") == "zero" else 1.0 / T
        if end == times[-1]:
            raise ValueError(
                "DPMSolverMultistepScheduler's last timestep is 0 and its final sigma "
                "is sigma_min (the same noise level): a zero-length step."
            )
    return jnp.asarray(np.concatenate([times, [end]]), dtype)


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


class _FlowTimestep(eqx.Module):
    model: Callable
    num_train_timesteps: int = eqx.field(static=True)

    def __call__(self, params, x, t, cond):
        return self.model(params, x, self.num_train_timesteps * t, cond)


_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def diffusers_model(
    model: Callable, config: Mapping[str, Any], scheduler: str | None = None
) -> Callable:
    """A diffusers-trained network as an `aj.sample` model: its timestep convention
    (VP: the integer timestep, rounded by `aj.discrete_timestep_model`; flow matching:
    the float timestep 1000·σ) and its `prediction_type` ('epsilon', 'v_prediction',
    'sample'; flow models predict the velocity) turned into ε by `aj.as_eps`.

    **Arguments:** `model(params, x, timestep, cond)` as the network is called in
    the diffusers pipeline (after `scale_model_input`, which is the identity for
    these schedulers); `config` and `scheduler` as for `aj.diffusers_timesteps`.

    **Returns:** an `aj.AbstractPredictor` for `aj.sample`.
    """
    name = _name(config, scheduler)
    _check_keys(config, name)
    schedule = diffusers_schedule(config, name)
    T = int(config.get("num_train_timesteps", 1000))
    if name in _FLOW:
        return as_eps(_FlowTimestep(model, T), schedule, "flow")
    kind = config.get("prediction_type", "epsilon")
    if kind not in _PREDICTION:
        raise ValueError(
            f"`config['prediction_type'] = {kind!r}` is not supported; supported: "
            f"{tuple(_PREDICTION)}."
        )
    return as_eps(discrete_timestep_model(model, T), schedule, _PREDICTION[kind])


def diffusers_sampler(
    config: Mapping[str, Any], scheduler: str | None = None, *, eta: float = 0.0
) -> AbstractSampler:
    """The sampler that reproduces a diffusers scheduler's steps: `aj.DDIM(eta)` for
    `DDIMScheduler` (η is `step`'s argument in diffusers), `aj.DDIM(eta=1.0)` for
    `DDPMScheduler` (the posterior), `aj.DPMSolverPP(solver_order, solver_type,
    lower_order_final)` for `DPMSolverMultistepScheduler`, `aj.DPMSolver1()` (the
    Euler step of the velocity) for `FlowMatchEulerDiscreteScheduler`."""
    name = _name(config, scheduler)
    _check_keys(config, name)
    if name == "DDIMScheduler":
        return DDIM(eta=eta)
    if name == "DDPMScheduler":
        return DDIM(eta=1.0)
    if name in _FLOW:
        return DPMSolver1()
    solver_type = config.get("solver_type", "midpoint")
    if solver_type in ("logrho", "bh1", "bh2"):  # diffusers maps these to midpoint
        solver_type = "midpoint"
    return DPMSolverPP(
        order=int(config.get("solver_order", 2)),
        solver_type=solver_type,
        lower_order_final=bool(config.get("lower_order_final", True)),
    )


class DiffusersSetup(NamedTuple):
    """What `aj.from_diffusers` returns: `aj.sample(setup.model, params, x_T, cond,
    schedule=setup.schedule, ts=setup.ts, sampler=setup.sampler, ...)` reproduces the
    diffusers scheduler's loop."""

    schedule: AbstractSchedule
    ts: Array
    sampler: AbstractSampler
    model: Callable | None


def from_diffusers(
    config: Mapping[str, Any],
    num_inference_steps: int,
    *,
    model: Callable | None = None,
    scheduler: str | None = None,
    eta: float = 0.0,
) -> DiffusersSetup:
    """Everything `aj.sample` needs to reproduce a diffusers scheduler, from its
    config: the schedule (`aj.diffusers_schedule`), the grid
    (`aj.diffusers_timesteps`), the sampler (`aj.diffusers_sampler`) and, if `model`
    is given, the network adapted to `aj.sample` (`aj.diffusers_model`).

    **Arguments:**

    - `config`: the scheduler's config mapping (`dict(pipe.scheduler.config)`, or a
        `scheduler_config.json` loaded with `json.load`).
    - `num_inference_steps`: as for `set_timesteps`.
    - `model`: optional, `model(params, x, timestep, cond)` as the pipeline calls it.
    - `scheduler`: the scheduler's class name, if the config has no `_class_name`.
    - `eta`: DDIM's η (its `step` argument).

    Keys that change the numbers and are not reproduced raise an error naming them
    (e.g. `clip_sample=True`, `use_karras_sigmas=True`, `thresholding=True`).

    !!! Example

        ```python
        setup = aj.from_diffusers(dict(pipe.scheduler.config), 25, model=unet_fn)
        x0 = aj.sample(setup.model, params, x_T, text_emb, schedule=setup.schedule,
                       ts=setup.ts, sampler=setup.sampler)
        ```
    """
    name = _name(config, scheduler)
    return DiffusersSetup(
        schedule=diffusers_schedule(config, name),
        ts=diffusers_timesteps(config, num_inference_steps, name),
        sampler=diffusers_sampler(config, name, eta=eta),
        model=None if model is None else diffusers_model(model, config, name),
    )
