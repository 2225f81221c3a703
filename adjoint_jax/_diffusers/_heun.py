"""`HeunDiscreteScheduler` and `FlowMatchHeunDiscreteScheduler`: `aj.Heun()` on the
scheduler's σ-grid.

Both take two evaluations per σ-step (the pipeline's loop interleaves them: its
timesteps are t₀, t₁, t₁, t₂, t₂, …), an Euler predictor and the trapezoidal
corrector, except the last step to σ = 0, which is the Euler step alone. They apply
Heun's rule in different coordinates, and Heun's rule is not invariant under the
change:

- `HeunDiscreteScheduler` steps the variance-exploding latents y = x/α in σ (= e^{−λ}):
  `aj.Heun()` (space "ve"), on the `EulerDiscreteScheduler`-style σ-grid of
  `_kdiffusion.py` (spacings, Karras / exponential / beta, pipeline `timesteps`, and its
  `beta_schedule="exp"`).
- `FlowMatchHeunDiscreteScheduler` steps the flow latents x themselves in σ = t:
  `aj.Heun(space="t")` on `aj.FlowMatching()`, σ from 1 with `shift` applied twice as
  diffusers applies it, then 0. (`aj.Heun()` there differs by ~1e-3 at 10 steps.)

Heun's `clip_sample` (with `clip_sample_range`) is `aj.Heun(clip_sample=r)`.
FlowMatchHeun's `step(s_churn=...)` is a `step` argument `from_diffusers` does not
take (its default, 0, is what is reproduced; no `aj` sampler has its churn).
"""

import numpy as np

from .._samplers._heun import Heun
from .._schedule import FlowMatching
from ._config import Keys
from ._family import Plan, refuse_args
from ._grids import flow_shift
from ._kdiffusion import FOREIGN, KFamily, k_grid, refuse_eta
from ._net import TimestepMap, network


_HEUN = "HeunDiscreteScheduler"
_FLOW = "FlowMatchHeunDiscreteScheduler"


def flow_heun_sigmas(config, n: int) -> np.ndarray:
    """`FlowMatchHeunDiscreteScheduler.set_timesteps(n)`'s σ (then 0): a linspace of
    T·σ between `__init__`'s shifted table ends, divided by T and shifted again."""
    T = int(config.get("num_train_timesteps", 1000))
    shift = float(config.get("shift", 1.0))
    table = flow_shift(np.linspace(1, T, T)[::-1] / T, shift)
    sig = np.linspace(table[0] * T, table[-1] * T, n) / T
    return np.concatenate([flow_shift(sig, shift), [0.0]])


class HeunFamily(KFamily):
    keys = {
        _HEUN: Keys(
            {},
            {},
            frozenset(
                {
                    "prediction_type",
                    "use_karras_sigmas",
                    "use_exponential_sigmas",
                    "use_beta_sigmas",
                    "clip_sample",
                    "clip_sample_range",
                    "timestep_spacing",
                    "steps_offset",
                }
            )
            | FOREIGN,
        ),
        _FLOW: Keys({}, {}, frozenset({"shift"}) | FOREIGN),
    }

    def schedule(self, config, name):
        return FlowMatching() if name == _FLOW else super().schedule(config, name)

    def network(self, model, config, name):
        if name == _FLOW:
            T = float(config.get("num_train_timesteps", 1000))
            return network(model, FlowMatching(), TimestepMap("flow", scale=T), "flow")
        return super().network(model, config, name)

    def plan(self, config, name, num_steps, *, sigmas, timesteps, mu, eta):
        refuse_args(name, sigmas=sigmas, mu=mu)
        refuse_eta(name, eta)
        if name == _FLOW:
            refuse_args(name, timesteps=timesteps)
            return Plan(flow_heun_sigmas(config, num_steps), Heun(space="t"))
        if timesteps is not None and any(
            config.get(k, False)
            for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
        ):
            raise ValueError(
                f"{name}: `timesteps` with a Karras / exponential / beta σ-grid config "
                "(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas) are "
                "refused by diffusers itself."
            )
        grid = k_grid(config, name, num_steps, timesteps=timesteps)
        clip = (
            float(config.get("clip_sample_range", 1.0))
            if config.get("clip_sample")
            else None
        )
        return self.k_plan(config, name, grid, Heun(clip_sample=clip), ode=True)


FAMILY = HeunFamily()
