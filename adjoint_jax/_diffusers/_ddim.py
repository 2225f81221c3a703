"""`DDIMScheduler`, `DDPMScheduler` and `CogVideoXDDIMScheduler`: `aj.DDIM` on the
integer timesteps of `set_timesteps` (t = (n + 1)/T on `aj.VPDiscrete`).

- DDIM: `aj.DDIM(eta)`, with `clip_sample` / `thresholding` on x̂_0 (its ε stays the
    model's: diffusers' default `use_clipped_model_output=False`).
- DDPM: the posterior step, `aj.DDIM(eta=1)`; `variance_type="fixed_large"` is
    `aj.DDIM(eta=1, variance="fixed_large")`, and with `clip_sample` / `thresholding`
    ε is re-derived from the transformed x̂_0 (`clipped_eps=True`: DDPM's mean uses x̂_0
    and x_t). Custom `timesteps=` are reproduced (its steps go to the next timestep).
    For "fixed_small" diffusers clamps the variance to 1e-20, so a last step to
    ᾱ = 1 from a timestep > 0 ('trailing', `steps_offset`) adds 1e-10 ξ; the plan
    reproduces it (`aj.DDIM(eta=1, variance="fixed_small", final_noise=True)`).
- CogVideoX: ᾱ ↦ ᾱ/(s + (1 − s) ᾱ) (`snr_shift_scale` s), then zero terminal SNR on ᾱ
    itself, and a deterministic DDIM step (it ignores η and `clip_sample`).
"""

import numpy as np

from .._samplers._ddim import DDIM
from .._schedule import VPDiscrete
from ._config import Keys, betas_from_config
from ._family import Family, Plan, refuse_args
from ._net import TimestepMap, network, prediction_of


_X0_KEYS = frozenset({
    "clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio",
    "sample_max_value",
})
_KNOWN = frozenset({"steps_offset", "prediction_type", "timestep_spacing"}) | _X0_KEYS
_DDPM_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
                   "fixed_large": "fixed_large"}
_COGVIDEOX = {  # CogVideoXDDIMScheduler's beta defaults
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
}


def vp_timesteps(config, name: str, n: int, *, extra: bool = False) -> np.ndarray:
    """The integer timesteps of `set_timesteps(n)` for DDIM/DDPM spacings (with
    `extra`, DPM-Solver's: n + 1 points built and the last dropped)."""
    T = int(config.get("num_train_timesteps", 1000))
    spacing = config.get("timestep_spacing", "linspace" if extra else "leading")
    offset = int(config.get("steps_offset", 0))
    if n > T:
        raise ValueError(f"num_inference_steps={n} exceeds num_train_timesteps={T}.")
    m = n + 1 if extra else n
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, m).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, m) * (T // m)).round()[::-1] + offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        raise ValueError(
            "`config['timestep_spacing']` must be 'linspace', 'leading' or 'trailing'; "
            f"got {spacing!r}."
        )
    ts = ts.astype(np.int64)
    if extra and spacing != "trailing":
        ts = ts[:-1]
    return ts


def knots_network(model, config, schedule, default_prediction="epsilon", name=""):
    T = int(config.get("num_train_timesteps", 1000))
    kind = prediction_of(config, name, default_prediction)
    return network(model, schedule, TimestepMap("knots", "round", scale=float(T)), kind)


def _refuse(key, value, why):
    raise ValueError(f"`config[{key!r}] = {value!r}` is not supported: it {why}.")


def x0_options(config) -> dict:
    """`aj.DDIM`'s options on x̂_0 from diffusers' `thresholding` (which takes
    precedence, as in diffusers' `step`) or `clip_sample` (default True)."""
    if config.get("thresholding", False):
        ratio = float(config.get("dynamic_thresholding_ratio", 0.995))
        top = float(config.get("sample_max_value", 1.0))
        if not 0 < ratio <= 1:
            _refuse("dynamic_thresholding_ratio", ratio, "is not a quantile in (0, 1]")
        if not top > 0:
            _refuse("sample_max_value", top, "divides x̂_0 by a threshold ≤ 0")
        return {"thresholding": (ratio, top)}
    if config.get("clip_sample", True):
        limit = float(config.get("clip_sample_range", 1.0))
        if not limit > 0:
            _refuse("clip_sample_range", limit, "clamps x̂_0 to an empty interval")
        return {"clip_sample": limit}
    return {}


def cogvideox_betas(config) -> np.ndarray:
    """CogVideoX's ᾱ as betas: ᾱ of its own beta defaults, shifted by
    `snr_shift_scale` s (ᾱ/(s + (1 − s) ᾱ)), then rescaled to zero terminal SNR on √ᾱ
    (`rescale_betas_zero_snr`, applied to ᾱ after the shift)."""
    base = {k: v for k, v in config.items() if k != "rescale_betas_zero_snr"}
    ab = np.cumprod(1.0 - betas_from_config(_COGVIDEOX | base))
    s = float(config.get("snr_shift_scale", 3.0))
    ab = ab / (s + (1 - s) * ab)
    if config.get("rescale_betas_zero_snr", False):
        root = np.sqrt(ab)
        first, last = root[0], root[-1]
        ab = ((root - last) * first / (first - last)) ** 2
    betas = 1.0 - np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    if ab[-1] == 0:
        betas[-1] = 1.0
    return betas


