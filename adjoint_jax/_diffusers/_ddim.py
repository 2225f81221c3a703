"""`DDIMScheduler` and `DDPMScheduler`: `aj.DDIM(eta)` on the integer timesteps of
`set_timesteps` (t = (n + 1)/T on `aj.VPDiscrete`); DDPM's posterior step is
`aj.DDIM(eta=1)`."""

import numpy as np

from .._samplers._ddim import DDIM
from .._schedule import VPDiscrete
from ._config import Keys, betas_from_config
from ._family import Family, Plan, refuse_args
from ._net import TimestepMap, network, prediction_of


_COMMON = {
    "clip_sample": ((False,), "clamps x̂_0 to [−1, 1] at every step"),
    "thresholding": ((False,), "applies dynamic thresholding to x̂_0"),
}
_KNOWN = frozenset({
    "steps_offset", "prediction_type", "timestep_spacing", "dynamic_thresholding_ratio",
    "clip_sample_range", "sample_max_value",
})


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


class DDIMFamily(Family):
    keys = {
        "DDIMScheduler": Keys(
            _COMMON, {"clip_sample": True}, _KNOWN | {"set_alpha_to_one"}
        ),
        "DDPMScheduler": Keys(
            _COMMON | {
                "variance_type": (("fixed_small",), "only the posterior variance is reproduced"),
            },
            {"clip_sample": True},
            _KNOWN,
        ),
    }

    def schedule(self, config, name):
        return VPDiscrete(betas_from_config(config))

    def network(self, model, config, name):
        return knots_network(model, config, self.schedule(config, name), name=name)

    def plan(self, config, name, num_steps, *, sigmas, timesteps, mu, eta):
        refuse_args(name, sigmas=sigmas, mu=mu)
        T = int(config.get("num_train_timesteps", 1000))
        if timesteps is not None:
            raise ValueError(
                f"{name}: custom `timesteps` are not reproduced (its step jumps by "
                "num_train_timesteps // num_inference_steps, not to the next one)."
            )
        steps = vp_timesteps(config, name, num_steps)
        times = (steps + 1) / T
        if name == "DDPMScheduler":
            return Plan(np.concatenate([times, [0.0]]), DDIM(eta=1.0))
        n = num_steps
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
        if end == times[-1]:  # ᾱ_0 to ᾱ_0: the identity, dropped
            return Plan(times, DDIM(eta=eta))
        return Plan(np.concatenate([times, [end]]), DDIM(eta=eta))


FAMILY = DDIMFamily()
