"""`KDPM2DiscreteScheduler` and `KDPM2AncestralDiscreteScheduler`: `aj.KDPM2()` and
`aj.KDPM2Ancestral()` on the scheduler's σ-grid (`_kdiffusion.py`'s, with KDPM2's quirk:
under `use_karras_sigmas` its step timesteps are `_sigma_to_t` *rounded*).

Each σ-step evaluates the network twice (the pipeline's timesteps interleave the
step's own with the intermediate point's, `_sigma_to_t` of the interpolated σ: the
geometric mean of σ_t and σ_s for KDPM2, which is σ_s itself for the ancestral one);
the last step to σ = 0 is a first-order step with one evaluation.

The network's timesteps are a function of the time wherever the step's own timestep
is `_sigma_to_t` of its σ (leading / trailing spacings, linspace with integer
timesteps, exponential and beta grids); otherwise KDPM2's network gets a table of
its 2N − 1 (time, timestep) pairs, and the ancestral one is refused, since it calls
the network twice at the same σ with two timesteps (see `KFamily.mid_map`).
`prediction_type="sample"` is refused: diffusers' step raises NotImplementedError.
"""

import numpy as np

from .._samplers._kdpm2 import KDPM2, KDPM2Ancestral
from ._config import Keys
from ._family import refuse_args
from ._grids import sigma_to_index
from ._kdiffusion import FOREIGN, KFamily, k_grid, k_train_sigmas, refuse_eta


_PLAIN = "KDPM2DiscreteScheduler"
_ANCESTRAL = "KDPM2AncestralDiscreteScheduler"
_KEYS = Keys(
    {
        "prediction_type": (
            ("epsilon", "v_prediction"),
            "raises NotImplementedError in diffusers' KDPM2 step",
        )
    },
    {},
    frozenset(
        {
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "timestep_spacing",
            "steps_offset",
        }
    )
    | FOREIGN,
)


def _lerp_half(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """torch.lerp(a, b, 0.5) (its w ≥ ½ branch: b − (b − a)/2)."""
    return b - (b - a) * 0.5


def mid_sigmas(sig: np.ndarray, ancestral: bool) -> np.ndarray:
    """diffusers' σ_interpol of the steps that evaluate there (all but the last):
    exp(lerp(log σ_{k+1}, log σ_k, ½)), or for the ancestral scheduler
    exp(lerp(log σ_k, log σ_down_k, ½)) with σ_down from σ_up as it computes them."""
    s, nxt = sig[:-2], sig[1:-1]
    if not ancestral:
        return np.exp(_lerp_half(np.log(nxt), np.log(s)))
    up = (nxt**2 * (s**2 - nxt**2) / s**2) ** 0.5
    down = (nxt**2 - up**2) ** 0.5
    return np.exp(_lerp_half(np.log(s), np.log(down)))


class KDPM2Family(KFamily):
    keys = {_PLAIN: _KEYS, _ANCESTRAL: _KEYS}

    def default_kind(self, config, name):
        return "log-index"

    def plan(self, config, name, num_steps, *, sigmas, timesteps, mu, eta):
        refuse_args(name, sigmas=sigmas, timesteps=timesteps, mu=mu)
        refuse_eta(name, eta)
        grid = k_grid(config, name, num_steps)
        if config.get("use_karras_sigmas", False):
            grid = grid._replace(timesteps=np.round(grid.timesteps))
        ancestral = name == _ANCESTRAL
        mid = mid_sigmas(grid.sigmas, ancestral)
        mids = (mid, sigma_to_index(mid, k_train_sigmas(config, name)))
        sampler = KDPM2Ancestral() if ancestral else KDPM2()
        return self.k_plan(config, name, grid, sampler, ode=not ancestral, mids=mids)


FAMILY = KDPM2Family()
