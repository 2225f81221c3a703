"""`EulerDiscreteScheduler` (SDXL's) and `EulerAncestralDiscreteScheduler`
("Euler a") on the k-diffusion σ-grid (`_kdiffusion.py`).

- Euler is `aj.DPMSolver1()`: y_s = y_t + (σ_s − σ_t) ε is x_s = (α_s/α_t) x_t
  − σ_s (e^h − 1) ε in `aj`'s exponential coordinates (α_s(σ_t − σ_s) = σ_s(e^h − 1)).
- Euler a is `aj.DDIM(eta=1)`: σ_down = σ_s²/σ_t, σ_up = σ_s √(1 − σ_s²/σ_t²) are
  DDIM's η = 1 coefficients divided by α_s, with the same standard normal per step.
- `step(s_churn > 0, ...)` is `aj.EulerChurn` (swap it into the setup:
  `setup._replace(sampler=aj.EulerChurn(s_churn=..., prediction=...))`).

Euler's own options: `interpolation_type="log_linear"` (n + 1 log-uniform σ paired
by position with the spacing's timesteps: a "table"), `sigma_min` / `sigma_max`
(the ramps' ends; a σ beyond the training table widens the schedule's range),
`final_sigmas_type`, `timestep_type="continuous"` with v-prediction (¼ log σ), and
pipeline-passed `sigmas` (`_sigma_to_t`) or `timesteps` (a "table").
"""

import math

import numpy as np

from .._samplers._ddim import DDIM
from .._samplers._dpm_solver import DPMSolver1
from ._config import Keys
from ._family import refuse_args
from ._grids import sigma_to_index
from ._kdiffusion import (
    FOREIGN,
    KFamily,
    KGrid,
    conversion,
    convert,
    init_noise_sigma,
    k_grid,
    k_train_sigmas,
    refuse_eta,
    spacing_timesteps,
)
from ._net import prediction_of


def euler_grid(config, name: str, n: int | None, sigmas, timesteps) -> KGrid:
    """`EulerDiscreteScheduler.set_timesteps(n, timesteps=, sigmas=)`."""
    train = k_train_sigmas(config, name)
    if sigmas is not None:
        if n is not None and n != len(sigmas) - 1:
            raise ValueError(
                f"`num_steps`={n} must equal len(sigmas) − 1 = {len(sigmas) - 1}."
            )
        full, steps, kind = sigmas, sigma_to_index(sigmas[:-1], train), "log-index"
    elif config.get("interpolation_type", "linear") == "linear":
        g = k_grid(config, name, n, timesteps=timesteps, config_range=True)
        last = 0.0 if _final_zero(config, name) else float(train[0])
        full, steps, kind = np.concatenate([g.sigmas[:-1], [last]]), g.timesteps, g.kind
    elif config["interpolation_type"] == "log_linear":
        full, steps, kind = _log_linear(config, name, n, timesteps, train)
    else:
        raise ValueError(
            "`config['interpolation_type']` must be 'linear' or 'log_linear' "
            f"({name}); got {config['interpolation_type']!r}."
        )
    if config.get("timestep_type", "discrete") == "continuous" and (
        prediction_of(config, name) == "v_prediction"
    ):
        if timesteps is not None:
            raise ValueError(
                f"{name}: `timesteps` with timestep_type='continuous' and v-prediction "
                "are refused by diffusers itself."
            )
        # The pipeline loops over these timesteps: one per σ but the last.
        steps, kind = 0.25 * np.log(full[:-1]), "log-sigma"
    return KGrid(full[: len(steps) + 1], steps, kind, init_noise_sigma(config, full))


def _final_zero(config, name: str) -> bool:
    final = config.get("final_sigmas_type", "zero")
    if final not in ("zero", "sigma_min"):
        raise ValueError(
            f"`config['final_sigmas_type']` must be 'zero' or 'sigma_min' ({name}); "
            f"got {final!r}."
        )
    return final == "zero"


def _log_linear(config, name, n, timesteps, train):
    """interpolation_type="log_linear": n + 1 σ log-uniform from the table's largest to
    its smallest (the final σ is appended but never reached: the n steps end on σ_min)
    and the spacing's (or given) timesteps, paired with them by position."""
    steps = spacing_timesteps(config, name, n) if timesteps is None else timesteps
    n = len(steps)
    ramp = np.exp(np.linspace(math.log(train[-1]), math.log(train[0]), n + 1))
    last = 0.0 if _final_zero(config, name) else float(train[0])
    conv = conversion(config, name)
    if conv is None:
        return np.concatenate([ramp, [last]]), np.asarray(steps, np.float64), "table"
    if timesteps is not None:
        raise ValueError(
            f"{name}: `timesteps` with config['{conv}'] are refused by diffusers "
            "itself."
        )
    sig = convert(config, conv, ramp, n, True)
    return np.concatenate([sig, [last]]), sigma_to_index(sig, train), "log-index"


# ---- Euler and Euler a ---------------------------------------------------------------
_EULER = "EulerDiscreteScheduler"
_ANCESTRAL = "EulerAncestralDiscreteScheduler"
_EULER_KNOWN = frozenset(
    {
        "prediction_type",
        "interpolation_type",
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "sigma_min",
        "sigma_max",
        "timestep_spacing",
        "timestep_type",
        "steps_offset",
        "final_sigmas_type",
    }
)


class EulerFamily(KFamily):
    keys = {
        _EULER: Keys({}, {}, _EULER_KNOWN | FOREIGN),
        _ANCESTRAL: Keys(
            {
                "prediction_type": (
                    ("epsilon", "v_prediction"),
                    "raises NotImplementedError in diffusers' "
                    "EulerAncestralDiscreteScheduler.step",
                )
            },
            {},
            frozenset({"timestep_spacing", "steps_offset"}) | FOREIGN,
        ),
    }

    def default_kind(self, config, name):
        if name == _ANCESTRAL:
            return "linear-index"
        if config.get("timestep_type", "discrete") == "continuous" and (
            prediction_of(config, name) == "v_prediction"
        ):
            return "log-sigma"
        return super().default_kind(config, name)

    def plan(self, config, name, num_steps, *, sigmas, timesteps, mu, eta):
        refuse_args(name, mu=mu)
        refuse_eta(name, eta)
        if name == _ANCESTRAL:
            refuse_args(name, sigmas=sigmas, timesteps=timesteps)
            grid = k_grid(config, name, num_steps, conversions=False)
            return self.k_plan(config, name, grid, DDIM(eta=1.0), ode=False)
        if sigmas is not None and timesteps is not None:
            raise ValueError(f"{name}: pass only one of `sigmas` and `timesteps`.")
        if timesteps is not None and conversion(config, name):
            raise ValueError(
                f"{name}: `timesteps` with config['{conversion(config, name)}'] are "
                "refused by diffusers itself."
            )
        grid = euler_grid(config, name, num_steps, sigmas, timesteps)
        return self.k_plan(config, name, grid, DPMSolver1(), ode=True)


FAMILY = EulerFamily()
