"""Reading a diffusers scheduler config: which scheduler it names, which of its keys
change the numbers (reproduced, or refused by name with the reason), and the DDPM
betas it implies. No diffusers import: a config is a plain mapping.

Each scheduler family (one module of this package) declares a `Keys` table per
scheduler class: keys whose other values are refused, keys whose diffusers default
is itself refused, and the keys it reproduces. A key no table knows warns once per
(scheduler, key set), never per call.
"""

import math
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np


SCHEDULE_KEYS = frozenset({
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
    "rescale_betas_zero_snr",
})


class Keys(NamedTuple):
    """What a scheduler class's config keys mean to adjoint_jax.

    - `refused`: key → (values that are reproduced, why another value is not).
    - `defaults`: key → diffusers' default, for the keys of `refused` whose default
        is itself refused (a config without the key is read with it, and refused).
    - `known`: keys that are reproduced, or that matter only with a refused option.
    """

    refused: dict[str, tuple[tuple, str]]
    defaults: dict[str, Any]
    known: frozenset[str]


_WARNED: set[tuple[str, tuple[str, ...]]] = set()


def scheduler_name(config: Mapping[str, Any], scheduler: str | None, names) -> str:
    """The scheduler class `config` (or `scheduler=`) names, checked against `names`
    (the classes some family reproduces)."""
    if not isinstance(config, Mapping):
        raise TypeError(
            "a diffusers scheduler config must be a mapping (e.g. "
            f"`dict(pipe.scheduler.config)`); got {type(config).__name__}."
        )
    name = scheduler if scheduler is not None else config.get("_class_name")
    if name is None:
        raise ValueError(
            "name the diffusers scheduler: pass `scheduler=` (one of "
            f"{tuple(sorted(names))}); the config has no `_class_name`."
        )
    if name not in names:
        raise ValueError(
            f"diffusers scheduler {name!r} is not reproduced; supported: "
            f"{tuple(sorted(names))}."
        )
    return name


def check_keys(
    config: Mapping[str, Any], name: str, keys: Keys, elsewhere: frozenset = frozenset()
) -> None:
    """Raises for a key whose value changes the numbers in a way that is not
    reproduced; warns (once) about keys no table knows. Keys only other scheduler
    classes take (`elsewhere`) are ignored, as diffusers ignores them: a config carried
    over by `Cls.from_config(pipe.scheduler.config)` keeps the previous class's."""
    for key, (ok, why) in keys.refused.items():
        if key in config and config[key] not in ok:
            raise ValueError(
                f"`config[{key!r}] = {config[key]!r}` ({name}) is not supported: it "
                f"{why}. Supported: {', '.join(repr(v) for v in ok)}."
            )
        if key not in config and key in keys.defaults and keys.defaults[key] not in ok:
            raise ValueError(
                f"the config has no {key!r}, and {name}'s default "
                f"{key}={keys.defaults[key]!r} {why}, which is not reproduced; set "
                f"`config[{key!r}] = {ok[0]!r}` if the model was sampled without it."
            )
    known = set(keys.refused) | keys.known | SCHEDULE_KEYS | elsewhere
    unknown = tuple(sorted(k for k in config if not k.startswith("_") and k not in known))
    if unknown and (name, unknown) not in _WARNED:
        _WARNED.add((name, unknown))
        warnings.warn(
            f"diffusers config keys {list(unknown)} ({name}) are not known to "
            "adjoint_jax; if they change the sampler's numbers, the result will differ "
            "from diffusers'. (This warning is issued once.)",
            stacklevel=4,
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


def train_sigmas(config: Mapping[str, Any]) -> np.ndarray:
    """σ_n = √((1 − ᾱ_n)/ᾱ_n) of the N training timesteps (increasing; the
    variance-exploding noise levels the k-diffusion schedulers work with)."""
    ab = np.cumprod(1.0 - betas_from_config(config))
    with np.errstate(divide="ignore"):
        return np.sqrt((1.0 - ab) / ab)


def num_steps_arg(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"`num_inference_steps` must be a positive int; got {n!r}.")
    return int(n)
