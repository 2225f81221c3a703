"""`DPMSolverSDEScheduler` ("DPM++ SDE"): `aj.DPMSolverSDE()` on diffusers' own
interleaved grid — the σ of `timestep_spacing` (σ interpolated linearly in the
training table) or a Karras / exponential / beta ramp between its ends, each
interval's log-σ midpoint inserted, then σ = 0 — as `aj.VPDiscrete` times
(λ = −log σ).

The scheduler keeps the variance-exploding latents y = x/α (its `scale_model_input`
hands the network y/√(σ² + 1) = x), so x_T = α_T · z · `init_noise_sigma`; it ends
at σ = 0, where y = x. Its noise is a Brownian motion in σ sampled by torchsde's
Brownian tree; the sampler takes the normalised increment over each interval of the
interleaved grid as that step's standard normal (`aj.DPMSolverSDE`), which is how
diffusers' two draws per step (over the first half and over the whole step) combine.

`step(..., s_noise=)` (default 1) is a loop argument, not config: for another value
use `setup._replace(sampler=aj.DPMSolverSDE(s_noise=...))`.

To reproduce a run of diffusers' own Brownian tree (`noise_sampler_seed`), query a
fresh `BrownianTreeNoiseSampler(x, σ_min, σ_max, seed)` (σ_min, σ_max: the extremes of
the scheduler's positive `sigmas`) over each interval of the grid, in diffusers' σ
(= e^{−λ(ts[i])}): `noises[i] = sampler(σ_i, σ_{i+1})`; this gives diffusers' final
latents to 4e-15 in float64 (measured at 10 and 25 steps; torchsde is not a
dependency of adjoint_jax).

The network's timestep: the spacing's value at the steps' σ (fractional for
"linspace": σ interpolated linearly) and `_sigma_to_t` (log-σ interpolation) at the
midpoints and on Karras / exponential / beta grids; as the two differ between the
table's integers, the plan binds the exact values on its grid
(`TimestepMap("table")`); the unbound network (`aj.diffusers_model`) uses
`_sigma_to_t`, exact wherever the grid's timesteps are integers or come from it.
"""

import math

import numpy as np

from .._samplers._dpm_sde import DPMSolverSDE
from ._config import Keys, train_sigmas
from ._dpm_singlestep import grid_times, vp_config, vp_schedule
from ._family import Family, Plan, refuse_args
from ._grids import beta, exponential, karras, sigma_to_index
from ._net import TimestepMap, network


_NAME = "DPMSolverSDEScheduler"
_REFUSED = {
    "prediction_type": (
        ("epsilon", "v_prediction"),
        "raises NotImplementedError in diffusers' DPMSolverSDEScheduler.step",
    ),
}
_CONVERSIONS = {"use_karras_sigmas": karras, "use_exponential_sigmas": exponential,
                "use_beta_sigmas": beta}
_KNOWN = frozenset({
    *_CONVERSIONS, "noise_sampler_seed", "timestep_spacing", "steps_offset",
})


def _spacing(config, name: str, n: int) -> np.ndarray:
    """`set_timesteps(n)`'s timesteps (float64, fractional for "linspace")."""
    T = int(config.get("num_train_timesteps", 1000))
    spacing = config.get("timestep_spacing", "linspace")
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1] + int(config.get("steps_offset", 0))
    if spacing == "trailing":
        return np.arange(T, 0, -T / n).round() - 1
    raise ValueError(
        "`config['timestep_spacing']` must be 'linspace', 'leading' or 'trailing' "
        f"({name}); got {spacing!r}."
    )


def sde_grid(config, name: str, n: int):
    """(σ of the interleaved grid, ending at 0; the network's timesteps at all but
    the last; `init_noise_sigma`), as `set_timesteps(n)` leaves them."""
    train = train_sigmas(vp_config(config))
    steps = _spacing(config, name, n)
    sig = np.interp(steps, np.arange(len(train)), train)
    kinds = [k for k in _CONVERSIONS if config.get(k, False)]
    if len(kinds) > 1:
        raise ValueError(f"{name}: at most one of {list(_CONVERSIONS)} may be set; got {kinds}.")
    if kinds:
        sig = np.asarray(_CONVERSIONS[kinds[0]](float(sig[0]), float(sig[-1]), n), np.float64)
        steps = sigma_to_index(sig, train)
    # `_second_order_timesteps`: the midpoints in t = −log σ.
    t = -np.log(sig)
    mid = np.exp(-(t[:-1] + np.diff(t) * 0.5))
    mid_steps = sigma_to_index(mid, train)
    full = np.empty(2 * n - 1)
    full[0::2], full[1::2] = sig, mid
    taus = np.empty(2 * n - 1)
    taus[0::2], taus[1::2] = steps, mid_steps
    top = float(np.max(full))
    spacing = config.get("timestep_spacing", "linspace")
    init = top if spacing in ("linspace", "trailing") else math.sqrt(top**2 + 1)
    return np.concatenate([full, [0.0]]), taus, init


class DPMSDEFamily(Family):
    keys = {_NAME: Keys(_REFUSED, {}, _KNOWN)}

    def __init__(self, tmap: TimestepMap | None = None):
        self.tmap = tmap

    def schedule(self, config, name):
        return vp_schedule(config)

    def network(self, model, config, name):
        tmap = self.tmap
        if tmap is None:
            tmap = TimestepMap("log-index", xs=np.log(train_sigmas(vp_config(config))))
        kind = config.get("prediction_type", "epsilon")
        return network(model, self.schedule(config, name), tmap, kind)

    def plan(self, config, name, num_steps, *, sigmas, timesteps, mu, eta):
        refuse_args(name, sigmas=sigmas, timesteps=timesteps, mu=mu)
        if eta:
            raise ValueError(f"`eta` is DDIM's; {name}.step takes none (got eta={eta!r}).")
        sig, taus, init = sde_grid(config, name, num_steps)
        times = grid_times(config, sig, None)
        if not np.all(np.diff(times) < 0):
            raise ValueError(f"{name}: the grid's σ must decrease strictly; got {sig.tolist()}.")
        if np.sum(taus == taus[0]) > 1:
            raise ValueError(
                f"{name}: the first timestep {taus[0]} occurs twice in {taus.tolist()}; "
                "diffusers' index_for_timestep then starts at its second occurrence."
            )
        plan = Plan(times, DPMSolverSDE(), init / math.sqrt(sig[0] ** 2 + 1), 1.0)
        xs, ys = times[:-1][::-1].copy(), taus[::-1].copy()
        return plan._replace(family=DPMSDEFamily(TimestepMap("table", xs=xs, ys=ys)))


FAMILY = DPMSDEFamily()
