"""`FlowMatchEulerDiscreteScheduler`: `aj.DPMSolver1()` (the Euler step of the
velocity is exact in σ/α for the linear interpolation) on `aj.FlowMatching()`,
σ = t from 1 (pure noise) down to diffusers' σ_min with `shift` applied as
diffusers applies it, then 0."""

import numpy as np

from .._samplers._dpm_solver import DPMSolver1
from .._schedule import FlowMatching
from ._config import Keys
from ._family import Family, Plan, refuse_args
from ._grids import flow_shift
from ._net import TimestepMap, network


_NAME = "FlowMatchEulerDiscreteScheduler"
_REFUSED = {
    "use_dynamic_shifting": ((False,), "dynamic shifting needs a `mu`"),
    "invert_sigmas": ((False,), "inverted sigmas are not reproduced"),
    "shift_terminal": ((None,), "a stretched terminal shift is not reproduced"),
    "use_karras_sigmas": ((False,), "Karras sigmas are not reproduced"),
    "use_exponential_sigmas": ((False,), "exponential sigmas are not reproduced"),
    "use_beta_sigmas": ((False,), "beta sigmas are not reproduced"),
    "stochastic_sampling": ((False,), "stochastic sampling is not reproduced"),
}
_KNOWN = frozenset({
    "shift", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len",
    "time_shift_type",
})


class FlowMatchFamily(Family):
    keys = {_NAME: Keys(_REFUSED, {}, _KNOWN)}

    def schedule(self, config, name):
        return FlowMatching()

    def network(self, model, config, name):
        T = float(config.get("num_train_timesteps", 1000))
        return network(model, FlowMatching(), TimestepMap("flow", scale=T), "flow")

    def plan(self, config, name, num_steps, *, sigmas, timesteps, mu, eta):
        refuse_args(name, sigmas=sigmas, timesteps=timesteps, mu=mu)
        T = int(config.get("num_train_timesteps", 1000))
        shift = float(config.get("shift", 1.0))
        sigma_min = flow_shift(np.float64(1.0 / T), shift)  # __init__'s table, shifted
        grid = flow_shift(np.linspace(1.0, sigma_min, num_steps), shift)  # shifted again
        return Plan(np.concatenate([grid, [0.0]]), DPMSolver1())


FAMILY = FlowMatchFamily()
