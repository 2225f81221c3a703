"""`PNDMScheduler`: `aj.PNDM(prk, combine)` on the integer timesteps of
`set_timesteps` (t = (n + 1)/T on `aj.VPDiscrete`).

diffusers' step transfers from timestep n to n − T // N whatever the spacing, and
evaluates the network at the next listed timestep; the two agree (one grid) when
the listed timesteps are T // N apart (`timestep_spacing="leading"`, or "trailing" /
"linspace" where N divides T suitably), which is required. The last step goes to
ᾱ = 1 (`set_alpha_to_one`) or to ᾱ_0; a last step from ᾱ_0 to ᾱ_0 (timestep 0, no
`steps_offset`) is the identity and is dropped. F-PNDM (`skip_prk_steps=False`,
diffusers' default) also needs N ≥ 4 and an even T // N (its RK midpoint is the
timestep n − T // N // 2, which must be the transfer's midpoint too).
"""

import numpy as np

from .._samplers._ddim import DDIM
from .._samplers._pndm import PNDM
from .._schedule import VPDiscrete
from ._config import Keys, betas_from_config
from ._ddim import knots_network, vp_timesteps
from ._family import Family, Plan, refuse_args


_NAME = "PNDMScheduler"
_REFUSED = {
    "prediction_type": (
        ("epsilon", "v_prediction"), "is not one of the two diffusers' PNDM accepts"
    ),
}
_KNOWN = frozenset({
    "skip_prk_steps", "set_alpha_to_one", "timestep_spacing", "steps_offset",
})
# Keys of other schedulers' configs (a shipped config switched to PNDM keeps them)
# that PNDMScheduler.__init__ does not take: diffusers ignores them, and so do we.
_FOREIGN = frozenset({
    "algorithm_type", "clip_sample", "clip_sample_range", "disable_corrector",
    "dynamic_thresholding_ratio", "euler_at_final", "final_sigmas_type", "flow_shift",
    "interpolation_type", "lambda_min_clipped", "lower_order_final", "predict_x0",
    "rescale_betas_zero_snr", "sample_max_value", "sigma_max", "sigma_min",
    "solver_order", "solver_p", "solver_type", "thresholding", "time_shift_type",
    "timestep_type", "use_beta_sigmas", "use_dynamic_shifting",
    "use_exponential_sigmas", "use_flow_sigmas", "use_karras_sigmas", "use_lu_lambdas",
    "variance_type",
})


def _betas(config):
    """The DDPM betas; PNDMScheduler has no `rescale_betas_zero_snr`."""
    return betas_from_config({k: v for k, v in config.items()
                              if k != "rescale_betas_zero_snr"})


class PNDMFamily(Family):
    keys = {_NAME: Keys(_REFUSED, {}, _KNOWN | _FOREIGN)}

    def schedule(self, config, name):
        return VPDiscrete(_betas(config))

    def network(self, model, config, name):
        return knots_network(model, config, self.schedule(config, name), name=name)

    def plan(self, config, name, num_steps, *, sigmas, timesteps, mu, eta):
        refuse_args(name, sigmas=sigmas, timesteps=timesteps, mu=mu)
        if eta:
            raise ValueError(f"`eta` is DDIM's; {_NAME}.step takes none (got {eta!r}).")
        T = int(config.get("num_train_timesteps", 1000))
        prk = not config.get("skip_prk_steps", False)
        steps = vp_timesteps(config, name, num_steps)  # descending
        jump = T // num_steps
        _check_grid(config, steps, jump, prk)
        times = (steps + 1) / T
        last = steps[-1] - jump
        if last >= 0:
            end = (last + 1) / T
        else:
            end = 0.0 if config.get("set_alpha_to_one", False) else 1.0 / T
        ts = times if end == times[-1] else np.append(times, end)
        if len(ts) < 2:
            raise ValueError(
                f"{_NAME} with num_inference_steps=1 and timestep 0 steps from ᾱ_0 to "
                "ᾱ_0 (set_alpha_to_one=False): the identity, no sampler step; its "
                "result is the initial latents."
            )
        combine = "v" if config.get("prediction_type") == "v_prediction" else "eps"
        if num_steps == 1:  # one evaluation: PLMS's first transfer, no Heun step
            return Plan(ts, DDIM())
        return Plan(ts, PNDM(prk=prk, combine=combine))


def _check_grid(config, steps, jump, prk) -> None:
    spacing = config.get("timestep_spacing", "leading")
    if np.any(steps[1:] != steps[:-1] - jump):
        raise ValueError(
            f"`config['timestep_spacing'] = {spacing!r}` ({_NAME}) with "
            f"{len(steps)} steps is not supported: PNDM's step transfers from "
            f"timestep n to n − num_train_timesteps // num_inference_steps = n − {jump}"
            f", which is not the next listed timestep ({steps.tolist()[:4]}...), so "
            "its evaluation and transfer times do not form one grid; use 'leading', "
            "or a step count for which the timesteps are that far apart."
        )
    if prk and len(steps) < 4:
        raise ValueError(
            f"`config['skip_prk_steps'] = False` ({_NAME}) needs num_inference_steps "
            f">= 4 (three Runge–Kutta steps, then PLMS); got {len(steps)} "
            "(diffusers fails too)."
        )
    if prk and jump % 2:
        raise ValueError(
            f"`config['skip_prk_steps'] = False` ({_NAME}) with num_train_timesteps "
            f"// num_inference_steps = {jump} (odd) is not supported: diffusers then "
            f"transfers the RK midpoint to timestep n − {jump // 2} but evaluates the "
            f"network there at n − {jump - jump // 2}, which is no grid point of one "
            "schedule; choose a step count with an even ratio."
        )


FAMILY = PNDMFamily()
