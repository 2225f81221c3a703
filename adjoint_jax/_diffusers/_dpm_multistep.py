"""`DPMSolverMultistepScheduler`: `aj.DPMSolverPP(solver_order, solver_type,
lower_order_final)` on the integer timesteps of `set_timesteps` (t = (n + 1)/T on
`aj.VPDiscrete`), ending at σ = 0 or at σ_min (`final_sigmas_type`)."""

import math

import numpy as np

from .._samplers._dpm_solver_pp import DPMSolverPP
from .._schedule import VPDiscrete
from ._config import Keys, betas_from_config
from ._ddim import knots_network, vp_timesteps
from ._family import Family, Plan, refuse_args


_NAME = "DPMSolverMultistepScheduler"
_REFUSED = {
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
}
_KNOWN = frozenset({
    "solver_order", "prediction_type", "solver_type", "lower_order_final",
    "final_sigmas_type", "timestep_spacing", "steps_offset",
    "dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type",
})


class DPMMultistepFamily(Family):
    keys = {_NAME: Keys(_REFUSED, {}, _KNOWN)}

    def schedule(self, config, name):
        return VPDiscrete(betas_from_config(config))

    def network(self, model, config, name):
        return knots_network(model, config, self.schedule(config, name), name=name)

    def plan(self, config, name, num_steps, *, sigmas, timesteps, mu, eta):
        refuse_args(name, sigmas=sigmas, mu=mu)
        T = int(config.get("num_train_timesteps", 1000))
        if timesteps is not None:
            steps = np.asarray(timesteps).astype(np.int64)
        else:
            steps = vp_timesteps(config, name, num_steps, extra=True)
        times = (steps + 1) / T
        end = 0.0 if config.get("final_sigmas_type", "zero") == "zero" else 1.0 / T
        if end == times[-1]:
            raise ValueError(
                "DPMSolverMultistepScheduler's last timestep is 0 and its final sigma "
                "is sigma_min (the same noise level): a zero-length step."
            )
        solver_type = config.get("solver_type", "midpoint")
        if solver_type in ("logrho", "bh1", "bh2"):  # diffusers maps these to midpoint
            solver_type = "midpoint"
        sampler = DPMSolverPP(
            order=int(config.get("solver_order", 2)),
            solver_type=solver_type,
            lower_order_final=bool(config.get("lower_order_final", True)),
        )
        return Plan(np.concatenate([times, [end]]), sampler)


FAMILY = DPMMultistepFamily()
