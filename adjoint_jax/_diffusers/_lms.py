"""`LMSDiscreteScheduler`: `aj.LMS()` (its `step(order=4)`) on the scheduler's σ-grid
(`_kdiffusion.py`'s: spacings, Karras / exponential / beta; σ = 0 at the end). diffusers
integrates each Lagrange basis polynomial with `scipy.integrate.quad`, exact for
these cubics to round-off; `aj.LMS` integrates them by 2-point Gauss–Legendre,
exact too. `step(order=k)` with k ≠ 4 is `aj.LMS(order=k)` (swap it into the
setup); k > 4 is not reproduced.
"""

from .._samplers._lms import LMS
from ._config import Keys
from ._family import refuse_args
from ._kdiffusion import FOREIGN, KFamily, k_grid, refuse_eta


_NAME = "LMSDiscreteScheduler"


class LMSFamily(KFamily):
    keys = {
        _NAME: Keys(
            {},
            {},
            frozenset(
                {
                    "prediction_type",
                    "use_karras_sigmas",
                    "use_exponential_sigmas",
                    "use_beta_sigmas",
                    "timestep_spacing",
                    "steps_offset",
                }
            )
            | FOREIGN,
        ),
    }

    def plan(self, config, name, num_steps, *, sigmas, timesteps, mu, eta):
        refuse_args(name, sigmas=sigmas, timesteps=timesteps, mu=mu)
        refuse_eta(name, eta)
        return self.k_plan(
            config, name, k_grid(config, name, num_steps), LMS(), ode=True
        )


FAMILY = LMSFamily()