def _ddim_targets(config, steps, n: int, name: str):
    """Where each DDIM step goes, as times: timestep steps[i] − T // n, or ᾱ = 1
    (`set_alpha_to_one`) / ᾱ_0 below 0. Returns (the grid's end, the per-step
    targets where they are not the next timestep, else None)."""
    T = int(config.get("num_train_timesteps", 1000))
    spacing = config.get("timestep_spacing", "leading")
    jump = T // n
    prev = steps - jump
    final = 0.0 if config.get("set_alpha_to_one", True) else 1.0 / T
    times = np.where(prev >= 0, (prev + 1) / T, final)
    if np.all(prev[:-1] == steps[1:]):
        return float(times[-1]), None
    if spacing != "trailing":
        raise ValueError(
            f"{name} with timestep_spacing={spacing!r} and {n} steps is not "
            "supported (`config['timestep_spacing']`): its step goes from timestep "
            f"n to n − num_train_timesteps // num_inference_steps = n − {jump}, far "
            "from the "
            f"next timestep ({steps.tolist()[:4]}...), and diffusers' DDIM itself "
            "supports only 'leading' or 'trailing'."
        )
    # 'trailing' timesteps are T/n apart up to rounding: a step lands one timestep
    # off the next one, which is then evaluated at its own timestep.
    return float(times[-1]), tuple(float(v) for v in times)


def _custom_steps(timesteps, T: int, name: str) -> np.ndarray:
    steps = np.asarray(timesteps, np.float64)
    if steps.ndim != 1 or steps.size == 0 or np.any(steps != np.round(steps)):
        raise ValueError(
            f"{name}: `timesteps` must be a 1-D list of integers; got {steps}."
        )
    if np.any(np.diff(steps) >= 0) or steps[0] >= T or steps[-1] < 0:
        raise ValueError(
            f"{name}: `timesteps` must be descending integers in [0, {T}); got {steps}."
        )
    return steps.astype(np.int64)


def _zero_length_clip(opts) -> None:
    key = "thresholding" if "thresholding" in opts else "clip_sample"
    raise ValueError(
        f"`config['set_alpha_to_one'] = False` with `{key}` and a last timestep of 0 "
        "is not supported: diffusers' last step then goes from ᾱ_0 to ᾱ_0 and only "
        "replaces x̂_0 by its clipped value (x + √ᾱ_0 (clip(x̂_0) − x̂_0), 3e-3 in "
        "tests/test_diffusers_ddim.py), a step of zero length that aj.sample's "
        "strictly decreasing grid cannot hold. Use steps_offset=1 (as Stable "
        "Diffusion's config does) or set_alpha_to_one=True."
    )


class DDIMFamily(Family):
    keys = {
        "DDIMScheduler": Keys({}, {}, _KNOWN | {"set_alpha_to_one"}),
        "DDPMScheduler": Keys(
            {"variance_type": (
                tuple(_DDPM_VARIANCES),
                "reads a variance the network predicts ('learned', 'learned_range': "
                "an output with twice the channels) or, for 'fixed_large_log', takes "
                "the square root of log β < 0 in diffusers' step (every noisy step "
                "is NaN)",
            )},
            {},
            _KNOWN,
        ),
        "CogVideoXDDIMScheduler": Keys(
            {}, {}, _KNOWN | {"set_alpha_to_one", "snr_shift_scale"}
        ),
    }

    def schedule(self, config, name):
        if name == "CogVideoXDDIMScheduler":
            return VPDiscrete(cogvideox_betas(config))
        return VPDiscrete(betas_from_config(config))

    def network(self, model, config, name):
        return knots_network(model, config, self.schedule(config, name), name=name)

    def plan(self, config, name, num_steps, *, sigmas, timesteps, mu, eta):
        refuse_args(name, sigmas=sigmas, mu=mu)
        if name == "DDPMScheduler":
            return self._ddpm(config, num_steps, timesteps)
        refuse_args(name, timesteps=timesteps)
        T = int(config.get("num_train_timesteps", 1000))
        steps = vp_timesteps(config, name, num_steps)
        times = (steps + 1) / T
        end, targets = _ddim_targets(config, steps, num_steps, name)
        if name == "CogVideoXDDIMScheduler":
            eta, opts = 0.0, {}  # its step is deterministic whatever η, never clips
        else:
            opts = x0_options(config)
        if end != times[-1]:
            sampler = DDIM(eta, targets=targets, **opts)
            return Plan(np.concatenate([times, [end]]), sampler)
        # ᾱ_0 to ᾱ_0: the identity (without clipping), dropped.
        if opts:
            _zero_length_clip(opts)
        targets = None if targets is None else targets[:-1]
        return Plan(times, DDIM(eta, targets=targets, **opts))

    def _ddpm(self, config, num_steps, timesteps):
        name = "DDPMScheduler"
        T = int(config.get("num_train_timesteps", 1000))
        if timesteps is not None:
            if num_steps is not None:
                raise ValueError(
                    f"{name}.set_timesteps takes `num_steps` or `timesteps`, not both."
                )
            steps = _custom_steps(timesteps, T, name)
        else:
            steps = vp_timesteps(config, name, num_steps)
        times = np.concatenate([(steps + 1) / T, [0.0]])
        variance = _DDPM_VARIANCES[config.get("variance_type", "fixed_small")]
        opts = x0_options(config)
        if opts:
            opts["clipped_eps"] = True  # DDPM's mean uses x̂_0 and x_t
        if variance == "fixed_large":
            # Noise on the step to ᾱ = 1 whenever it starts from a timestep > 0.
            opts |= {"variance": "fixed_large", "final_noise": bool(steps[-1] > 0)}
        elif steps[-1] > 0:
            # diffusers clamps the posterior variance to 1e-20: a step to ᾱ = 1 from a
            # timestep > 0 adds 1e-10 ξ.
            opts |= {"variance": "fixed_small", "final_noise": True}
        return Plan(times, DDIM(eta=1.0, **opts))


FAMILY = DDIMFamily()
