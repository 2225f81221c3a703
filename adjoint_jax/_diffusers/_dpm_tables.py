"""The training table, timestep spacings, `_sigma_to_t` index and output conversions
of `DPMSolverMultistepScheduler` (`_dpm_multistep.py`), in float64 NumPy."""

from typing import NamedTuple

import equinox as eqx
import jax.tree_util as jtu
import numpy as np

from .._model import AbstractPredictor
from .._schedule import AbstractSchedule
from ._config import betas_from_config


ZERO_SNR_ALPHA_BAR = 2.0**-24  # diffusers' ᾱ_{T−1} under rescale_betas_zero_snr


class Table(NamedTuple):
    """The training table: betas (of the ᾱ below), ᾱ_n, σ_n = √((1 − ᾱ_n)/ᾱ_n) and
    log σ_n, n = 0 … T − 1 (σ increasing)."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    sigmas: np.ndarray
    log_sigmas: np.ndarray


def train_table(config, name: str) -> Table:
    """`__init__`'s table in float64. Under `rescale_betas_zero_snr` diffusers replaces
    ᾱ_{T−1} = 0 by 2⁻²⁴ ("so the first σ is not inf"); that is reproduced where it
    keeps ᾱ decreasing (scaled-linear and cosine betas), and refused where it does
    not (linear betas: ᾱ_{T−2} ≈ 4e-9 < 2⁻²⁴)."""
    ab = np.cumprod(1.0 - betas_from_config(config))
    if config.get("rescale_betas_zero_snr", False):
        if not ab[-2] > ZERO_SNR_ALPHA_BAR:
            raise ValueError(
                f"`config['rescale_betas_zero_snr'] = True` ({name}) is not supported "
                f"for these betas: diffusers replaces ᾱ_(T−1) = 0 by 2⁻²⁴, above "
                f"ᾱ_(T−2) = {ab[-2]:.3g}, so its noise level would decrease at the "
                "last timestep (a negative beta): no VP schedule."
            )
        ab[-1] = ZERO_SNR_ALPHA_BAR
    betas = 1.0 - np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    sigmas = np.sqrt((1.0 - ab) / ab)
    return Table(betas, ab, sigmas, np.log(sigmas))


def spacing_timesteps(config, n: int, table: Table) -> np.ndarray:
    """The integer timesteps of `timestep_spacing` for n steps (n + 1 points built,
    the last dropped; "trailing" from the last one), below the last timestep whose
    log-SNR λ = log α − log σ is at least `lambda_min_clipped`."""
    T = int(config.get("num_train_timesteps", 1000))
    if n > T:
        raise ValueError(f"num_inference_steps={n} exceeds num_train_timesteps={T}.")
    ab = table.alphas_cumprod
    lam = np.log(np.sqrt(ab)) - np.log(np.sqrt(1.0 - ab))
    clip = float(config.get("lambda_min_clipped", -np.inf))
    last = T - int(np.searchsorted(lam[::-1], clip, side="left"))
    spacing = config.get("timestep_spacing", "linspace")
    if spacing == "linspace":
        steps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ratio = last // (n + 1)
        steps = (np.arange(0, n + 1) * ratio).round()[::-1][:-1]
        steps = steps + int(config.get("steps_offset", 0))
    else:  # "trailing" (the key table refuses other values)
        steps = np.arange(last, 0, -T / n).round() - 1
    steps = steps.astype(np.int64)
    if len(steps) == 0:
        raise ValueError(
            f"lambda_min_clipped={clip} leaves no timestep (its last timestep is "
            f"{last})."
        )
    return steps


def diffusers_index(sigmas, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' `_sigma_to_t`: the fractional training index of σ, log σ
    interpolated linearly between the two table entries around it (below the table:
    0; above: T − 1)."""
    log_s = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    lo = np.clip(np.searchsorted(log_sigmas, log_s, side="right") - 1, 0,
                 len(log_sigmas) - 2)
    w = np.clip((log_sigmas[lo] - log_s) / (log_sigmas[lo] - log_sigmas[lo + 1]), 0, 1)
    return (1.0 - w) * lo + w * (lo + 1)


def quantise(tau: np.ndarray, kind: str) -> np.ndarray:
    """Round (`np.round`, half to even) or truncate (diffusers' int64 cast) the
    fractional timesteps; truncation allows 64 ulps, so that an index that is an
    integer in exact arithmetic (the ramp's first σ, σ_max up to its round trip)
    stays that integer."""
    if kind == "round":
        return np.round(tau).astype(np.int64)
    slack = 64 * np.finfo(np.float64).eps * np.maximum(np.abs(tau), 1.0)
    return np.floor(tau + slack).astype(np.int64)


class Converted(AbstractPredictor):
    """diffusers' own output conversions where `aj.as_eps`' differ: a v-model on flow
    sigmas (x̂_0 = α x − σ v; or, for the noise-prediction algorithms, ε = α v + σ x:
    the VP formulas with the flow α, σ) and a flow-prediction model on VP sigmas
    (x̂_0 = x − (σ/α) u: diffusers' variance-exploding σ). The prediction the
    algorithm integrates (`primary`: "x0" or "eps") is diffusers'; the other follows
    from x = α x̂_0 + σ ε."""

    net: object
    schedule: AbstractSchedule
    kind: str = eqx.field(static=True)
    primary: str = eqx.field(static=True)

    def predict(self, params, x, t, cond):
        out = self.net(params, x, t, cond)
        out = jtu.tree_map(lambda o, v: o.astype(v.dtype), out, x)
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)

        def both(v, o):
            a, s = alpha.astype(v.dtype), sigma.astype(v.dtype)
            if self.kind == "flow":
                x0 = v - (s / a) * o
            elif self.primary == "x0":
                x0 = a * v - s * o
            else:
                e = a * o + s * v
                return e, (v - s * e) / a
            return (v - a * x0) / s, x0

        pairs = jtu.tree_map(both, x, out)
        is_pair = lambda p: isinstance(p, tuple)
        return (jtu.tree_map(lambda p: p[0], pairs, is_leaf=is_pair),
                jtu.tree_map(lambda p: p[1], pairs, is_leaf=is_pair))
