"""`DEISMultistepScheduler`: `aj.DEIS(solver_order, lower_order_final)` on the
integer timesteps of `set_timesteps` (`timestep_spacing`, t = (n + 1)/T on
`aj.VPDiscrete`) ending at σ_min, or on a Karras / exponential / beta σ-grid, or on
flow sigmas (`aj.FlowMatching()`).

diffusers ends the σ-grids by repeating their last σ: the last step goes from σ_min
to σ_min and is the identity (its coefficients vanish exactly; the model is
evaluated for nothing). That step is dropped, and the sampler keeps diffusers'
order schedule of all the steps (`DEIS(orders=...)`); so is a default grid's last
step when its last timestep is 0 (σ_min already).
"""

import numpy as np

from .._samplers._deis import DEIS, deis_orders
from ._config import Keys
from ._ddim import vp_timesteps
from ._dpm_singlestep import (
    bind,
    flow_shift_of,
    grid_times,
    grid_timesteps,
    prediction_kind,
    schedule_of,
    sigma_grid,
    sigma_kind,
    sigma_network,
    thresholding_of,
)
from ._family import Family, Plan, refuse_args


_NAME = "DEISMultistepScheduler"
_KNOWN = frozenset({
    "solver_order", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
    "sample_max_value",
    "algorithm_type", "solver_type", "lower_order_final", "use_karras_sigmas",
    "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "flow_shift",
    "timestep_spacing", "steps_offset", "use_dynamic_shifting", "time_shift_type",
})


def _check_solver(config, name: str) -> None:
    algorithm = config.get("algorithm_type", "deis")
    if algorithm not in ("deis", "dpmsolver", "dpmsolver++"):  # diffusers maps to deis
        raise ValueError(
            f"`config['algorithm_type'] = {algorithm!r}` ({name}) is not supported: "
            "diffusers implements only 'deis' (and maps 'dpmsolver', 'dpmsolver++' to it)."
        )
    solver = config.get("solver_type", "logrho")
    if solver not in ("logrho", "midpoint", "heun", "bh1", "bh2"):  # mapped to logrho
        raise ValueError(
            f"`config['solver_type'] = {solver!r}` ({name}) is not supported: diffusers "
            "implements only 'logrho'."
        )


class DEISFamily(Family):
    keys = {_NAME: Keys({}, {}, _KNOWN)}

    def __init__(self, table=None):
        self.table = table  # a plan's (times increasing, the network's timesteps)

    def schedule(self, config, name):
        return schedule_of(config)

    def network(self, model, config, name):
        _check_solver(config, name)
        return sigma_network(model, config, name, algorithm="deis", table=self.table)

    def plan(self, config, name, num_steps, *, sigmas, timesteps, mu, eta):
        refuse_args(name, sigmas=sigmas, timesteps=timesteps)
        _check_solver(config, name)
        prediction_kind(config, name, "deis")
        kind = sigma_kind(config, name)
        if mu is not None:
            flow_shift_of(config, name, mu)
        T = int(config.get("num_train_timesteps", 1000))
        n = num_steps
        if kind is not None:
            sig = sigma_grid(config, name, n, kind, mu)
            times = grid_times(config, sig, kind)
            end = times[-1]  # the σ-grids end by repeating their last σ
        else:
            times = (vp_timesteps(config, name, n, extra=True) + 1) / T
            end = 1.0 / T  # sigma_last: the table's σ_min
        plan = self._plan(name, config, times, end, n)
        if kind is None:
            return plan
        return bind(plan, DEISFamily, times, grid_timesteps(config, kind, sig))

    def _plan(self, name, config, times, end, n):
        order = int(config.get("solver_order", 2))
        lower = bool(config.get("lower_order_final", True))
        thr = thresholding_of(config)
        if end != times[-1]:
            return Plan(np.concatenate([times, [end]]), DEIS(order, lower, thresholding=thr))
        # The last step (σ_min to σ_min) is the identity: dropped, with the order
        # schedule of all n steps kept for the others.
        if n < 2:
            raise ValueError(
                f"{name} with {n} step on this grid takes only its identity step "
                "(σ_min to σ_min); use at least 2 steps."
            )
        orders = tuple(int(k) for k in deis_orders(order, n, lower)[:-1])
        return Plan(times, DEIS(order, lower, orders, thr))


FAMILY = DEISFamily()
